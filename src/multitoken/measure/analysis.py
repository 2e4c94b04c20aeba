"""What MTP costs and buys for one concrete config, computed exactly (``multitoken analyze``).

The tutorial's back-of-the-envelope claims made exact for :class:`MTPConfig`:

* :func:`parameter_counts`: trunk vs heads 1..n-1, overhead in % of the trunk. Tied or shared
  matrices are counted once (the trunk owns the embedding / ``lm_head``).
* :func:`flops_per_token`: training FLOPs per token, with and without the extra heads.
  Formula (stated once, used everywhere)::

      train FLOPs/token = 6 * N_mm + 6 * d * (T + 1) * A

  N_mm: weights of every matrix multiply a token passes through (the embedding lookup is
  free; the ``lm_head`` counts even when tied, once per head that uses it; head modules of
  each type included); 6 = 2 (multiply-add) x 3 (forward + backward's two products).
  Attention: per layer and token the forward does Q·K^T and A·V, 2·d FLOPs per attended
  key each, over (T+1)/2 keys on average under the causal mask: 2·d·(T+1); times 3 for
  training. A = attention layers the token passes (trunk layers, plus one per
  ``transformer`` / ``sequential`` head). Norms, softmax, RoPE and the loss are ignored.
* :func:`memory_per_step`: bytes autograd saves for backward (exact for this
  implementation in float32; see the function), the logit tensors of the naive and the
  memory-efficient step, and gradients.
* :func:`supervision_signals`: head i has T-i-1 valid targets in a sequence of T tokens
  (not T-1: the last i+1 positions have no target), so n heads give sum_i (T-i-1) signals,
  n(n-1)/2 fewer than the tutorial's n(T-1).
* :func:`speedup_bounds`: from a decoding benchmark, the bound τ·t(1)/t(verify).

The model imports nothing from here; this module only reads a config.
"""
from __future__ import annotations

from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import read_json
from multitoken.model.config import MTPConfig

AUTOREGRESSIVE_MODES = ("autoregressive", "ar", "plain", "greedy", "baseline")


# ---------------------------------------------------------------------------- parameters
def _dims(cfg: MTPConfig) -> tuple[int, int, int, int, int]:
    """d, kv (= n_kv_head * head_dim), d_ff, V, L."""
    return cfg.d_model, cfg.n_kv_head * cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layer


def block_parameters(cfg: MTPConfig) -> int:
    """One transformer block: 2 RMSNorm weights, q/o (d x d), k/v (d x kv), SwiGLU (3 d x d_ff)."""
    d, kv, f, _, _ = _dims(cfg)
    return 2 * d + 2 * d * d + 2 * d * kv + 3 * d * f


def block_matmul_weights(cfg: MTPConfig) -> int:
    d, kv, f, _, _ = _dims(cfg)
    return 2 * d * d + 2 * d * kv + 3 * d * f


def parameter_counts(cfg: MTPConfig) -> dict:
    """Exact parameter counts: ``trunk``, ``heads`` (1..n-1), ``total``, ``overhead_pct``.

    trunk = V·d (embedding) + [V·d if lm_head is untied] + L·block + d (final norm).
    Per extra head: linear V·d; residual 2d²; modulated d (+ one shared 2d² transform);
    transformer block + d; sequential 3d + 2d² + block; plus V·d per head when heads have
    their own unembedding (``share_embeddings=False``, always for ``linear``).
    """
    d, _, _, V, L = _dims(cfg)
    m = cfg.n_future - 1
    trunk = V * d + (0 if cfg.tie_embeddings else V * d) + L * block_parameters(cfg) + d
    per_head = {"linear": 0, "residual": 2 * d * d, "modulated": d, "transformer": block_parameters(cfg) + d,
                "sequential": 3 * d + 2 * d * d + block_parameters(cfg)}[cfg.head_type]
    unembed = 0 if cfg.share_embeddings else V * d
    shared = 2 * d * d if cfg.head_type == "modulated" and m else 0
    heads = m * (per_head + unembed) + shared
    return {"trunk": trunk, "heads": heads, "total": trunk + heads,
            "embedding": V * d, "lm_head_tied": cfg.tie_embeddings, "per_head": per_head + unembed,
            "shared_head_params": shared, "overhead_pct": 100.0 * heads / trunk}


# ---------------------------------------------------------------------------- FLOPs
def head_matmul_weights(cfg: MTPConfig) -> int:
    """N_mm of one extra head, its unembedding included."""
    d, _, _, V, _ = _dims(cfg)
    body = {"linear": 0, "residual": 2 * d * d, "modulated": 2 * d * d,
            "transformer": block_matmul_weights(cfg),
            "sequential": 2 * d * d + block_matmul_weights(cfg)}[cfg.head_type]
    return body + V * d


