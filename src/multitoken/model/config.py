"""Model configuration: one dataclass, validated on construction, serialised as JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import read_json, write_json

HEAD_TYPES = ("linear", "residual", "modulated", "transformer", "sequential")
ACTIVATIONS = ("silu", "gelu")


@dataclass
class MTPConfig:
    vocab_size: int = 257  # token ids are in [0, vocab_size); 257 = bytes + <|endoftext|>
    d_model: int = 256  # residual stream width
    n_layer: int = 4  # trunk transformer blocks (for `transformer` heads the last one is head 0)
    n_head: int = 4  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    d_ff: int | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to 64
    max_seq_len: int = 512  # longest context (RoPE table size, decoding limit)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # trunk's lm_head shares the input embedding matrix
    n_future: int = 4  # tokens predicted per position; head i predicts token t+i+1; 1 = plain LM
    head_type: str = "residual"  # one of HEAD_TYPES, for heads 1..n_future-1
    share_embeddings: bool | None = None  # extra heads reuse the trunk's lm_head; None = all but `linear`
    head_activation: str = "silu"  # MLP nonlinearity of `residual` / `modulated` heads
    init_std: float = 0.02  # std of the normal init of linear and embedding weights

    def __post_init__(self) -> None:
        def fail(field: str, value, allowed: str) -> None:
            raise MultitokenError(f"invalid config: {field}={value!r}; allowed: {allowed}")

        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len", "n_future"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "an integer >= 1")
        if self.head_type not in HEAD_TYPES:
            fail("head_type", self.head_type, ", ".join(HEAD_TYPES))
        if self.head_activation not in ACTIVATIONS:
            fail("head_activation", self.head_activation, ", ".join(ACTIVATIONS))
        if self.d_model % self.n_head:
            fail("d_model", self.d_model, f"a multiple of n_head={self.n_head}")
        if self.head_dim % 2:
            fail("d_model", self.d_model, "d_model / n_head must be even (RoPE rotates pairs)")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            fail("n_kv_head", self.n_kv_head, f"a divisor of n_head={self.n_head}")
        if self.d_ff is None:
            self.d_ff = 64 * -(-(8 * self.d_model // 3) // 64)
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            fail("d_ff", self.d_ff, "an integer >= 1")
        if self.head_type == "transformer" and self.n_future > 1 and self.n_layer < 2:
            fail("n_layer", self.n_layer, ">= 2 for head_type='transformer' (heads branch off layer n_layer-1)")
        if self.share_embeddings is None:
            self.share_embeddings = self.head_type != "linear"
        if self.head_type == "linear" and self.share_embeddings:
            fail("share_embeddings", True, "False for head_type='linear' (its heads are independent Linear(d, V))")
        if self.rope_theta <= 0:
            fail("rope_theta", self.rope_theta, "> 0")
        if self.norm_eps <= 0:
            fail("norm_eps", self.norm_eps, "> 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def replace(self, **changes) -> "MTPConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MTPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MultitokenError(f"invalid config: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "MTPConfig":
        """Read a config saved by :meth:`save`. A missing file raises FileNotFoundError (callers
        tell a missing checkpoint from a broken one); a malformed one MultitokenError."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = read_json(path, "config file")
        if not isinstance(data, dict):
            raise MultitokenError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
