"""Verify-pass cost by block width: which tree node budget the hardware affords."""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from multitoken.decoding import build_tree, flatten_tree, prior_acceptance
from multitoken.decoding.batch import device_of
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so a wall-clock
    timer around a forward pass measures the pass; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    heads = max(model.n_future - 1, 1)
    trees = {w: flatten_tree(build_tree(prior_acceptance(heads, w), w - 1)) if w > 1 else None for w in widths}
    deepest = max(t.max_depth if t else 0 for t in trees.values())
    if prefix_len < 1 or prefix_len + deepest >= model.max_seq_len:
        raise MultitokenError(f"prefix_len must be in [1, {model.max_seq_len - deepest - 1}] for this model, "
                              f"got {prefix_len}")
    device = device_of(model)
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, model.vocab_size, (batch_size, prefix_len), generator=gen).to(device)
    out = []
    with torch.inference_mode():
        state = model.new_state(batch_size, prefix_len + max(widths) + 1)
        model.verify(state, prefix)
        model.accept(state, None, torch.full((batch_size,), prefix_len, device=device))
        for w in widths:
            t = trees[w]
            block = torch.randint(0, model.vocab_size, (batch_size, w), generator=gen).to(device)
            mask = t.mask.to(device) if t else None
            depths = t.depths.to(device) if t else None
            times = []
            for i in range(repeats + 1):  # the first pass warms up
                sync(device)
                start = time.perf_counter()
                model.verify(state, block, mask, depths)  # nothing is accepted: the cache is unchanged
                sync(device)
                if i:
                    times.append(time.perf_counter() - start)
            out.append({"width": w, "seconds": statistics.median(times), "min_seconds": min(times)})
    smallest = min(out, key=lambda r: r["width"])["seconds"]
    for r in out:
        r["relative"] = r["seconds"] / smallest if smallest > 0 else float("nan")
    return out