def flops_per_token(cfg: MTPConfig, seq_len: int | None = None) -> dict:
    """Training (and forward) FLOPs per token with and without heads 1..n-1 (module doc)."""
    T = seq_len or cfg.max_seq_len
    d, _, _, V, L = _dims(cfg)
    m = cfg.n_future - 1
    trunk_mm = L * block_matmul_weights(cfg) + V * d
    heads_mm = m * head_matmul_weights(cfg)
    head_attn_layers = m if cfg.head_type in ("transformer", "sequential") else 0
    attn_fwd = 2 * d * (T + 1)  # per attention layer: 4·d FLOPs per key x (T+1)/2 keys on average

    def train(mm: int, layers: int) -> int:
        return 6 * mm + 3 * attn_fwd * layers

    without, with_heads = train(trunk_mm, L), train(trunk_mm + heads_mm, L + head_attn_layers)
    return {"seq_len": T, "trunk_matmul_weights": trunk_mm, "heads_matmul_weights": heads_mm,
            "attention_layers": L + head_attn_layers, "attention_flops_per_layer_fwd": attn_fwd,
            "train_flops_without_heads": without, "train_flops_with_heads": with_heads,
            "forward_flops_without_heads": 2 * trunk_mm + attn_fwd * L,
            "forward_flops_with_heads": 2 * (trunk_mm + heads_mm) + attn_fwd * (L + head_attn_layers),
            "heads_overhead_pct": 100.0 * (with_heads - without) / without}


# ---------------------------------------------------------------------------- memory
def saved_activation_bytes(cfg: MTPConfig, tokens: int, with_heads: bool = True) -> dict:
    """Bytes autograd keeps for backward after the forward up to the logits (float32).

    Counted per token from what each op saves in this implementation (unique storages;
    RMSNorm's rstd, attention's logsumexp and the RoPE tables are float32; token ids int64):
      block: norm inputs/normalised/outputs, q, k, v, attention output, SwiGLU gate/up/act/
             product: 8d + 2kv + 4·d_ff values, + n_head + 2 float32;
      trunk: L blocks + final norm (3d + 1) + RoPE cos/sin (2·head_dim) + token ids;
      heads: residual 3d, modulated 4d, linear 0, transformer 10d + 2kv + 4·d_ff + n_head + 3,
             sequential 16d + 2kv + 4·d_ff + n_head + 5 (+ shifted token ids), and for the
             attention heads once more the RoPE tables.
    ``tests/test_analysis.py`` checks these against ``torch.autograd.graph.saved_tensors_hooks``.
    """
    d, kv, f, _, L = _dims(cfg)
    p, h, dh, m = 4, cfg.n_head, cfg.head_dim, cfg.n_future - 1
    block = p * (8 * d + 2 * kv + 4 * f) + 4 * (h + 2)
    trunk = L * block + p * 3 * d + 4 + 4 * 2 * dh + 8
    per_head = {"linear": 0, "residual": p * 3 * d, "modulated": p * 4 * d,
                "transformer": p * (10 * d + 2 * kv + 4 * f) + 4 * (h + 3),
                "sequential": p * (16 * d + 2 * kv + 4 * f) + 4 * (h + 5) + 8}[cfg.head_type]
    once = 4 * 2 * dh if cfg.head_type in ("transformer", "sequential") and m else 0
    heads = (m * per_head + once) if with_heads else 0
    return {"trunk": trunk * tokens, "heads": heads * tokens}


def memory_per_step(cfg: MTPConfig, batch_size: int = 1, seq_len: int | None = None,
                    chunk_size: int | None = None) -> dict:
    """Analytic bytes of one training step (float32), naive vs memory-efficient backward.

    * activations: :func:`saved_activation_bytes` (trunk and heads' hiddens).
    * one logit tensor: B·T·V·4 bytes.
    * naive logits: every head's logits and saved log-softmax are alive together at the
      end of the forward: at least 2·n logit tensors (the measured peak of the current
      code is higher: the backward of the stacked (B, T, n, V) logits adds more).
    * memory-efficient logits: one head and one chunk of c positions at a time; during its
      backward the saved log-softmax, its gradient and the logits' gradient coexist:
      3·B·c·V·4 bytes, independent of n.
    * gradients: one float32 per parameter (allocated during the step).
    """
    T = seq_len or cfg.max_seq_len
    tokens = batch_size * T
    chunk = min(chunk_size or T, T)
    acts = saved_activation_bytes(cfg, tokens)
    logit = tokens * cfg.vocab_size * 4
    naive_logits = 2 * cfg.n_future * logit
    mtp_logits = 3 * batch_size * chunk * cfg.vocab_size * 4
    grads = 4 * parameter_counts(cfg)["total"]
    activations = acts["trunk"] + acts["heads"]
    return {"batch_size": batch_size, "seq_len": T, "chunk_size": chunk, "bytes_per_value": 4,
            "activations_trunk": acts["trunk"], "activations_heads": acts["heads"],
            "logits_one_head": logit, "naive_logits": naive_logits, "mtp_logits": mtp_logits,
            "gradients": grads, "naive_step": activations + naive_logits + grads,
            "mtp_step": activations + mtp_logits + grads}


