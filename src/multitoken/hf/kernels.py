"""A faster CPU path for the base model's linear layers while decoding.

Every decoding pass pushes a block of W = 1..16 new tokens per batch row through every
``nn.Linear`` of the base. On CPU, ``F.linear(x, weight)`` with one row streams the weight once, but from two rows on
MKL switches to a general matrix product that repacks the weight on every call and costs
1.5-2.5x the one-row time, which eats most of what multi-token decoding gains. oneDNN with the
weight reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what
``torch.compile``'s CPU freezing uses) keeps the small-block cost close to one weight stream.
Measured on a 2-core AMD EPYC (torch 2.13) over SmolLM2-135M's 211 linears:
``bench/smollm2/block_kernels.md``.

The reordered copy doubles the memory held by the linear weights. Results are float32 sums in
another order (last-bit differences, like any batched verify pass), never bitwise-promised.
Outside :func:`block_kernels`, with gradients enabled, for more than ``MAX_ROWS`` rows (a
prefill), for fewer than the block's ``min_rows`` or off CPU the layer is exactly ``F.linear``,
so Hugging Face ``generate`` on the same model is untouched. Where MKL's one-row product is the
faster kernel depends on the CPU: on a 2-core AVX-512 Xeon F.linear won up to 3 rows (a one-token
SmolLM2 pass 28 ms against 35 ms through oneDNN) and oneDNN from 4 (40 against 44 ms);
:mod:`multitoken.hf.kernel_choice` measures the crossover once per machine.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Above this (a prefill) MKL's general matrix product is the right kernel again. A batched verify
# pass has B x W rows (8 rows of a 4-token chain = 32): in a one-thread timing of SmolLM2-sized
# linears (576x576, 576x1536, 1536x576) the reordered weight was as fast or faster up to 64 rows
# and level with MKL at 128.
MAX_ROWS = 64
ONEDNN_ALWAYS, ONEDNN_NEVER = 1, MAX_ROWS + 1  # min_rows of block_kernels: every block / none
_active = threading.local()


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class BlockLinear(nn.Linear):
    """``nn.Linear`` that, while :func:`block_kernels` is active, multiplies blocks of up to
    MAX_ROWS rows with a oneDNN-reordered copy of its weight. Same parameters, same state dict."""

    _packed: Tensor | None = None
    _packed_version: int = -1

    def packed_weight(self) -> Tensor:
        """The reordered weight, rebuilt whenever the weight was modified in place."""
        if self._packed is None or self._packed_version != self.weight._version:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 4)
            self._packed_version = self.weight._version
        return self._packed

    def __getstate__(self) -> dict:
        """Copies and pickles leave the reordered weight out (an opaque oneDNN tensor that cannot
        be serialised); it is rebuilt on first use."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_version")}

    def forward(self, x: Tensor) -> Tensor:
        if not uses_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of ``x`` (..., d_in) with ``weight`` takes the reordered oneDNN weight:
    inside :func:`block_kernels`, no gradients, float32 on CPU, min_rows..MAX_ROWS rows."""
    rows = x.numel() // max(1, x.shape[-1])
    return getattr(_active, "on", False) and _active.min_rows <= rows <= MAX_ROWS and not torch.is_grad_enabled() \
        and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32


class FusedBlockLinears:
    """Linears that read the same input (a layer's q/k/v projections, an MLP's gate and up; or
    one linear alone) as one product: where :class:`BlockLinear` would take oneDNN, one call over
    their concatenated, reordered weights (one weight stream and one call instead of several:
    whole SmolLM2 verify passes 4-6% faster at 4-16 rows, ``bench/smollm2/NOTES.md`` section 9);
    otherwise each layer's F.linear (MKL's one-row product), or, for a layer that is not a
    BlockLinear (e.g. a LoRA wrapper), the module itself. The
    concatenated copy takes the place of the layers' own reordered copies, which this path never
    builds, and is rebuilt when any weight changes in place."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = list(layers)
        biases = [getattr(layer, "bias", None) for layer in self.layers]
        self.fusable = available() and all(type(layer) is BlockLinear for layer in self.layers) \
            and (all(b is None for b in biases) or all(b is not None for b in biases))
        self.sizes = [layer.weight.shape[0] for layer in self.layers] if self.fusable else []
        self._packed: tuple[Tensor, Tensor | None] | None = None
        self._key: tuple = ()

    def _weights(self) -> tuple[Tensor, Tensor | None]:
        params = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)  # replaced, reassigned or modified
        if self._packed is None or key != self._key:
            with torch.no_grad():
                weight = torch.cat([layer.weight.detach() for layer in self.layers])
                bias = None if self.layers[0].bias is None else torch.cat([layer.bias.detach() for layer in self.layers])
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, 4), bias
            self._key = key
        return self._packed

    def __getstate__(self) -> dict:
        """Copies and pickles leave the opaque reordered weight out; it is rebuilt on first use."""
        return {**self.__dict__, "_packed": None, "_key": ()}

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (..., d_in) -> each layer's output (..., d_out_i)."""
        if not self.fusable:
            return tuple(layer(x) for layer in self.layers)
        if not uses_onednn(x, self.layers[0].weight):  # what each BlockLinear would do, minus its module call
            return tuple(F.linear(x, layer.weight, layer.bias) for layer in self.layers)
        weight, bias = self._weights()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "").split(self.sizes, dim=-1)


def install_block_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`BlockLinear` in place (no copy
    until first used). Returns how many layers are BlockLinear. Idempotent; does nothing (returns
    0) where oneDNN is missing."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = BlockLinear
        count += isinstance(module, BlockLinear)
    return count


@contextlib.contextmanager
def block_kernels(enabled: bool = True, min_rows: int = ONEDNN_ALWAYS):
    """While active (and ``enabled``), BlockLinear layers multiply blocks of ``min_rows`` to
    MAX_ROWS rows with the reordered weight (fewer or more: F.linear)."""
    before = getattr(_active, "on", False), getattr(_active, "min_rows", ONEDNN_ALWAYS)
    _active.on, _active.min_rows = enabled, min_rows
    try:
        yield
    finally:
        _active.on, _active.min_rows = before
