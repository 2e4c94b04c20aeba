"""Training-side benchmarks (``multitoken bench memory|train``) and their result tables.

Layout, one section per benchmark so others can be added beside them:

* shared machinery: :func:`machine_info`, :class:`PeakMemory` (peak bytes of a step),
  :func:`run_isolated` (a benchmark worker in a fresh process), :func:`time_steps`;
* ``memory``: :func:`bench_memory`, one training step (forward + backward, no optimizer),
  naive vs memory-efficient MTP backward, for several ``n_future``;
* ``train``: :func:`bench_train`, full training steps (AdamW) of next-token vs MTP training
  for each head type;
* tables: :func:`write_markdown` (one benchmark's table with machine, date and method) and
  :func:`update_readme` (refresh that benchmark's section of ``bench/README.md``).

Every ``bench_*`` returns a *result* dict ``{"benchmark", "date", "machine", "settings",
"rows"}``; ``rows`` is a list of flat dicts (one per measured configuration), which is what
``--json`` writes and ``multitoken report`` reads.

Peak memory on CPU is the growth of the process's resident set during one step: before
each measured step (after model creation and a warm-up step, with gradients freed) the
kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs``; the peak
minus the resident size at that moment is the step's peak. Workers run in a fresh process
started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands every large tensor to
``mmap`` and returns it on free: resident memory then tracks live tensors instead of
allocator caches, and settings measured one after another in that process do not see
each other's garbage. Settings take turns step by step (interleaved), so load from other
processes spreads over all of them. On CUDA the allocator's own ``max_memory_allocated``
is used instead.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from multitoken.measure.analysis import flops_per_token
from multitoken.model.config import MTPConfig
from multitoken.training.loss import MTPLoss, mtp_backward, naive_backward
from multitoken.model.native import MTPModel

MB = 1024 * 1024
# glibc: allocations above this many bytes use mmap and are unmapped on free. Setting it
# also switches off glibc's dynamic threshold, which would otherwise keep freed tensors
# of up to 32 MB in the heap (invisible to a resident-set measurement).
MMAP_THRESHOLD = 65536


# ============================================================================ shared machinery
def machine_info(device: str = "cpu") -> dict:
    """CPU model, core count, memory, torch version and threads (and the GPU, on CUDA)."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}
    if hasattr(os, "getloadavg"):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min: other work on the machine
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict) -> str:
    """One line, e.g. 'AMD EPYC, 2 cores, 23.4 GB RAM, torch 2.13.0+cpu, 2 threads'."""
    if info.get("description"):
        return str(info["description"])
    parts = [info.get("gpu") or "", str(info.get("cpu", "?")), f"{info.get('cores', '?')} cores"]
    if "memory_gb" in info:
        parts.append(f"{info['memory_gb']} GB RAM")
    threads = info.get("threads", "?")
    parts += [f"torch {info.get('torch', '?')}", f"{threads} torch thread{'' if threads == 1 else 's'}"]
    if info.get("load_avg"):
        parts.append("load average " + "/".join(str(x) for x in info["load_avg"]) + " (1/5/15 min)")
    return ", ".join(p for p in parts if p)


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above a baseline, per device.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at ``reset``.
    CPU (Linux): ``VmHWM`` minus ``VmRSS`` at ``reset``, after resetting the high-water mark
    through ``/proc/self/clear_refs``. Where that reset is refused the high-water mark since
    process start is used (still right when the step is the process's largest moment).
    ``method`` says which one ran; ``peak_bytes`` is None where nothing is measurable.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.baseline = 0
        if self.device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif _status_bytes("VmHWM") is not None:
            self.method = "VmHWM - VmRSS (reset via clear_refs)"
        else:
            self.method = "unavailable"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.method != "unavailable":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # 5 = reset the peak resident set size (Linux >= 4.0)
            except OSError:
                self.method = "VmHWM since process start - VmRSS"
            self.baseline = _status_bytes("VmRSS") or 0

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.method == "unavailable":
            return None
        return max(0, (_status_bytes("VmHWM") or 0) - self.baseline)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of ``repeats`` calls of ``step`` (synchronised on CUDA).

    CPU time is reported beside wall time because on a shared machine other processes
    stretch wall time but not (much) the CPU time a step consumes.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return walls, cpus


class BenchWorkerError(RuntimeError):
    """A benchmark worker process failed (its last stderr line is the message)."""


def run_isolated(spec: dict, timeout: float | None = None) -> list[dict]:
    """Run a benchmark worker in a fresh Python process; return its rows.

    The worker is this module run as a script (``python -m multitoken.bench``), fed the
    spec as JSON on stdin, answering one JSON line on stdout.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "multitoken.measure.bench"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output (killed? out of memory?)"])[-1]
        raise BenchWorkerError(f"{spec.get('kind')} benchmark worker exited with status {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def _run(spec: dict, isolate: bool) -> list[dict]:
    return run_isolated(spec) if isolate else WORKERS[spec["kind"]](spec)


def _result(name: str, rows: list[dict], settings: dict, device: str, peak_method: str,
            threads: int | None) -> dict:
    machine = machine_info(device)
    if threads:
        machine["threads"] = threads  # what the worker ran with, not this process's setting
    return {"benchmark": name, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine, "settings": {**settings, "peak_memory": peak_method}, "rows": rows}


def _build_model(cfg: MTPConfig, device: torch.device, seed: int) -> MTPModel:
    """A seeded model whose heads are off their zero init (so every head weight gets a gradient)."""
    torch.manual_seed(seed)
    model = MTPModel(cfg).to(device).train()
    with torch.no_grad():
        for p in model.heads.parameters():
            if p.dim() > 1:
                p.normal_(std=cfg.init_std)
    return model


def _batch(cfg: MTPConfig, batch_size: int, seq_len: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g).to(device)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() is unique


def _peak_method_note(method: str, isolate: bool) -> str:
    if method.startswith("cuda"):
        return "torch.cuda.max_memory_allocated() during the step minus the bytes allocated before it"
    where = ("in a fresh worker process started with MALLOC_MMAP_THRESHOLD_=65536, so every large tensor is "
             "mmap-ed and returned to the OS when freed and resident memory tracks live tensors" if isolate
             else "in the calling process (allocator caches may hide growth: use the default isolated mode)")
    return (f"growth of the resident set during the step ({method}), measured per step with gradients freed "
            f"before it (so they count), after a warm-up step; {where}")


# ============================================================================ memory benchmark
MEMORY_METHODS = ("naive", "mtp", "mtp_chunked")


def _memory_step(method: str, model: MTPModel, loss_fn: MTPLoss, tokens: torch.Tensor, chunk_size: int):
    if method == "naive":
        return naive_backward(model, loss_fn, tokens)
    return mtp_backward(model, loss_fn, tokens, chunk_size=chunk_size if method == "mtp_chunked" else None)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _memory_worker(spec: dict) -> list[dict]:
    """All methods at one n_future on one model, interleaved round by round.

    Every step starts with gradients freed and the peak tracker reset, so each step's peak
    is measured on its own; interleaving the methods spreads machine noise over all of
    them. The first round also compares each method's gradients with the naive step's.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = MTPConfig.from_dict(spec["config"])
    model = _build_model(cfg, device, spec["seed"])
    tokens = _batch(cfg, spec["batch_size"], spec["seq_len"], device, spec["seed"])
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
             "params_mb": round(_param_bytes(model) / MB, 1), "peak_method": tracker.method} for m in methods]


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
            raise ValueError(f"invalid method {m!r}; allowed: {', '.join(MEMORY_METHODS)}")
    if repeats < 1:
        raise ValueError(f"invalid repeats={repeats}; allowed: an integer >= 1")
    if chunk_size < 1:
        raise ValueError(f"invalid chunk_size={chunk_size}; allowed: an integer >= 1")
    base = MTPConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head,
                     max_seq_len=max(seq_len, 8), n_future=1, head_type=head_type)
    configs = [base.replace(n_future=n) for n in sorted(set(n_futures))]  # validates every n_future
    methods = sorted(set(methods), key=MEMORY_METHODS.index)  # naive first: the gradient reference
    rows = []
    for cfg in configs:
        spec = {"kind": "memory", "config": cfg.to_dict(), "methods": methods, "chunk_size": chunk_size,
                "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "device": device,
                "threads": threads, "seed": seed}
        for row in _run(spec, isolate):
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
    return _result("memory", rows, settings, device, _peak_method_note(method, isolate), threads)