# ---------------------------------------------------------------------------- supervision
def supervision_signals(seq_len: int, n_future: int, batch_size: int = 1) -> dict:
    """Training targets per sequence of ``seq_len`` tokens (one document, no packing).

    Head i (0-based) predicts token t+i+1, so it has max(T-i-1, 0) valid targets. The
    tutorial's SampleEfficiencyAnalyzer counts n·(T-1), over-counting by sum_i min(i, T-1).
    """
    if seq_len < 1 or n_future < 1:
        raise MultitokenError(f"invalid seq_len={seq_len} / n_future={n_future}; allowed: integers >= 1")
    per_head = [max(seq_len - i - 1, 0) for i in range(n_future)]
    ntp, mtp = seq_len - 1, sum(per_head)
    claimed = n_future * (seq_len - 1)
    return {"seq_len": seq_len, "n_future": n_future, "per_head": per_head,
            "next_token": ntp * batch_size, "mtp": mtp * batch_size, "tutorial_claim": claimed * batch_size,
            "lost_at_sequence_end": (claimed - mtp) * batch_size,
            "density_gain": mtp / ntp if ntp else None, "tutorial_gain": float(n_future)}


# ---------------------------------------------------------------------------- decoding bound
def _per_forward_seconds(row: dict) -> float | None:
    """Seconds per forward pass of a decoding row, from its own measurements."""
    for key in ("verify_s", "t_verify", "seconds_per_forward"):
        if row.get(key):
            return float(row[key])
    seconds = row.get("wall_s") or row.get("seconds")
    if seconds and row.get("forward_passes"):
        return float(seconds) / row["forward_passes"]
    tokens = row.get("new_tokens") or row.get("tokens")
    if row.get("tokens_per_s") and tokens and row.get("forward_passes"):
        return tokens / row["tokens_per_s"] / row["forward_passes"]
    if row.get("tokens_per_s") and row.get("tau"):
        return float(row["tau"]) / row["tokens_per_s"]
    return None


def _verify_cost_table(result: dict) -> dict[int, float]:
    """{block width -> seconds} from a result's ``verify_cost`` list/dict, if any."""
    table = result.get("verify_cost") or {}
    if isinstance(table, dict):
        return {int(k): float(v) for k, v in table.items()}
    out = {}
    for entry in table:
        width = entry.get("width", entry.get("k"))
        secs = entry.get("seconds", entry.get("s"))
        if width is not None and secs is not None:
            out[int(width)] = float(secs)
    return out


def speedup_bounds(result: dict | list) -> list[dict]:
    """τ·t(1)/t(verify) for every decoding row that has τ.

    t(1): the result's ``verify_cost`` at width 1, else the row's ``t1_s``, else the
    seconds per forward pass of the autoregressive row (mode in AUTOREGRESSIVE_MODES).
    t(verify): the row's ``verify_s``, else ``verify_cost`` at the row's block width
    (``width``, or ``num_draft``/``k`` + 1), else the row's measured seconds per forward
    pass (``wall_s`` / ``forward_passes``, as ``bench decode`` writes them). With measured
    per-pass times on both sides the bound equals the realised speed-up (drafting overhead
    included); with a ``verify_cost`` table (pure forward costs per block width) it is the
    ceiling that a zero-cost drafter would reach.
    """
    if isinstance(result, list):
        result = {"rows": result}
    if not isinstance(result, dict) or not isinstance(result.get("rows", []), list):
        raise MultitokenError("a decoding bench result is a JSON object with a list of rows")
    # grouped results (prompt groups) also hold the pooled "all" rows: bound those
    rows = [r for r in result.get("rows", []) if isinstance(r, dict) and r.get("group", "all") == "all"]
    costs = _verify_cost_table(result)
    base = next((r for r in rows if str(r.get("mode", "")).lower() in AUTOREGRESSIVE_MODES), None)
    base_t1 = costs.get(1) or (_per_forward_seconds(base) if base else None)
    out = []
    for row in rows:
        if row is base or row.get("tau") is None:
            continue
        tau = float(row["tau"])
        t1 = row.get("t1_s") or base_t1
        width = row.get("width") or next((row[k] + 1 for k in ("num_draft", "k", "draft_len") if row.get(k) is not None), None)
        if row.get("verify_s"):
            tv, source = float(row["verify_s"]), "row verify_s"
        elif width is not None and width in costs:
            tv, source = costs[width], f"verify_cost[{width}]"
        else:
            tv, source = _per_forward_seconds(row), "measured seconds per forward"
        bound = tau * t1 / tv if t1 and tv else None
        out.append({"mode": row.get("mode"), "tau": tau, "t1_s": t1, "verify_s": tv, "verify_source": source,
                    "speedup_bound": bound, "measured_speedup": row.get("speedup")})
    return out


