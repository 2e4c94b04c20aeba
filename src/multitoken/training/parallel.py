"""The trainer's hooks into data parallelism, and their one-process implementation.

:class:`SingleProcess` is what the trainer holds when it runs in one process: every hook is the
plain single-device operation (no context, no collective), so the training step reads the same
with or without ``--parallel``. The DDP and FSDP2 wrappers in :mod:`multitoken.training.sharding`
override these hooks; only :mod:`multitoken.training.distributed` builds them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn


class SingleProcess:
    """One process, one device. ``module`` is the model the trainer keeps."""

    kind = "none"
    collective = False  # True: checkpoints and stop decisions need every rank to take part

    def __init__(self, module: nn.Module):
        self.module = module

    # ------------------------------------------------------------------ one optimizer step
    def train_model(self, model: Any) -> Any:
        """What the backward helpers should call instead of ``model``."""
        return model

    def step_context(self) -> ContextManager[None]:
        """Around all micro-batches of one optimizer step."""
        return contextlib.nullcontext()

    def micro_batch(self, last: bool) -> ContextManager[None]:
        """Around one micro-batch's forward/backward; ``last`` for the step's final one."""
        return contextlib.nullcontext()

    def sync_gradients(self) -> None:
        """After the step's backward passes: make every rank hold the global mean gradient."""

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm and return it."""
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    # ------------------------------------------------------------------ values across ranks
    def mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over ranks of every tensor in ``values`` (e.g. step metrics)."""
        return dict(values)

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks (e.g. validation sums)."""
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a stop request)."""
        return bool(flag)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The whole model to save (``build()`` makes an empty one where weights must be gathered
        into it); None on ranks that do not write. Collective when ``collective``."""
        return self.module

    def load_weights(self, load: Callable[[nn.Module], None], build: Callable[[], nn.Module]) -> None:
        """Load saved whole-model weights with ``load(model)`` (sharded models load into ``build()``
        first, then take their shard)."""
        load(self.module)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer state in single-process layout (None on ranks that do not write)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a single-process-layout optimizer state."""
        optimizer.load_state_dict(state)
