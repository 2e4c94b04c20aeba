"""``multitoken bench train``: full training steps (AdamW) of next-token vs MTP training for each
head type (measurement: :mod:`multitoken.measure.worker`)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from multitoken.errors import MultitokenError
from multitoken.measure.analysis import flops_per_token
from multitoken.measure.worker import (MB, PeakMemory, batch, build_model, peak_method_note, result, run_worker,
                                       time_steps)
from multitoken.model.config import HEAD_TYPES, MTPConfig
from multitoken.training import MTPLoss, mtp_backward, naive_backward

def train_worker(spec: dict) -> list[dict]:
    """All training configurations in one process, one AdamW step each per round, interleaved."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    runs = []
    for entry in spec["plan"]:
        cfg = MTPConfig.from_dict(entry["config"])
        model = build_model(cfg, device, spec["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        loss_fn = MTPLoss(cfg.n_future, spec["weighting"])
        backward = naive_backward if entry["backward"] == "naive" else mtp_backward
        runs.append((cfg, entry["backward"], model, optimizer, loss_fn, backward))
    tokens = batch(runs[0][0], spec["batch_size"], spec["seq_len"], device, spec["seed"])

    def step(run) -> None:
        _, _, model, optimizer, loss_fn, backward = run
        backward(model, loss_fn, tokens)
        optimizer.step()

    for run in runs:  # warm-up; also allocates AdamW's state (part of the baseline)
        step(run)
        run[3].zero_grad(set_to_none=True)
    tracker = PeakMemory(device)
    peaks, walls, cpus = ([[] for _ in runs] for _ in range(3))
    for _ in range(spec["repeats"]):
        for i, run in enumerate(runs):
            run[3].zero_grad(set_to_none=True)  # gradients are allocated inside every step
            tracker.reset()
            wall, cpu = time_steps(lambda: step(run), 1, device)
            peaks[i].append(tracker.peak_bytes())
            walls[i] += wall
            cpus[i] += cpu
            run[3].zero_grad(set_to_none=True)
    rows = []
    for i, (cfg, how, model, *_rest) in enumerate(runs):
        counts = model.num_parameters()
        step_s = statistics.median(walls[i])
        rows.append({"head_type": cfg.head_type if cfg.n_future > 1 else "-", "n_future": cfg.n_future,
                     "backward": how, "step_s": round(step_s, 6), "cpu_s": round(statistics.median(cpus[i]), 6),
                     "step_s_all": [round(t, 4) for t in walls[i]],
                     "tokens_per_s": round(spec["batch_size"] * spec["seq_len"] / step_s, 1),
                     "peak_mb": None if None in peaks[i] else round(max(peaks[i]) / MB, 1),
                     "params": counts["total"], "head_params": counts["heads"], "peak_method": tracker.method})
    return rows


def bench_train(vocab_size: int = 257, d_model: int = 256, n_layer: int = 4, n_head: int = 4,
                seq_len: int = 256, batch_size: int = 8, head_types: list[str] | tuple[str, ...] | None = None,
                n_futures: list[int] | tuple[int, ...] = (2, 4), backward: str = "mtp", repeats: int = 3,
                weighting: str = "uniform", device: str = "cpu", isolate: bool = True, threads: int | None = None,
                seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Training-step cost (AdamW included) of next-token vs MTP training on one config.

    Rows: next-token training (n_future=1) with the plain backward (``naive``: logits, CE,
    one backward) and with ``mtp_backward``, then every head type x ``n_futures`` with
    ``backward`` ("mtp" = memory-efficient, or "naive"). All configurations live in one
    fresh process and take turns, one step each per round (so load from other processes
    hits all alike). Each row has ``step_s`` / ``cpu_s`` (median wall / process-CPU
    seconds), ``tokens_per_s``, ``peak_mb`` (growth during a step above the state before
    it: parameters and AdamW state excluded, gradients included) and ``time_vs_ntp`` /
    ``cpu_vs_ntp`` (over the naive next-token step's). Defaults: the ``small`` preset.
    """
    head_types = list(HEAD_TYPES if head_types is None else head_types)
    for head_type in head_types:
        if head_type not in HEAD_TYPES:
            raise MultitokenError(f"invalid head type {head_type!r}; allowed: {', '.join(HEAD_TYPES)}")
    if backward not in ("mtp", "naive"):
        raise MultitokenError(f"invalid backward={backward!r}; allowed: mtp, naive")
    if repeats < 1:
        raise MultitokenError(f"invalid repeats={repeats}; allowed: an integer >= 1")
    base = MTPConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head,
                     max_seq_len=max(seq_len, 8), n_future=1)
    plan = [{"config": base.to_dict(), "backward": "naive"}, {"config": base.to_dict(), "backward": "mtp"}]
    for head_type in head_types:
        for n in sorted(set(n_futures)):
            if n > 1:
                cfg = base.replace(n_future=n, head_type=head_type, share_embeddings=None)
                plan.append({"config": cfg.to_dict(), "backward": backward})
    spec = {"kind": "train", "plan": plan, "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
            "device": device, "threads": threads, "seed": seed, "weighting": weighting}
    if progress:
        progress(f"train: {len(plan)} settings x {repeats + 1} steps, interleaved in one worker process ...")
    rows = run_worker(train_worker, spec, isolate)
    for row in rows:
        if progress:
            progress(f"train {row['head_type']} n_future={row['n_future']} {row['backward']}: {row['step_s']} s")
    for key, out in (("step_s", "time_vs_ntp"), ("cpu_s", "cpu_vs_ntp")):
        for r in rows:
            r[out] = round(r[key] / rows[0][key], 3) if rows[0][key] else None
    base_flops = flops_per_token(base, seq_len)["train_flops_with_heads"]
    for r, entry in zip(rows, plan):  # the analytic expectation beside the measurement
        cfg = MTPConfig.from_dict(entry["config"])
        r["flops_vs_ntp"] = round(flops_per_token(cfg, seq_len)["train_flops_with_heads"] / base_flops, 3)
    settings = {"vocab_size": vocab_size, "d_model": d_model, "n_layer": n_layer, "n_head": n_head,
                "seq_len": seq_len, "batch_size": batch_size, "backward": backward, "optimizer": "AdamW",
                "weighting": weighting, "repeats": repeats, "device": device, "dtype": "float32"}
    method = rows[0]["peak_method"] if rows else PeakMemory(device).method
    return result("train", rows, settings, device, peak_method_note(method, isolate), threads)
