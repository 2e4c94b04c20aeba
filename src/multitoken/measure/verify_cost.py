"""Verify-pass cost by block width: which tree node budget the hardware affords (the
benchmark's table; decoding's own calibration, :mod:`multitoken.decoding.cost`, shares the timing core)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from multitoken.decoding.cost import PassTimer
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel

__all__ = ["verify_cost_by_width"]


@torch.no_grad()
def verify_cost_by_width(model: MTPDecoderModel, widths: Sequence[int], prefix_len: int = 128, repeats: int = 5,
                         batch_size: int = 1, seed: int = 0) -> list[dict]:
    """Seconds of one tree verify pass of W nodes (root included) over a committed prefix of
    ``prefix_len`` tokens, for W in widths: which node budget the hardware affords.

    The tree for W nodes is the prior-built tree of W - 1 draft nodes (so masks and depths
    look like real ones). Returns rows {"width", "seconds" (median), "min_seconds",
    "relative" (to the smallest width)} in the order given.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise MultitokenError(f"widths must be integers >= 1, got {widths}")
    if repeats < 1:
        raise MultitokenError(f"repeats must be >= 1, got {repeats}")
    out = []
    with torch.inference_mode():
        timer = PassTimer(model, batch_size, prefix_len, max(widths), seed)
        for w in widths:
            times = timer.verify(w, repeats)
            out.append({"width": w, "seconds": statistics.median(times), "min_seconds": min(times)})
    smallest = min(out, key=lambda r: r["width"])["seconds"]
    for r in out:
        r["relative"] = r["seconds"] / smallest if smallest > 0 else float("nan")
    return out
