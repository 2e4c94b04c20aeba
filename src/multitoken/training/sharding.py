"""DDP and FSDP2 wrappers: the trainer's data-parallel hooks (:class:`~multitoken.training.parallel.SingleProcess`'s
interface) for a model trained on several ranks.

:func:`wrap_model` returns a :class:`ParallelModel`: the trainer's hooks into one optimizer step
(``step_context``, ``micro_batch``, ``sync_gradients``, ``clip_grad_norm_``), values across ranks,
and consolidated state dicts for checkpoints.

Why the step needs care: ``loss.mtp_backward`` calls ``backward`` once per head (into detached
hidden states) and once more through heads and trunk, and with gradient accumulation it does so
for every micro-batch. Letting the wrappers reduce gradients on every one of those backward calls
would reduce ``(n_future + 1) * grad_accum`` times per step. Instead:

- **DDP**: the wrapper is built (it broadcasts rank 0's parameters and buffers, so every rank starts
  from the same weights) but the whole step runs under ``no_sync()`` and the trainer calls the
  model's own methods (``head_hiddens``/``head_logits``), which DDP's one-forward-one-backward
  reducer does not see. :meth:`DDPModel.sync_gradients` then all-reduces the accumulated gradients
  once per optimizer step, in flat buckets, and divides by the world size.
- **FSDP2**: every trunk block and every head block/MLP is its own ``fully_shard`` unit, plus the
  root (embedding, final norm, unembedding and the small head parts). ``head_hiddens`` and
  ``head_logits`` are registered as FSDP forward methods, so they all-gather what they use.
  Gradient sync is off (``set_requires_gradient_sync(False)``: gradients accumulate unsharded)
  until the *last* backward of the step, the trunk backward of the last micro-batch: an identity
  autograd function on the hidden states that trunk backward starts from switches sync (and
  ``set_is_last_backward``) on as that backward begins, so each unit reduce-scatters exactly once
  per optimizer step, the already accumulated head-pass gradients included. Parameters used only
  by the per-head passes (the independent unembeddings of ``linear`` heads) therefore stay in the
  root unit, whose reduction runs at the end of that last backward.

Checkpoints are consolidated: rank 0 receives full, CPU-resident weights and optimizer state in
the ordinary single-process layout (``optimizer.state_dict()``'s integer parameter ids), so a
checkpoint written by N ranks loads and resumes in one process, and vice versa.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from multitoken.training.distributed import (
    DistEnv, DistributedError, all_reduce_mean_dict, all_reduce_sum, any_rank, init_distributed,
)
from multitoken.training.parallel import SingleProcess

PARALLEL = ("ddp", "fsdp")
_BUCKET_BYTES = 25 * 2**20  # flat all-reduce buckets (DDP's default bucket size)


class ParallelModel(SingleProcess):
    """A data-parallel wrapper. ``module`` is the model the trainer keeps (plain under DDP; the
    ``fully_shard``-ed module itself under FSDP2). Checkpoint hooks are collective: every rank
    calls them, rank 0 alone gets what is written."""

    collective = True

    def __init__(self, module: nn.Module, env: DistEnv):
        super().__init__(module)
        self.env = env

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm (over all ranks' shards) and return it."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norm = _full(norm)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        return all_reduce_mean_dict(values)

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t)

    def any_rank(self, flag: bool) -> bool:
        return any_rank(flag)

    def checkpoint_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """Every rank holds the whole model (DDP): rank 0's is saved."""
        return self.module if self.env.is_main else None

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The full optimizer state on the CPU in single-process layout on rank 0, None elsewhere.
        Collective (every rank must call it)."""
        sd = optimizer.state_dict()
        state = {pid: {k: _to_cpu_full(v) for k, v in st.items()} for pid, st in sorted(sd["state"].items())}
        return {"state": state, "param_groups": sd["param_groups"]} if self.env.is_main else None


class DDPModel(ParallelModel):
    """DistributedDataParallel, with one manual gradient all-reduce per optimizer step."""

    kind = "ddp"

    def __init__(self, module: nn.Module, env: DistEnv):
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(module, env)
        # Broadcasts rank 0's parameters and buffers (identical start on every rank) and checks
        # that all ranks hold the same parameter shapes.
        self.ddp = DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        with self.ddp.no_sync():  # the reducer stays idle; sync_gradients reduces once per step
            yield

    def sync_gradients(self) -> None:
        world = self.env.world_size
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused this step: every rank must still join each collective
                p.grad = torch.zeros_like(p)
        if world == 1:
            return
        for bucket in _buckets(params):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG: sum, then divide
            flat.div_(world)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

class _SyncAtBackward(torch.autograd.Function):
    """Identity whose backward runs ``callback`` first: marks the start of the trunk backward."""

    @staticmethod
    def forward(ctx, x: Tensor, callback) -> Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.callback()
        return grad, None


class _FSDPTrainModel:
    """What ``mtp_backward``/``naive_backward`` call under FSDP2: the sharded model's methods,
    with the hidden states of the step's last micro-batch tagged so that gradient sync switches
    on when the trunk backward starts."""

    def __init__(self, owner: "FSDPModel", model: Any):
        self._owner, self._model = owner, model

    def head_hiddens(self, tokens: Tensor) -> list[Tensor]:
        hiddens = self._model.head_hiddens(tokens)
        if not self._owner._last_micro or not torch.is_grad_enabled():
            return hiddens
        return [_SyncAtBackward.apply(g, self._owner._enable_sync) if g.requires_grad else g for g in hiddens]

    def head_logits(self, i: int, g: Tensor) -> Tensor:
        return self._model.head_logits(i, g)

    def __call__(self, tokens: Tensor) -> Tensor:  # naive_backward: one backward per micro-batch
        return self._model(tokens)


class FSDPModel(ParallelModel):
    """FSDP2 ``fully_shard`` per trunk block, per head block/MLP, plus the root."""

    kind = "fsdp"

    def __init__(self, module: nn.Module, env: DistEnv, one_backward: bool = False):
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        super().__init__(module, env)
        self._one_backward = one_backward  # naive_backward: one backward per micro-batch
        for unit in shard_units(module):
            fully_shard(unit, mesh=env.mesh)
        fully_shard(module, mesh=env.mesh)
        for name in ("head_hiddens", "head_logits"):
            register_fsdp_forward_method(module, name)
        self._last_micro = True

    def train_model(self, model: Any) -> Any:
        if model is not self.module:
            raise DistributedError("torch.compile is not supported with FSDP here; drop --compile or use "
                                   "--parallel ddp")
        return _FSDPTrainModel(self, model)

    def _set_sync(self, on: bool) -> None:
        self.module.set_requires_gradient_sync(on)
        self.module.set_is_last_backward(on)

    def _enable_sync(self) -> None:
        self._set_sync(True)

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        self._set_sync(False)
        try:
            yield
        finally:
            self._set_sync(True)
            self._last_micro = True

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self._last_micro = last
        if last and self._one_backward:
            self._set_sync(True)  # naive_backward: the micro-batch's one backward is the step's last
        yield

    def checkpoint_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The shards gathered into ``build()`` on rank 0 (a collective; None on the others)."""
        full = self.full_state_dict()  # full CPU tensors on rank 0, {} elsewhere
        if not self.env.is_main:
            return None
        model = build()
        model.load_state_dict(full)
        return model

    def load_weights(self, load: Callable[[nn.Module], None], build: Callable[[], nn.Module]) -> None:
        plain = build()  # checked and loaded whole, then sharded
        load(plain)
        self.load_full_state_dict(plain.state_dict())

    def full_state_dict(self) -> dict[str, Tensor]:
        """Consolidated weights on the CPU on rank 0 (``{}`` on the other ranks). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load consolidated weights (every rank passes the same full dict). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        local: dict = {"param_groups": state["param_groups"], "state": {}}
        for pid, st in state["state"].items():
            p = params[int(pid)]
            out = {}
            for k, v in st.items():
                if isinstance(p, DTensor) and isinstance(v, Tensor) and tuple(v.shape) == tuple(p.shape):
                    # Every rank holds the full tensor: each keeps its own shard, no communication.
                    v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                out[k] = v
            local["state"][pid] = out
        optimizer.load_state_dict(local)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards separately (the root takes the rest): each trunk block and each
    head's block or MLP. Each is called once per forward, and all of them receive gradients in
    the trunk backward only. (A module called several times per forward, such as the shared
    ``modulated`` transform, would reduce once per call, so it stays in the root.)"""
    units = list(getattr(model, "layers", []))
    heads = getattr(model, "heads", None)
    if heads is not None:
        units += list(getattr(heads, "mlps", []))
        units += list(getattr(heads, "blocks", []))
        units += [m.block for m in getattr(heads, "modules_", [])]
    return units


