"""The calibrated :class:`~multitoken.decoding.cost.CostModel` of a model on this machine, kept on disk.

:func:`cached_cost_model` calibrates once per model and machine and stores the result as
JSON under ``$MULTITOKEN_CACHE/costs`` (default ``~/.cache/multitoken/costs``), one file per
:func:`cost_key`: the model's identity (the ``identity`` dict HF wrappers carry, with its
weight ``fingerprint``), its config, a digest of a few values of every weight, the optional
``cost_key`` dict a model may expose (e.g. which kernels its forward uses), the torch thread
count and version, the device and the CPU (:func:`machine_key`). A missing, corrupt or foreign file is recalibrated,
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
from multitoken.io import cache_dir, cache_file, cached_record, proc_field
from multitoken.model.protocol import decode_hint

COST_FORMAT = "multitoken-costs/2"
COST_FOLDER = "costs"
COST_MODEL_CHOICES = ("auto", "off")  # besides a ready CostModel and None (= "off")


def cost_cache_dir() -> Path:
    """:func:`multitoken.io.cache_dir` ``("costs")``."""
    return cache_dir(COST_FOLDER)


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


def machine_key(device: torch.device) -> dict:
    """What a timing on ``device`` depends on besides the model: torch version and threads, the
    CPU (model name, core count, architecture) and the GPU on CUDA."""
    key = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
           "machine": platform.machine(), "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor(),
           "cpus": os.cpu_count()}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def cost_key(model) -> dict:
    """What the costs depend on (see the module docstring), as a JSON-ready dict."""
    key = {"format": COST_FORMAT, "model": type(model).__qualname__, **machine_key(device_of(model)),
           "n_future": model.n_future, "vocab_size": model.vocab_size}
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
    return cache_file(COST_FOLDER, key)


def cached_cost_model(model, progress: TextIO | None = sys.stderr, **calibrate_kw) -> CostModel:
    """``model``'s costs on this machine: read from the cache, else calibrated (one progress line) and cached."""
    return cached_record(COST_FOLDER, cost_key(model), lambda: calibrate(model, progress=progress, **calibrate_kw),
                         CostModel.to_dict, CostModel.from_dict, "decode costs", progress)


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
