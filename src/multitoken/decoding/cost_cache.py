"""The calibrated :class:`~multitoken.decoding.cost.CostModel` of a model on this machine, kept on disk.

:func:`cached_cost_model` calibrates once per model and machine and stores the result as
JSON under ``$MULTITOKEN_CACHE/costs`` (default ``~/.cache/multitoken/costs``), one file per
:func:`cost_key`: the model's identity (the ``identity`` dict HF wrappers carry, with its
weight ``fingerprint``), its config, a digest of a few values of every weight, the optional
``cost_key`` dict a model may expose (e.g. which kernels its forward uses), the torch thread
count and version, the device and the CPU. A missing, corrupt or foreign file is recalibrated,
never a crash; a cache folder that cannot be written leaves the costs in memory only.
:func:`resolve_cost_model` turns ``generate``'s ``cost_model`` argument into a CostModel or None.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import TextIO

import torch

from multitoken.decoding.batch import device_of
from multitoken.decoding.cost import CostModel, calibrate
from multitoken.errors import MultitokenError
from multitoken.io import cache_dir, read_json, write_json
from multitoken.model.protocol import decode_hint

COST_FORMAT = "multitoken-costs/1"
COST_MODEL_CHOICES = ("auto", "off")  # besides a ready CostModel and None (= "off")


def cost_cache_dir() -> Path:
    """:func:`multitoken.io.cache_dir` ``("costs")``."""
    return cache_dir("costs")


def has_weights(model) -> bool:
    """Whether ``model`` has parameters: a weightless test stub has no cost worth measuring."""
    try:
        next(iter(model.parameters()))
    except (AttributeError, TypeError, StopIteration):
        return False
    return True


def weights_digest(model, values: int = 16) -> str:
    """Hash of every parameter's name, shape and first ``values`` entries: tells two models
    of one config apart (other heads, another base) without reading all the weights."""
    digest = hashlib.sha256()
    named = getattr(model, "named_parameters", None)
    for name, p in named() if callable(named) else enumerate(model.parameters()):
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(p.detach().reshape(-1)[:values].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cost_key(model) -> dict:
    """What the costs depend on (see the module docstring), as a JSON-ready dict."""
    device = device_of(model)
    key = {"format": COST_FORMAT, "model": type(model).__qualname__, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": str(device), "machine": platform.machine(),
           "cpus": os.cpu_count(), "n_future": model.n_future, "vocab_size": model.vocab_size}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    identity = decode_hint(model, "identity")
    if isinstance(identity, dict) and identity:
        key["identity"] = identity
    cfg = getattr(model, "cfg", None)
    if callable(getattr(cfg, "to_dict", None)):
        key["config"] = cfg.to_dict()
    extra = decode_hint(model, "cost_key")
    if isinstance(extra, dict):
        key["path"] = extra
    key["weights"] = weights_digest(model)
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from the file


def cost_file(key: dict) -> Path:
    """The cache file of ``key``."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cost_cache_dir() / f"{name}.json"


def load_cost_model(path: Path, key: dict) -> CostModel | None:
    """The costs cached in ``path`` for ``key``; None when missing, corrupt or another key's."""
    if not path.is_file():
        return None
    try:
        record = read_json(path, "cost cache")
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        return CostModel.from_dict(record["costs"])
    except (MultitokenError, KeyError, TypeError):
        return None


def cached_cost_model(model, progress: TextIO | None = sys.stderr, **calibrate_kw) -> CostModel:
    """``model``'s costs on this machine: read from the cache, else calibrated (one progress line) and cached."""
    key = cost_key(model)
    path = cost_file(key)
    cost = load_cost_model(path, key)
    if cost is None:
        cost = calibrate(model, progress=progress, **calibrate_kw)
        try:
            write_json(path, {"key": key, "costs": cost.to_dict()})
        except OSError as e:  # a read-only home must not stop decoding: the costs stay in memory
            if progress is not None:
                print(f"multitoken: cannot cache decode costs in {path.parent}: {e}", file=progress)
    return cost


def check_cost_model(cost_model) -> None:
    """``generate``'s ``cost_model`` must be "auto", "off", None or a CostModel (else MultitokenError)."""
    if not (cost_model is None or isinstance(cost_model, CostModel)
            or (isinstance(cost_model, str) and cost_model in COST_MODEL_CHOICES)):
        raise MultitokenError(f"cost_model must be 'auto', 'off', None or a CostModel, got {cost_model!r}")


def resolve_cost_model(model, cost_model) -> CostModel | None:
    """``generate``'s ``cost_model``: "auto" = :func:`cached_cost_model` (None for a weightless
    model), "off" or None = no cost model, a CostModel = itself."""
    check_cost_model(cost_model)
    if cost_model == "auto":
        return cached_cost_model(model) if has_weights(model) else None
    return cost_model if isinstance(cost_model, CostModel) else None
