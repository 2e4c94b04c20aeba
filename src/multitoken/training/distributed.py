"""Data-parallel training on ``torch.distributed``: the process group and its collectives.

Only the trainer imports this module and :mod:`multitoken.training.sharding` (which wraps the
model with DDP or FSDP2 ``fully_shard``); the single-process path never touches them.

:func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), picks the device (``cuda:LOCAL_RANK`` on GPUs, else the CPU) and
the backend (nccl on CUDA, gloo on CPU), and builds a 1-D device mesh. Without torchrun's
variables it starts a one-process group on a free loopback port (handy for tests). The
collectives (:func:`all_reduce_sum`, :func:`any_rank`, :func:`main_first`, ...) are no-ops in a
world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from multitoken.errors import MultitokenError, first_line

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(MultitokenError):
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
            broadcast_object(("error", first_line(e)))
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
