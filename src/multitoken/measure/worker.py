"""What the training-side benchmarks (``bench memory``, ``bench train``) share: peak memory of a
step, step timing, a worker in a fresh process, seeded models and batches, the result dict.

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

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from multitoken.measure.machine import machine_info, proc_field, timestamp
from multitoken.decoding.cost import sync
from multitoken.model.config import MTPConfig
from multitoken.model.native import MTPModel

Worker = Callable[[dict], list]
MB = 1024 * 1024
# glibc: allocations above this many bytes use mmap and are unmapped on free. Setting it
# also switches off glibc's dynamic threshold, which would otherwise keep freed tensors
# of up to 32 MB in the heap (invisible to a resident-set measurement).
MMAP_THRESHOLD = 65536


def _status_bytes(key: str) -> int | None:
    value = proc_field("/proc/self/status", key + ":")
    return int(value.split()[0]) * 1024 if value else None  # reported in kB


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




def time_steps(step: Callable[[], None], repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of ``repeats`` calls of ``step`` (synchronised on CUDA).

    CPU time is reported beside wall time because on a shared machine other processes
    stretch wall time but not (much) the CPU time a step consumes.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return walls, cpus


class BenchWorkerError(RuntimeError):
    """A benchmark worker process failed (its last stderr line is the message)."""


def worker_name(worker: Worker) -> str:
    """``module:function`` of a worker, what a fresh process imports it by."""
    return f"{worker.__module__}:{worker.__name__}"


def run_worker(worker: Worker, spec: dict, isolate: bool = True, timeout: float | None = None) -> list[dict]:
    """``worker(spec)``'s rows, computed in a fresh Python process (``isolate``) or in this one.

    The fresh process is this module run as a script, fed ``{"worker": "module:function",
    "spec": spec}`` as JSON on stdin, answering one JSON line on stdout.
    """
    if not isolate:
        return worker(spec)
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "multitoken.measure.worker"],
                          input=json.dumps({"worker": worker_name(worker), "spec": spec}),
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output (killed? out of memory?)"])[-1]
        raise BenchWorkerError(f"{spec.get('kind')} benchmark worker exited with status {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def result(name: str, rows: list[dict], settings: dict, device: str, peak_method: str,
           threads: int | None) -> dict:
    """The result dict of one benchmark (module doc), with this machine and the time now."""
    machine = machine_info(device)
    if threads:
        machine["threads"] = threads  # what the worker ran with, not this process's setting
    return {"benchmark": name, "date": timestamp(),
            "machine": machine, "settings": {**settings, "peak_memory": peak_method}, "rows": rows}


def build_model(cfg: MTPConfig, device: torch.device, seed: int) -> MTPModel:
    """A seeded model whose heads are off their zero init (so every head weight gets a gradient)."""
    torch.manual_seed(seed)
    model = MTPModel(cfg).to(device).train()
    with torch.no_grad():
        for p in model.heads.parameters():
            if p.dim() > 1:
                p.normal_(std=cfg.init_std)
    return model


def batch(cfg: MTPConfig, batch_size: int, seq_len: int, device: torch.device, seed: int) -> torch.Tensor:
    """Seeded random tokens (batch_size, seq_len) on ``device``."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g).to(device)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() is unique


def peak_method_note(method: str, isolate: bool) -> str:
    """How peak memory was measured, in words (the result's ``settings.peak_memory``)."""
    if method.startswith("cuda"):
        return "torch.cuda.max_memory_allocated() during the step minus the bytes allocated before it"
    where = ("in a fresh worker process started with MALLOC_MMAP_THRESHOLD_=65536, so every large tensor is "
             "mmap-ed and returned to the OS when freed and resident memory tracks live tensors" if isolate
             else "in the calling process (allocator caches may hide growth: use the default isolated mode)")
    return (f"growth of the resident set during the step ({method}), measured per step with gradients freed "
            f"before it (so they count), after a warm-up step; {where}")




def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    module, name = job["worker"].split(":")
    rows = getattr(importlib.import_module(module), name)(job["spec"])
    print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    _worker_main()
