"""``bench decode`` / ``heads bench`` as one library call: prompts, decoders, the benchmark loop,
verify cost and the result's metadata (what the JSON file holds)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from multitoken.measure.decode import HF_DECODERS, MASKED, MULTITOKEN_DECODERS, bench_decode, hf_base, verify_costs
from multitoken.measure.decode_tables import decode_markdown
from multitoken.measure.machine import machine_info, timestamp

HF_VERIFY_WIDTHS = (1, 2, 3, 4, 8, 16)  # block widths timed on an HF base (trees up to 15 nodes)


def choose_decoders(model, modes: Sequence[str], draft_model=None, adaptive: bool = False, batch_size: int = 1,
                    mask_finished: bool = False) -> list[str]:
    """The decoders a benchmark of ``modes`` runs on ``model``, reference first.

    On an HF base: HF greedy (the reference), then those of ``modes`` that run there (HF prompt
    lookup at batch size 1 only, and every multitoken decoder but ``draft``). On a native model: plain
    (the reference), then ``modes`` but the HF ones and ``draft`` without a draft model (see
    :func:`dropped_draft`). ``adaptive`` adds the adaptive chain right after ``spec``;
    ``mask_finished`` adds, after each multitoken decoder, its run with finished rows masked
    instead of dropped (``:mask``).
    """
    if hf_base(model) is not None:
        usable = tuple(d for d in MULTITOKEN_DECODERS if d != "draft") + (("hf_pld",) if batch_size == 1 else ())
        decoders = ["hf"] + [m for m in modes if m in usable]
    else:
        decoders = ["ar"] + [m for m in modes if m not in HF_DECODERS and not (m == "draft" and draft_model is None)]
    if adaptive and "spec" in decoders and "spec_adaptive" not in decoders:
        decoders.insert(decoders.index("spec") + 1, "spec_adaptive")
    decoders = list(dict.fromkeys(decoders))
    if mask_finished:
        decoders = [v for d in decoders for v in ((d, d + MASKED) if d in MULTITOKEN_DECODERS else (d,))]
    return decoders


def dropped_draft(model, modes: Sequence[str], draft_model) -> bool:
    """True where ``draft`` was asked for on a native model but no draft model was given."""
    return "draft" in modes and draft_model is None and hf_base(model) is None


def bench_prompts(model, tokenizer, prompts: int, prompt_tokens: int, code_prompts: int,
                  requests: str | Path | None = None, per_group: int | None = None,
                  prose: str | Path | None = None) -> tuple[list, bool]:
    """(prompts as (group, token ids), chat). On an HF base: the natural requests of
    :func:`multitoken.data.requests.load_bench_requests` (``requests``: a user's JSONL / text
    file instead of the packaged set; groups code / complete / prose, or user; ``prose``: a text
    file's prompts, one per line, as the prose group instead), at most ``per_group`` of each, plus
    ``code_prompts`` code continuations (group ``continue``:
    :data:`~multitoken.data.prompts.CODE_INSTRUCTION` on stdlib validation-split snippets), all in
    the chat template. On a native model, ``prompts`` validation snippets of ``prompt_tokens``."""
    from multitoken.data import prompts as sets  # module attribute: tests replace validation_prompts

    if hf_base(model) is None:
        return sets.validation_prompts(tokenizer, prompts, prompt_tokens), False
    from multitoken.data.requests import Request, load_bench_requests
    from multitoken.hf.loading import chat_ids
    hf, taken = tokenizer.hf, {}
    chosen = load_bench_requests(requests)
    if prose is not None:
        texts = load_bench_requests(prose)  # one prompt per line (group "user")
        chosen = [r for r in chosen if r.group != "prose"] + [Request(r.id, "prose", r.prompt) for r in texts]
    out = []
    for r in chosen:
        taken[r.group] = taken.get(r.group, 0) + 1
        if per_group is None or taken[r.group] <= per_group:
            out.append((r.group, chat_ids(hf, r.prompt)))
    snippets = sets.code_snippets(hf, code_prompts) if code_prompts else []
    return out + [("continue", chat_ids(hf, sets.CODE_INSTRUCTION.format(code=c))) for c in snippets], True


def decode_path(model) -> dict | None:
    """Which forward an HF base decodes through (None on a native model)."""
    if hf_base(model) is None:
        return None
    lean, fast = getattr(model, "lean_forward", None) is not None, bool(getattr(model, "fast_kernels", False))
    text = " + ".join(n for n, on in (("lean forward", lean), ("oneDNN kernels", fast)) if on) or "HF forward, F.linear"
    return {"lean_forward": lean, "fast_kernels": fast, "text": text}


def run_decode_bench(model, tokenizer, name: str, prompts: list, chat: bool, decoders: Sequence[str],
                     max_new_tokens: int, verify_widths: Sequence[int] = (), verify_prefix: int | None = None,
                     progress: bool = True, partial: str | Path | None = None, **decode_kw) -> tuple[dict, str]:
    """Benchmark ``decoders`` on ``prompts`` (:func:`bench_decode`; ``decode_kw`` goes there),
    time verify passes at ``verify_widths``; returns (result dict, markdown table).

    The result holds the rows, per-prompt records, ``machine``, ``date``, ``verify_cost`` and,
    on an HF base, ``decode_path``; ``identical`` rows say the output matched the reference
    (``decode_kw`` may hold ``batch_size``: see :func:`bench_decode`).
    """
    verify = verify_costs(model, verify_widths, verify_prefix) if verify_widths else None
    # HF's decoders stop at EOS, so all rows do on an HF base; native rows decode max_new_tokens each
    eos = tokenizer.hf.eos_token_id if hf_base(model) is not None else None
    result = bench_decode(model, prompts, decoders, max_new_tokens, eos_id=eos, progress=progress,
                          partial=partial, **decode_kw)
    tree = decode_kw.get("tree")
    result.update(benchmark="decode", model=name, machine=machine_info(),
                  date=timestamp(), chat=chat, eos_id=eos,
                  verify_cost=verify, tree=getattr(tree, "paths", tree), decode_path=decode_path(model))
    return result, decode_markdown(result, f"decode: {name}")


def all_identical(result: dict) -> bool:
    """Every multitoken decoder reproduced the reference (HF's own rows may differ: prompt lookup,
    or batched HF greedy drifting from its single-prompt output)."""
    return all(r["identical"] for r in result["rows"] if r["decoder"].removesuffix(MASKED) in MULTITOKEN_DECODERS)
