"""Training configuration: ``TrainConfig``, its validation, presets, files and ``--set`` overrides.

A run's configuration is built in layers (``build_config``): a preset (``tiny``/``small``/``base``),
then a YAML/JSON file, then ``key=value`` overrides; every layer's keys are checked and the result
is validated as a whole. ``TrainConfig.to_dict``/``from_dict`` are its serialised form, stored in
checkpoints so that a resumed run can be checked against the one that wrote them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from multitoken.errors import MultitokenError, first_line
from multitoken.io import read_json
from multitoken.model.config import MTPConfig
from multitoken.training.loss import WEIGHTINGS

TOKENIZERS = ("byte", "bpe")
DEVICES = "auto, cpu, cuda, cuda:N, mps"
DTYPES = ("auto", "float32", "bfloat16")
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(MTPConfig))


# =========================================================================== config


@dataclass
class TrainConfig:
    """Everything a training run needs. Files (YAML/JSON) are its serialised form."""

    # --- model
    model: dict = field(default_factory=dict)  # MTPConfig fields; vocab_size comes from the tokenizer,
    #                                             max_seq_len defaults to seq_len
    # --- loss
    weighting: str = "deepseek"  # MTPLoss preset: tutorial | uniform | deepseek
    aux_weight: float | None = None  # λ scaling heads 1..n-1; None = the weighting's default
    head_weights: list[float] | None = None  # per-head weights (n_future floats); None = the weighting's
    memory_efficient: bool = True  # True: mtp_backward (logits of one head at a time); False: naive_backward
    ce_chunk: int | None = None  # compute each head's CE over chunks of this many positions (memory_efficient)
    # --- optimiser and schedule
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float | None = None  # cosine floor reached at the last step; None = lr / 10
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay, applied to 2-D weights only (not norms/biases)
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    # --- batch and length
    micro_batch_size: int = 8  # sequences per forward/backward (per rank)
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    seq_len: int = 256  # tokens per training sequence
    max_steps: int | None = 1000  # optimizer steps to train; exactly one of max_steps / max_tokens is set
    max_tokens: int | None = None  # or: train until this many tokens (steps = ceil(tokens / tokens per step))
    # --- evaluation, logging, checkpoints
    eval_every: int = 100  # validate every this many steps (and at the end); 0 = only at the end
    eval_batches: int = 8  # micro-batches of validation data per evaluation
    log_every: int = 10  # write a metrics.jsonl row every this many steps (and at the end)
    checkpoint_every: int = 200  # checkpoint every this many steps (and at the end); 0 = only at the end
    tensorboard: bool = True  # also log to out/tensorboard when the tensorboard package is installed
    # --- runtime
    seed: int = 0  # seeds model init and the data order
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on GPUs that support it, else float32) | float32 | bfloat16
    compile: bool = False  # torch.compile the model's training functions
    num_threads: int | None = None  # CPU threads per op (torch.set_num_threads); None = torch's default.
    #                                 On a busy machine 1 thread can beat oversubscribed OpenMP threads.
    # --- data and tokenizer
    tokenizer: str = "byte"  # byte (257 ids, nothing to train) | bpe (trained on the training split)
    bpe_vocab_size: int = 4096  # requested BPE vocabulary (tokenizer == "bpe")
    data: list[str] | None = None  # files, folders, JSONL; None = the Python standard library sources
    val_fraction: float = 0.05  # fraction of documents (by path hash) held out for validation; 0 = none
    max_docs: int | None = None  # use at most this many documents per split (smoke tests)

    def __post_init__(self) -> None:
        if not isinstance(self.model, dict):
            _fail("model", self.model, "a mapping of MTPConfig fields")
        unknown = sorted(set(self.model) - set(_MODEL_FIELDS))
        if unknown:
            raise MultitokenError(f"unknown config key 'model.{unknown[0]}'; allowed: "
                             f"{', '.join('model.' + f for f in _MODEL_FIELDS)}")
        _choice("weighting", self.weighting, WEIGHTINGS)
        _opt(self, "aux_weight", _number, 0.0)
        if self.head_weights is not None:
            if (not isinstance(self.head_weights, (list, tuple))
                    or not all(_is_number(w) and w >= 0 for w in self.head_weights)):
                _fail("head_weights", self.head_weights, "null or a list of n_future numbers >= 0")
            self.head_weights = [float(w) for w in self.head_weights]
        _bool("memory_efficient", self.memory_efficient)
        _opt(self, "ce_chunk", _int, 1)
        if self.ce_chunk is not None and not self.memory_efficient:
            _fail("ce_chunk", self.ce_chunk, "null when memory_efficient is false")
        self.lr = _number("lr", self.lr, 0.0, strict=True)
        _opt(self, "min_lr", _number, 0.0)
        if self.min_lr is not None and self.min_lr > self.lr:
            _fail("min_lr", self.min_lr, f"<= lr={self.lr}")
        if (not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            _fail("betas", self.betas, "two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.eps = _number("eps", self.eps, 0.0, strict=True)
        self.weight_decay = _number("weight_decay", self.weight_decay, 0.0)
        _int("warmup_steps", self.warmup_steps, 0)
        self.grad_clip = _number("grad_clip", self.grad_clip, 0.0)
        _int("micro_batch_size", self.micro_batch_size, 1)
        _int("grad_accum", self.grad_accum, 1)
        _int("seq_len", self.seq_len, 1)
        _opt(self, "max_steps", _int, 1)
        _opt(self, "max_tokens", _int, 1)
        if (self.max_steps is None) == (self.max_tokens is None):
            _fail("max_steps", self.max_steps, "exactly one of max_steps / max_tokens set (the other null)")
        _int("eval_every", self.eval_every, 0)
        _int("eval_batches", self.eval_batches, 1)
        _int("log_every", self.log_every, 1)
        _int("checkpoint_every", self.checkpoint_every, 0)
        _bool("tensorboard", self.tensorboard)
        _int("seed", self.seed, 0)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            _fail("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _bool("compile", self.compile)
        _opt(self, "num_threads", _int, 1)
        _choice("tokenizer", self.tokenizer, TOKENIZERS)
        _int("bpe_vocab_size", self.bpe_vocab_size, 257)
        if self.data is not None:
            if isinstance(self.data, (str, os.PathLike)):
                self.data = [self.data]
            if not isinstance(self.data, (list, tuple)) or not self.data:
                _fail("data", self.data, "null (the stdlib) or a non-empty list of paths")
            self.data = [str(p) for p in self.data]
        self.val_fraction = _number("val_fraction", self.val_fraction, 0.0)
        if self.val_fraction >= 1:
            _fail("val_fraction", self.val_fraction, "a number in [0, 1)")
        _opt(self, "max_docs", _int, 1)
        # Validate the model fields now (a placeholder vocab: the tokenizer decides the real one).
        n = self.model_config(self.model.get("vocab_size", 257)).n_future
        if self.seq_len <= n:  # head i has seq_len - i - 1 targets per sequence
            _fail("seq_len", self.seq_len, f"an integer >= {n + 1} with n_future={n} (head {n - 1} predicts "
                                           f"t+{n}: a shorter sequence gives it no target)")

    # ------------------------------------------------------------------ derived values
    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.micro_batch_size * self.grad_accum * self.seq_len * world_size

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return -(-self.max_tokens // self.tokens_per_step(world_size))

    def model_config(self, vocab_size: int) -> MTPConfig:
        """The MTPConfig for a tokenizer with ``vocab_size`` ids."""
        fields = dict(self.model)
        if fields.get("vocab_size", vocab_size) != vocab_size:
            raise MultitokenError(f"invalid config: model.vocab_size={fields['vocab_size']} does not match the "
                             f"tokenizer's vocab_size {vocab_size}; leave model.vocab_size unset")
        fields["vocab_size"] = vocab_size
        fields.setdefault("max_seq_len", self.seq_len)
        cfg = MTPConfig(**fields)
        if cfg.max_seq_len < self.seq_len:
            _fail("model.max_seq_len", cfg.max_seq_len, f">= seq_len={self.seq_len}")
        return cfg

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        _check_top_keys(data, source)
        return cls(**data)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise MultitokenError(f"invalid config: {name}={value!r}; allowed: {allowed}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(name: str, v: Any, lo: float, strict: bool = False) -> float:
    if not _is_number(v) or v < lo or (strict and v == lo):
        _fail(name, v, f"a number {'>' if strict else '>='} {lo:g}")
    return float(v)


def _int(name: str, v: Any, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        _fail(name, v, f"an integer >= {lo}")
    return v


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(name, v, "true or false")


def _choice(name: str, v: Any, allowed: Sequence[str]) -> None:
    if v not in allowed:
        _fail(name, v, ", ".join(allowed))


def _opt(cfg: TrainConfig, name: str, check, lo) -> None:
    """Validate an optional field: None, or what ``check`` accepts."""
    v = getattr(cfg, name)
    if v is not None:
        setattr(cfg, name, check(name, v, lo))


# Three presets, as override dicts over the TrainConfig defaults.
PRESETS: dict[str, dict] = {
    # Unit tests and smoke runs: a few seconds on a laptop CPU.
    "tiny": dict(
        model=dict(d_model=64, n_layer=2, n_head=4, n_future=4, head_type="residual"),
        lr=3e-3, warmup_steps=2, micro_batch_size=4, seq_len=64, max_steps=20,
        eval_every=10, eval_batches=2, log_every=1, checkpoint_every=10,
    ),
    # The demo: a byte-level model of Python source trained in ~5-7 minutes on a 2-core CPU.
    # Measured on the 2-core dev box (150-step runs, validation CE of head 0 / heads 1-3):
    #   n_future=1 (plain LM)                          2.18
    #   residual, shared unembedding, uniform          2.87 / 2.96 3.03 3.07
    #   residual, shared unembedding, deepseek 0.3     2.60 / 2.94 3.07 3.15
    #   residual, own unembeddings,   deepseek 0.3     2.27 / 2.77 2.91 3.00   <- this preset
    # (uniform weighting and a shared unembedding both slow the trunk down this early in
    # training). At equal wall time d_model=128 (~3.5k tok/s, 400 steps) beat d_model=256
    # (~2.1k tok/s, 220 steps). One thread: on a busy machine two OpenMP threads ran up to
    # 10x slower than one (--set num_threads=null restores torch's default).
    # Heads: `sequential` (DeepSeek-style, token-conditioned). In the full 400-step runs of
    # docs/results.md they kept next-token validation loss at 1.658 (plain LM 1.643, residual
    # 1.743) and reached greedy τ 3.6 vs 1.5 for residual heads, at ~1.9x the step FLOPs.
    "small": dict(
        model=dict(d_model=128, n_layer=4, n_head=4, n_future=4, head_type="sequential"),
        weighting="deepseek", aux_weight=0.3,
        lr=4e-3, warmup_steps=30, micro_batch_size=8, seq_len=256, max_steps=400,
        eval_every=100, eval_batches=8, log_every=10, checkpoint_every=100, num_threads=1,
    ),
    # A GPU run: ~85M parameters, BPE, bf16 autocast, compiled; ~200M tokens.
    "base": dict(
        model=dict(d_model=768, n_layer=12, n_head=12, n_kv_head=4, n_future=4, head_type="residual"),
        tokenizer="bpe", bpe_vocab_size=16384, weighting="deepseek",
        lr=1e-3, warmup_steps=500, micro_batch_size=32, grad_accum=4, seq_len=1024,
        max_steps=None, max_tokens=200_000_000, eval_every=500, eval_batches=20, log_every=10,
        checkpoint_every=500, compile=True,
    ),
}


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON config file into a dict (no validation yet)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    if p.suffix.lower() == ".json":  # JSON through the one JSON reader; YAML below
        data = read_json(p, "config file")
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MultitokenError(f"cannot read config file {p}: {e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MultitokenError(f"config file {p} is not valid YAML: {first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MultitokenError(f"config file {p}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_set(items: Iterable[str]) -> dict:
    """``["lr=1e-3", "model.d_model=128"]`` -> nested override dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MultitokenError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "model"):
            raise MultitokenError(f"unknown config key {key!r} in --set (only model.<field> may be dotted)")
        if len(parts) == 2:
            out.setdefault("model", {})[parts[1]] = value
        else:
            out[key] = value
    return out


