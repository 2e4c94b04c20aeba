"""The trainer's process-level pieces: device and autocast dtype, RNG state, deferred signals."""
from __future__ import annotations

import contextlib
import random
import signal
import threading
from typing import Callable, Iterator

import numpy as np
import torch

from multitoken.errors import MultitokenError


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else the CPU; an unavailable device is a MultitokenError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MultitokenError(f"device={name!r} but CUDA is not available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MultitokenError(f"device={name!r} but MPS is not available; use --device cpu or auto")
    return dev


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype of a training run. ``auto`` = bf16 on a GPU that supports it; float32 on
    CPU (where bf16 matmuls are slower than float32 without AMX)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise MultitokenError("dtype='bfloat16' is not supported by this GPU; use --dtype float32")
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def rng_state() -> dict:
    """torch, CUDA, Python and numpy RNG states, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        # numpy arrays are not weights_only-loadable: store the MT19937 key as a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state.get("numpy")
    if npst:
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), int(npst[2]), int(npst[3]), npst[4]))


@contextlib.contextmanager
def deferred_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``on_signal(signum)`` instead of acting (the loop checkpoints and
    stops after the current step); a second signal acts as usual (KeyboardInterrupt /
    termination). Outside the main thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        on_signal(signum)
        signal.signal(signum, previous[signum])  # the next one is not deferred

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
