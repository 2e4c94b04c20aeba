"""``multitoken bench memory``: peak memory and time of one training step, naive vs
memory-efficient MTP backward, for several ``n_future`` (measurement: :mod:`multitoken.measure.worker`)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from multitoken.errors import MultitokenError
from multitoken.measure.worker import (MB, PeakMemory, batch, build_model, param_bytes, peak_method_note, result,
                                       run_worker, time_steps)
from multitoken.model.config import MTPConfig
from multitoken.model.native import MTPModel
from multitoken.training import MTPLoss, mtp_backward, naive_backward

MEMORY_METHODS = ("naive", "mtp", "mtp_chunked")


def _memory_step(method: str, model: MTPModel, loss_fn: MTPLoss, tokens: torch.Tensor, chunk_size: int):
    if method == "naive":
        return naive_backward(model, loss_fn, tokens)
    return mtp_backward(model, loss_fn, tokens, chunk_size=chunk_size if method == "mtp_chunked" else None)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def memory_worker(spec: dict) -> list[dict]:
    """All methods at one n_future on one model, interleaved round by round.

    Every step starts with gradients freed and the peak tracker reset, so each step's peak
    is measured on its own; interleaving the methods spreads machine noise over all of
    them. The first round also compares each method's gradients with the naive step's.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = MTPConfig.from_dict(spec["config"])
    model = build_model(cfg, device, spec["seed"])
    tokens = batch(cfg, spec["batch_size"], spec["seq_len"], device, spec["seed"])
    loss_fn = MTPLoss(cfg.n_future, "uniform")
    methods, chunk = spec["methods"], spec["chunk_size"]
    for method in methods:  # warm-up: kernels, thread pools, allocator arenas
        _memory_step(method, model, loss_fn, tokens, chunk)
        model.zero_grad(set_to_none=True)
    tracker = PeakMemory(device)
    peaks = {m: [] for m in methods}
    walls = {m: [] for m in methods}
    cpus = {m: [] for m in methods}
    reference, diffs = None, {}
    for round_ in range(spec["repeats"]):
        for method in methods:
            model.zero_grad(set_to_none=True)  # gradients are allocated inside every step
            tracker.reset()
            wall, cpu = time_steps(lambda: _memory_step(method, model, loss_fn, tokens, chunk), 1, device)
            peaks[method].append(tracker.peak_bytes())
            walls[method] += wall
            cpus[method] += cpu
            if round_ == 0 and method == "naive":
                reference = _grads(model)
            elif round_ == 0 and reference is not None:
                got = _grads(model)
                if set(got) != set(reference):
                    raise RuntimeError(f"{method} and naive produced gradients for different parameters")
                diffs[method] = max((got[n] - reference[n]).abs().max().item() for n in reference)
    model.zero_grad(set_to_none=True)
    return [{"n_future": cfg.n_future, "method": m, "chunk_size": chunk if m == "mtp_chunked" else None,
             "peak_mb": None if None in peaks[m] else round(max(peaks[m]) / MB, 1),
             "step_s": round(statistics.median(walls[m]), 4), "cpu_s": round(statistics.median(cpus[m]), 4),
             "step_s_all": [round(t, 4) for t in walls[m]], "max_grad_diff": diffs.get(m),
             "params_mb": round(param_bytes(model) / MB, 1), "peak_method": tracker.method} for m in methods]


def bench_memory(vocab_size: int = 32768, d_model: int = 128, n_layer: int = 2, seq_len: int = 256,
                 batch_size: int = 2, head_type: str = "residual", n_futures: list[int] | tuple[int, ...] = (1, 2, 4, 8),
                 repeats: int = 3, chunk_size: int = 64, n_head: int = 4, methods: tuple[str, ...] = MEMORY_METHODS,
                 device: str = "cpu", isolate: bool = True, threads: int | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Peak memory and median time of one training step (forward + backward, no optimizer).

    For each n_future, ``naive`` (all logits (B, T, n, V) then one backward), ``mtp``
    (``mtp_backward``, heads one at a time) and ``mtp_chunked`` (also CE over ``chunk_size``
    positions at a time), interleaved in one fresh process per n_future. Rows carry
    ``peak_mb`` (module doc), ``step_s`` / ``cpu_s`` (median wall / process-CPU seconds of
    ``repeats`` steps), ``max_grad_diff`` (max |grad - naive grad| over all parameters),
    ``peak_vs_n1`` (peak / the same method's at the smallest n_future) and
    ``time_vs_naive`` / ``cpu_vs_naive`` (over naive's at the same n_future).
    """
    for m in methods:
        if m not in MEMORY_METHODS:
            raise MultitokenError(f"invalid method {m!r}; allowed: {', '.join(MEMORY_METHODS)}")
    if repeats < 1:
        raise MultitokenError(f"invalid repeats={repeats}; allowed: an integer >= 1")
    if chunk_size < 1:
        raise MultitokenError(f"invalid chunk_size={chunk_size}; allowed: an integer >= 1")
    if not n_futures or min(n_futures) < 1:
        raise MultitokenError(f"invalid n_future {sorted(n_futures)}; allowed: integers >= 1")
    base = MTPConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head,
                     max_seq_len=max(seq_len, 8), n_future=1, head_type=head_type)
    configs = [base.replace(n_future=n) for n in sorted(set(n_futures))]  # validates every n_future
    methods = sorted(set(methods), key=MEMORY_METHODS.index)  # naive first: the gradient reference
    rows = []
    for cfg in configs:
        spec = {"kind": "memory", "config": cfg.to_dict(), "methods": methods, "chunk_size": chunk_size,
                "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "device": device,
                "threads": threads, "seed": seed}
        for row in run_worker(memory_worker, spec, isolate):
            if progress:
                progress(f"memory n_future={row['n_future']} {row['method']}: {row['peak_mb']} MB, {row['step_s']} s")
            rows.append(row)
    _add_ratios(rows, group="method", baseline_key="n_future", value="peak_mb", out="peak_vs_n1")
    for key, out in (("step_s", "time_vs_naive"), ("cpu_s", "cpu_vs_naive")):
        naive = {r["n_future"]: r[key] for r in rows if r["method"] == "naive"}
        for r in rows:
            t = naive.get(r["n_future"])
            r[out] = round(r[key] / t, 3) if t else None
    settings = {"vocab_size": vocab_size, "d_model": d_model, "n_layer": n_layer, "n_head": n_head,
                "seq_len": seq_len, "batch_size": batch_size, "head_type": head_type, "chunk_size": chunk_size,
                "repeats": repeats, "device": device, "loss": "uniform", "dtype": "float32"}
    method = rows[0]["peak_method"] if rows else PeakMemory(device).method
    return result("memory", rows, settings, device, peak_method_note(method, isolate), threads)




def _add_ratios(rows: list[dict], group: str, baseline_key: str, value: str, out: str) -> None:
    """rows[out] = rows[value] / value of the row with the smallest ``baseline_key`` in its group."""
    first: dict = {}
    for r in sorted(rows, key=lambda r: r[baseline_key]):
        first.setdefault(r[group], r[value])
    for r in rows:
        b = first.get(r[group])
        r[out] = round(r[value] / b, 3) if b and r[value] is not None else None

