"""Which CPU kernel multiplies a decode block through the base's linears, chosen on the running machine.

:class:`~multitoken.hf.kernels.BlockLinear` has two kernels for a block of rows: ``F.linear``
(MKL; for one row a matrix-vector product that streams the weight once) and oneDNN over a
reordered copy of the weight (no repacking per call, so a block of 4-16 rows costs little more
than one). Which wins at 1-3 rows depends on the CPU: oneDNN was the faster for every block on a
2-core AMD EPYC (AVX2), F.linear for blocks of up to 3 rows on a 2-core Xeon (AVX-512). So the
wrapper times whole verify passes of 1..16 tokens with each kernel once per model shape and
machine (a few seconds for SmolLM2-135M) and uses oneDNN from the block size that makes the
summed time over the measured widths least (:func:`choose_min_rows`); the choice is cached like the decode costs
(:func:`multitoken.io.cached_record`, folder ``kernels``).
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import TextIO

import torch

from multitoken.decoding.batch import device_of
from multitoken.decoding.cost import PassTimer
from multitoken.decoding.cost_cache import machine_key
from multitoken.errors import MultitokenError
from multitoken.hf.kernels import MAX_ROWS, ONEDNN_ALWAYS, ONEDNN_NEVER, BlockLinear
from multitoken.io import cached_record

KERNEL_FORMAT = "multitoken-kernels/2"  # /2: the summed-time rule of choose_min_rows
KERNEL_FOLDER = "kernels"
TUNE_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)  # rows of a batch-1 verify pass that are timed


def choose_min_rows(seconds: Mapping[int, tuple[float, float]]) -> int:
    """``seconds[w] = (F.linear, oneDNN)`` seconds of a verify pass of ``w`` rows -> the fewest
    rows from which oneDNN is used: the measured width (or ONEDNN_NEVER) whose policy, F.linear
    below it and oneDNN from it, takes the least time summed over the measured widths. A sum
    rather than "oneDNN wins at every wider width", so one noisy width cannot flip the choice:
    at 16 rows MKL comes within ~5% of oneDNN on a 2-core Xeon, and a rule that needed oneDNN to
    win there once chose F.linear everywhere, 10-20% slower at 4-12 rows."""
    widths = sorted(seconds)

    def total(threshold: int) -> float:
        return sum(seconds[w][1] if w >= threshold else seconds[w][0] for w in widths)

    return min([*widths, ONEDNN_NEVER], key=lambda t: (total(t), -t))  # a tie: the wider threshold


def kernel_key(model) -> dict:
    """What the choice depends on: the machine, and the shapes of the model's BlockLinear layers."""
    shapes = Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, BlockLinear))
    return {"format": KERNEL_FORMAT, **machine_key(device_of(model)),
            "linears": sorted([list(shape), count] for shape, count in shapes.items()),
            "lean_forward": getattr(model, "lean_forward", None) is not None}


@torch.no_grad()
def time_kernels(model, widths=TUNE_WIDTHS, repeats: int = 3) -> dict[int, tuple[float, float]]:
    """Median seconds of batch-1 verify passes of each width with F.linear only and with oneDNN
    only (the two interleaved per width, so drift hits both), through ``model.kernel_min_rows``."""
    prefix = max(1, min(64, model.max_seq_len // 2))
    widths = [w for w in widths if w <= min(MAX_ROWS, model.max_seq_len - prefix - 1)] or [1]
    saved, seconds = model.kernel_min_rows, {}
    model.kernel_min_rows = ONEDNN_NEVER  # the prefill below must not ask for the choice being made
    try:
        timer = PassTimer(model, 1, prefix, max(widths))
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for width in widths:
                pair = []
                for min_rows in (ONEDNN_NEVER, ONEDNN_ALWAYS):
                    model.kernel_min_rows = min_rows
                    pair.append(statistics.median(timer.verify(width, repeats)))
                seconds[width] = (pair[0], pair[1])
    finally:
        model.kernel_min_rows = saved
    return seconds


def tune_min_rows(model, progress: TextIO | None = sys.stderr, **time_kw) -> int:
    """:func:`choose_min_rows` over :func:`time_kernels` of ``model``, with one progress line."""
    start = time.perf_counter()
    if progress is not None:
        print("multitoken: choosing the CPU kernel per decode block size (F.linear or oneDNN), once per machine ...",
              end="", file=progress, flush=True)
    min_rows = choose_min_rows(time_kernels(model, **time_kw))
    if progress is not None:
        where = "never" if min_rows > MAX_ROWS else f"from {min_rows} rows"
        print(f" done in {time.perf_counter() - start:.1f} s (oneDNN {where})", file=progress, flush=True)
    return min_rows


def read_min_rows(record: dict) -> int:
    value = record["min_rows"]
    if not isinstance(value, int) or not ONEDNN_ALWAYS <= value <= ONEDNN_NEVER:
        raise MultitokenError(f"min_rows must be an integer in [{ONEDNN_ALWAYS}, {ONEDNN_NEVER}], got {value!r}")
    return value


def cached_min_rows(model, progress: TextIO | None = sys.stderr, **time_kw) -> int:
    """``model``'s kernel crossover on this machine: from the cache, else tuned and cached."""
    return cached_record(KERNEL_FOLDER, kernel_key(model), lambda: tune_min_rows(model, progress, **time_kw),
                         lambda rows: {"min_rows": rows}, read_min_rows, "kernel choice", progress)
