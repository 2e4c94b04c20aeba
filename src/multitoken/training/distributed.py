"""Data-parallel training on ``torch.distributed``: DDP or FSDP2 ``fully_shard``, launched by torchrun.

Only the trainer imports this module (DESIGN.md: distributed wrapping is imported by the trainer
alone); the single-process path never touches it.

- :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``), picks the device (``cuda:LOCAL_RANK`` on GPUs, else the CPU) and
  the backend (nccl on CUDA, gloo on CPU), and builds a 1-D device mesh. Without torchrun's
  variables it starts a one-process group on a free loopback port (handy for tests).
- :func:`wrap_model` returns a :class:`ParallelModel`: the trainer's hooks into one optimizer step
  (:meth:`~ParallelModel.step_context`, :meth:`~ParallelModel.micro_batch`,
  :meth:`~ParallelModel.sync_gradients`, :meth:`~ParallelModel.clip_grad_norm_`) and consolidated
  state dicts for checkpoints (:meth:`~ParallelModel.full_state_dict`,
  :meth:`~ParallelModel.optimizer_state_dict` and their loaders).

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
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

PARALLEL = ("ddp", "fsdp")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_BUCKET_BYTES = 25 * 2**20  # flat all-reduce buckets (DDP's default bucket size)


class DistributedError(ValueError):
    """Bad distributed setup (a one-line message for the CLI)."""


# =========================================================================== process group


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank
    world_size: int  # number of processes
    local_rank: int  # rank on this node (selects the GPU)
    device: torch.device  # this rank's device
    backend: str  # nccl | gloo
    mesh: Any  # the 1-D DeviceMesh over all ranks (FSDP2 shards over it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (a small race is possible, as with torchrun)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int_env(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"torchrun variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"torchrun variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join (or create) the default process group and return this rank's :class:`DistEnv`.

    ``device``: the TrainConfig device. ``auto``/``cuda``/``cuda:N`` mean one GPU per process,
    ``cuda:LOCAL_RANK`` (torchrun's convention; with CUDA ``auto`` picks it), ``cpu`` the CPU.
    Backend: nccl for CUDA, gloo for the CPU. Idempotent: a second call returns the same env."""
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")
    if launched_by_torchrun():
        rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
        local_rank = _int_env("LOCAL_RANK", 0)
        init_method = "env://"
        for v in ("MASTER_ADDR", "MASTER_PORT"):
            if v not in os.environ:
                raise DistributedError(f"torchrun variable {v} is not set (launch with torchrun)")
    else:  # a one-process group: the same code path as N ranks, for tests and quick checks
        rank, world, local_rank = 0, 1, 0
        init_method = f"tcp://127.0.0.1:{free_port()}"
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is out of range for WORLD_SIZE={world}")
    if device == "mps" or device.startswith("mps"):
        raise DistributedError("distributed training needs CUDA (nccl) or the CPU (gloo); MPS has no backend")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"device={device!r} but CUDA is not available; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                                   "GPUs; use --nproc-per-node <= the GPU count")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        if not dist.is_gloo_available():
            raise DistributedError("CPU training on several processes needs the gloo backend, which this "
                                   "PyTorch build lacks")
    if not dist.is_initialized():
        kw = dict(device_id=dev) if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistEnv(rank, world, local_rank, dev, backend, mesh)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor on t's device; ``t`` itself is untouched)."""
    if get_world_size() == 1:
        return t.clone()
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (floating point)."""
    return all_reduce_sum(t.float() if not t.is_floating_point() else t) / get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop request)."""
    if get_world_size() == 1:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


# =========================================================================== wrappers


class ParallelModel:
    """What the trainer needs from a data-parallel wrapper. ``module`` is the model the trainer
    keeps (plain under DDP; the ``fully_shard``-ed module itself under FSDP2)."""

    kind = "none"

    def __init__(self, module: nn.Module, env: DistEnv):
        self.module, self.env = module, env

    # ------------------------------------------------------------------ one optimizer step
    def train_model(self, model: Any) -> Any:
        """What the backward helpers should call instead of ``model``."""
        return model

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        """Around all micro-batches of one optimizer step."""
        yield

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward/backward; ``last`` for the step's final one."""
        yield

    def sync_gradients(self) -> None:
        """After the step's backward passes: make every rank hold the global mean gradient."""

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm (over all ranks' shards) and return it."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norm = _full(norm)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict[str, Tensor]:
        """Consolidated weights on the CPU on rank 0 (``{}`` on the other ranks). Collective."""
        raise NotImplementedError

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load consolidated weights (every rank passes the same full dict). Collective under FSDP."""
        raise NotImplementedError

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The full optimizer state on the CPU in single-process layout on rank 0, None elsewhere.
        Collective (every rank must call it)."""
        sd = optimizer.state_dict()
        state = {pid: {k: _to_cpu_full(v) for k, v in st.items()} for pid, st in sorted(sd["state"].items())}
        return {"state": state, "param_groups": sd["param_groups"]} if self.env.is_main else None

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a single-process-layout optimizer state (every rank passes the same dict)."""
        optimizer.load_state_dict(state)


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

    def full_state_dict(self) -> dict[str, Tensor]:
        if not self.env.is_main:
            return {}
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


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

    def full_state_dict(self) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
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


def all_reduce_mean_dict(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mean over ranks of every tensor in ``values``, in one collective (e.g. step metrics)."""
    if get_world_size() == 1:
        return dict(values)
    flat = [v.detach().float().reshape(-1) for v in values.values()]
    mean = all_reduce_mean(torch.cat(flat))
    out, offset = {}, 0
    for (k, v), f in zip(values.items(), flat):
        out[k] = mean[offset:offset + f.numel()].reshape(v.shape).to(v.device)
        offset += f.numel()
    return out


def main_first(fn, *, share: bool = False) -> Any:
    """Run ``fn()`` on rank 0 first, then on the other ranks (e.g. to fill a shared cache once);
    with ``share`` the others receive rank 0's result instead of running ``fn`` (it must pickle).
    If ``fn`` fails on rank 0, the other ranks raise a one-line :class:`DistributedError`
    instead of waiting in a collective for a peer that is gone."""
    if get_world_size() == 1:
        return fn()
    if is_main():
        try:
            result = fn()
        except BaseException as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            broadcast_object(("error", text))
            raise
        broadcast_object(("ok", result if share else None))
        return result
    status, payload = broadcast_object(None)
    if status == "error":
        raise DistributedError(f"rank 0 failed: {payload}")
    return payload if share else fn()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