def merge_config(*layers: dict | None) -> dict:
    """Later layers override earlier ones; the nested ``model`` dict is merged field by field."""
    out: dict = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key == "model" and isinstance(value, dict) and isinstance(out.get("model"), dict):
                out["model"] = {**out["model"], **value}
            else:
                out[key] = value
    return out


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise MultitokenError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))  # a deep copy


def _check_top_keys(layer: dict, source: str) -> None:
    """A mapping whose keys are all TrainConfig fields; errors name the file (or flag) it came from."""
    if not isinstance(layer, dict):
        raise MultitokenError(f"{source}: expected a mapping of config keys, got {type(layer).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in layer:
        if key not in known:
            raise MultitokenError(f"unknown config key {key!r} in {source}; allowed: {', '.join(known)}")


def _check_keys(layer: dict, source: str) -> None:
    """Unknown keys, nested ``model.*`` ones included, are reported with their source."""
    _check_top_keys(layer, source)
    if isinstance(layer.get("model"), dict):
        for key in layer["model"]:
            if key not in _MODEL_FIELDS:
                raise MultitokenError(f"unknown config key 'model.{key}' in {source}; allowed: "
                                 f"{', '.join('model.' + f for f in _MODEL_FIELDS)}")


def build_config(preset_name: str | None = None, config_file: str | os.PathLike | None = None,
                 overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """base (a resumed run's config) < preset < config file < overrides (flags, --set)."""
    layers = []
    if base is not None:
        layers.append((base, "the run's train_config.json"))
    if preset_name:
        layers.append((preset(preset_name), f"preset {preset_name!r}"))
    if config_file is not None:
        layers.append((load_config_file(config_file), str(config_file)))
    if overrides:
        layers.append((overrides, "the command-line overrides"))
    for layer, source in layers:
        _check_keys(layer, source)
    return TrainConfig.from_dict(merge_config(*(layer for layer, _ in layers)))