def _add_ratios(rows: list[dict], group: str, baseline_key: str, value: str, out: str) -> None:
    """rows[out] = rows[value] / value of the row with the smallest ``baseline_key`` in its group."""
    first: dict = {}
    for r in sorted(rows, key=lambda r: r[baseline_key]):
        first.setdefault(r[group], r[value])
    for r in rows:
        b = first.get(r[group])
        r[out] = round(r[value] / b, 3) if b and r[value] is not None else None


# ============================================================================ train benchmark
def _train_worker(spec: dict) -> list[dict]:
    """All training configurations in one process, one AdamW step each per round, interleaved."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    runs = []
    for entry in spec["plan"]:
        cfg = MTPConfig.from_dict(entry["config"])
        model = _build_model(cfg, device, spec["seed"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        loss_fn = MTPLoss(cfg.n_future, spec["weighting"])
        backward = naive_backward if entry["backward"] == "naive" else mtp_backward
        runs.append((cfg, entry["backward"], model, optimizer, loss_fn, backward))
    tokens = _batch(runs[0][0], spec["batch_size"], spec["seq_len"], device, spec["seed"])

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
    from multitoken.model.config import HEAD_TYPES
    head_types = list(HEAD_TYPES if head_types is None else head_types)
    for head_type in head_types:
        if head_type not in HEAD_TYPES:
            raise ValueError(f"invalid head type {head_type!r}; allowed: {', '.join(HEAD_TYPES)}")
    if backward not in ("mtp", "naive"):
        raise ValueError(f"invalid backward={backward!r}; allowed: mtp, naive")
    if repeats < 1:
        raise ValueError(f"invalid repeats={repeats}; allowed: an integer >= 1")
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
    rows = _run(spec, isolate)
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
    return _result("train", rows, settings, device, _peak_method_note(method, isolate), threads)


WORKERS: dict[str, Callable[[dict], list[dict]]] = {"memory": _memory_worker, "train": _train_worker}


# ============================================================================ tables
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# Per benchmark: (title, [(column header, row key)], explanation). Unknown benchmarks get
# every scalar key of their rows as columns.
TABLES: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "memory": ("Training-step memory: naive vs memory-efficient MTP backward", [
        ("n_future", "n_future"), ("method", "method"), ("peak MB", "peak_mb"), ("peak / n=1", "peak_vs_n1"),
        ("step s", "step_s"), ("time / naive", "time_vs_naive"), ("CPU s", "cpu_s"), ("CPU / naive", "cpu_vs_naive"),
        ("max abs grad diff", "max_grad_diff")],
        "One training step (forward + backward, no optimizer) on random tokens. `naive`: all heads' logits "
        "(B, T, n, V) materialised, one backward. `mtp`: `mtp_backward` (trunk once, heads' logits + CE + backward "
        "one head at a time). `mtp_chunked`: same with CE over chunks of positions. `peak / n=1`: peak over the same "
        "method's n_future=1 peak. `time / naive`: step time over the naive step's at the same n_future. "
        "`max abs grad diff`: largest |gradient - naive gradient| over all parameters. `step s`: median wall-clock "
        "seconds; `CPU s`: median process CPU seconds of the same steps (less disturbed by other load)."),
    "train": ("Training throughput: next-token vs MTP", [
        ("head type", "head_type"), ("n_future", "n_future"), ("backward", "backward"), ("step s", "step_s"),
        ("tokens/s", "tokens_per_s"), ("time / next-token", "time_vs_ntp"), ("CPU s", "cpu_s"),
        ("CPU / next-token", "cpu_vs_ntp"), ("FLOPs / next-token", "flops_vs_ntp"), ("peak MB", "peak_mb"),
        ("params", "params"), ("head params", "head_params")],
        "Full training steps (zero_grad, forward + backward, AdamW step) on random tokens. `time / next-token`: step "
        "time over the first row's (next-token training with the plain backward). Peak memory excludes parameters "
        "and AdamW state (allocated before the baseline) and includes gradients. `FLOPs / next-token`: the analytic "
        "training FLOPs per token (`multitoken analyze`) over next-token training's, for comparison. `step s`: median wall-clock seconds; "
        "`CPU s`: median process CPU seconds of the same steps (less disturbed by other load)."),
}


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def write_markdown(name: str, rows: list[dict] | dict, path: str | Path | None = None,
                   meta: dict | None = None, heading_level: int = 2) -> str:
    """Render one benchmark's markdown table (title, machine, date, settings, method, table).

    ``rows`` is a result dict from a ``bench_*`` function (its machine/date/settings are
    used) or a plain list of rows (then ``meta`` may carry ``machine``/``date``/``settings``;
    the current machine and date are filled in). Writes ``path`` if given; returns the text.
    """
    if isinstance(rows, dict):
        meta, rows = {**rows, **(meta or {})}, rows.get("rows", [])
    meta = dict(meta or {})
    machine = meta.get("machine") or machine_info(meta.get("settings", {}).get("device", "cpu"))
    date = meta.get("date") or _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    title, columns, explanation = TABLES.get(name, (f"{name} benchmark", None, ""))
    if columns is None:
        keys = [k for k in (rows[0] if rows else {}) if not isinstance(rows[0][k], (list, dict))]
        columns = [(k, k) for k in keys]
    settings = meta.get("settings", {})
    peak_note = settings.get("peak_memory")
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "peak_memory")
    hashes = "#" * heading_level
    parts = [f"{hashes} {title}", "",
             f"Machine: {describe_machine(machine)}. Date: {date}.", ""]
    if shown:
        parts += [f"Settings: {shown}.", ""]
    if explanation:
        parts += [explanation, ""]
    if peak_note:
        parts += [f"Peak memory: {peak_note}.", ""]
    parts.append(_table(rows, columns))
    text = "\n".join(parts) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def load_result(path: str | Path) -> dict:
    """A bench JSON file as a result dict (a bare list of rows is wrapped)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"bench file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"bench file {path} is not valid JSON: {e}") from None
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"bench file {path} has no list of rows")
    data.setdefault("benchmark", Path(path).stem)
    return data


README_HEADER = """# Benchmarks

Each section is written by the command quoted under its table (`--readme bench/README.md`) or rebuilt
from the JSON files by `multitoken bench readme`; the JSON files hold every row, the machine and the date.
This machine is shared: wall-clock times move with other processes (see each table's load average); the
`CPU s` columns (process CPU time of the same steps) are less affected, and ratios taken within one table
compare settings that ran interleaved, step by step, in one process.
"""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_readme(path: str | Path, name: str, markdown: str, command: str | None = None) -> str:
    """Replace (or append) the ``name`` section of a README between its markers.

    The section holds ``markdown`` (from :func:`write_markdown`) and the command that
    reproduces it. Other sections and hand-written text are left alone. Returns the README.
    """
    path = Path(path)
    start, end = _markers(name)
    body = markdown.rstrip() + "\n"
    if command:
        body += f"\nReproduce: `{command}`\n"
    section = f"{start}\n{body}{end}"
    text = path.read_text() if path.exists() else README_HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ============================================================================ worker entry point
def _worker_main() -> None:
    spec = json.loads(sys.stdin.read())
    row = WORKERS[spec["kind"]](spec)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    _worker_main()