# ---------------------------------------------------------------------------- all together
def analyze(cfg: MTPConfig, seq_len: int | None = None, batch_size: int = 1, chunk_size: int | None = None,
            bench: dict | list | str | Path | None = None) -> dict:
    """Every analysis for one config (and a decoding bench result or JSON file, if given)."""
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise MultitokenError(f"invalid {name}={v!r}; allowed: an integer >= 1")
    T = cfg.max_seq_len if seq_len is None else seq_len  # 0 is an error above, never "the default"
    if T > cfg.max_seq_len:
        raise MultitokenError(f"seq_len {T} exceeds the config's max_seq_len={cfg.max_seq_len}")
    no_heads = cfg.replace(n_future=1)
    out = {"config": cfg.to_dict(), "parameters": parameter_counts(cfg), "flops_per_token": flops_per_token(cfg, T),
           "memory": memory_per_step(cfg, batch_size, T, chunk_size),
           "memory_next_token": memory_per_step(no_heads, batch_size, T, chunk_size),
           "supervision": supervision_signals(T, cfg.n_future)}
    if bench is not None:
        if isinstance(bench, (str, Path)):
            bench = read_json(bench, "bench file")
        out["speedup_bounds"] = speedup_bounds(bench)
    return out


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def format_analysis(result: dict) -> str:
    """The analysis as a short human-readable report."""
    cfg, p, f = result["config"], result["parameters"], result["flops_per_token"]
    m, m1, s = result["memory"], result["memory_next_token"], result["supervision"]
    lines = [f"model: {cfg['head_type']} heads, n_future={cfg['n_future']}, d_model={cfg['d_model']}, "
             f"n_layer={cfg['n_layer']}, vocab={cfg['vocab_size']}",
             "",
             "parameters (tied/shared matrices counted once)",
             f"  trunk {p['trunk']:,}   heads {p['heads']:,}   total {p['total']:,}   "
             f"head overhead {p['overhead_pct']:.1f}% of the trunk",
             "",
             f"training FLOPs per token at T={f['seq_len']} (6·N_matmul + 6·d·(T+1) per attention layer)",
             f"  without heads {f['train_flops_without_heads']:,}   with heads {f['train_flops_with_heads']:,}   "
             f"(+{f['heads_overhead_pct']:.1f}%)",
             "",
             f"memory per step, B={m['batch_size']} T={m['seq_len']} float32",
             f"  saved activations: trunk {_mb(m['activations_trunk'])}, heads {_mb(m['activations_heads'])}",
             f"  logits of one head {_mb(m['logits_one_head'])}; naive step >= {_mb(m['naive_logits'])} of logits, "
             f"memory-efficient {_mb(m['mtp_logits'])} (chunk {m['chunk_size']})",
             f"  step total: naive ~{_mb(m['naive_step'])}, memory-efficient ~{_mb(m['mtp_step'])}, "
             f"next-token ~{_mb(m1['mtp_step'])} (gradients {_mb(m['gradients'])} included)",
             "",
             f"supervision per sequence of T={s['seq_len']}",
             f"  targets per head {s['per_head']}",
             f"  next-token {s['next_token']:,}; MTP {s['mtp']:,} (x{s['density_gain']:.3f}); "
             f"tutorial's claim {s['tutorial_claim']:,} (x{s['tutorial_gain']:.0f}), "
             f"{s['lost_at_sequence_end']:,} targets do not exist at sequence ends"]
    for b in result.get("speedup_bounds", []):
        bound = "-" if b["speedup_bound"] is None else f"{b['speedup_bound']:.2f}x"
        measured = "" if b["measured_speedup"] is None else f", measured {b['measured_speedup']:.2f}x"
        if b is result["speedup_bounds"][0]:
            lines += ["", "decoding speed-up bound tau * t(1) / t(verify)"]
        lines.append(f"  {b['mode']}: tau {b['tau']:.2f}, bound {bound} ({b['verify_source']}){measured}")
    return "\n".join(lines) + "\n"