def wrap_model(model: nn.Module, parallel: str, env: DistEnv | None = None, *,
               one_backward: bool = False) -> ParallelModel:
    """Wrap ``model`` (already on ``env.device``) for data-parallel training.

    ``parallel``: ``ddp`` (full replica per rank) or ``fsdp`` (FSDP2 ``fully_shard`` per block and
    per head module plus the root). ``one_backward``: the trainer runs one backward per
    micro-batch (``naive_backward``) instead of ``mtp_backward``'s several. Build the optimizer
    *after* this call: FSDP2 replaces the parameters by sharded DTensors."""
    if parallel not in PARALLEL:
        raise DistributedError(f"unknown parallel mode {parallel!r}; allowed: {', '.join(PARALLEL)}")
    env = env or init_distributed(str(next(model.parameters()).device.type))
    return DDPModel(model, env) if parallel == "ddp" else FSDPModel(model, env, one_backward)


# =========================================================================== helpers


def _full(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _to_cpu_full(v: Any) -> Any:
    """A full (all-gathered) CPU copy of an optimizer state value. Collective for DTensors."""
    v = _full(v)
    return v.detach().cpu().clone() if isinstance(v, Tensor) else v


def _buckets(params: Iterable[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Consecutive parameters grouped by (device, dtype) into buckets of at most _BUCKET_BYTES."""
    bucket: list[nn.Parameter] = []
    size, key = 0, None
    for p in params:
        k = (p.grad.device, p.grad.dtype)
        nbytes = p.grad.numel() * p.grad.element_size()
        if bucket and (k != key or size + nbytes > _BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
        key = k
    if bucket:
        yield bucket
