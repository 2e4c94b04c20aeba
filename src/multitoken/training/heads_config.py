"""``HeadsTrainConfig``: the settings of head training on a frozen Hugging Face base."""
from __future__ import annotations

from dataclasses import dataclass

from multitoken.errors import MultitokenError

TARGETS = ("corpus", "distill")


class HeadsTrainError(MultitokenError):
    """Bad head-training input; the message is one line for the CLI (exit 2)."""


@dataclass
class HeadsTrainConfig:
    n_future: int = 4  # heads including the base's own head 0 (n-1 draft heads)
    head_type: str = "sequential"  # sequential | residual | linear
    targets: str = "distill"  # corpus: the text's next tokens; distill: the base's greedy tokens
    draft_vocab: int = 8192  # heads' logits over the N most frequent base-greedy tokens; 0 = full vocabulary
    epochs: float = 4.0  # passes over the cached training rows (ignored when steps is set)
    steps: int | None = None  # optimizer steps (overrides epochs)
    batch_size: int = 8  # cached rows (of seq_len tokens) per step
    lr: float = 1e-3  # peak AdamW learning rate
    final_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 20  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decay on matrices
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    val_rows: float = 0.04  # fraction of cached rows held out for validation (at least 1 row)
    eval_every: int = 50  # eval row every this many steps (and at the end)
    log_every: int = 10  # metrics row every this many steps (and at the end)
    eval_rows: int = 16  # validation rows scored per eval
    seed: int = 0
    prompt_loss: bool = False  # train on the chat prompts of cached texts too, not only on answers and plain text
    soft_targets: float = 0.0  # weight of the base's next-token distribution in a draft head's CE (0 = greedy tokens only)
    d_ff: int | None = None  # head MLP width (default: the base's)
    tree_budget: int = 8  # nodes of the static tree saved as tree.json (from validation top-k hits); 0 = none
    max_minutes: float | None = None  # training wall-time budget: without steps, the cosine runs over
    # elapsed time and training ends when the budget is spent (at most epochs passes); with steps, a hard stop

    def __post_init__(self) -> None:
        if self.n_future < 2:
            raise HeadsTrainError(f"n_future must be >= 2 to train draft heads, got {self.n_future}")
        from multitoken.hf import HF_HEAD_TYPES
        if self.head_type not in HF_HEAD_TYPES:
            raise HeadsTrainError(f"unknown head type {self.head_type!r}; allowed: {', '.join(HF_HEAD_TYPES)}")
        if self.targets not in TARGETS:
            raise HeadsTrainError(f"unknown targets {self.targets!r}; allowed: {', '.join(TARGETS)}")
        if not 0 <= self.soft_targets <= 1:
            raise HeadsTrainError(f"soft_targets must be in [0, 1], got {self.soft_targets}")
        if self.draft_vocab < 0:
            raise HeadsTrainError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.draft_vocab and self.head_type == "linear":
            raise HeadsTrainError("--draft-vocab needs heads that share the base's lm_head (residual, sequential), "
                                  "not linear")
        if self.steps is not None and self.steps < 1:
            raise HeadsTrainError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise HeadsTrainError("epochs, batch_size and lr must be positive")
        if not 0 <= self.val_rows < 1:
            raise HeadsTrainError(f"val_rows must be in [0, 1), got {self.val_rows}")
