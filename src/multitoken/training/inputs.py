"""What a training run is built from: its tokenizer and datasets, and the checks a resumed run
must pass against the checkpoint it continues. Nothing here writes to the run folder."""
from __future__ import annotations

from pathlib import Path

from multitoken.data import (
    DataError, PackedDataset, Tokenizer, build_token_store, iter_documents, make_tokenizer, split_of,
)
from multitoken.data.packing import steps_per_epoch
from multitoken.model.config import MTPConfig
from multitoken.training.checkpoint import CheckpointError, load_model_config
from multitoken.training.config import TrainConfig


def build_tokenizer(config: TrainConfig, progress: bool = False) -> Tokenizer:
    """The byte tokenizer, or a BPE trained on the training split of ``config.data``."""
    if config.tokenizer == "byte":
        return make_tokenizer("byte")
    # Train the BPE on the training split only: validation text stays unseen.
    texts = (d.text for d in iter_documents(config.data, max_docs=config.max_docs)
             if config.val_fraction == 0 or split_of(d.name, config.val_fraction) == "train")
    return make_tokenizer("bpe", texts, config.bpe_vocab_size, show_progress=progress)


def build_datasets(config: TrainConfig, tokenizer: Tokenizer,
                   progress: bool) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, val) packed datasets of ``config.seq_len`` windows (val None when val_fraction is 0)."""
    kw = dict(val_fraction=config.val_fraction, progress=progress, max_docs=config.max_docs)
    train = PackedDataset(build_token_store(config.data, tokenizer, "train", **kw), config.seq_len)
    val = None
    if config.val_fraction > 0:
        val = PackedDataset(build_token_store(config.data, tokenizer, "val", **kw), config.seq_len)
    return train, val


def check_resume_compatible(saved: dict, config: TrainConfig, ckpt: Path) -> None:
    """The tokenizer a checkpoint was trained with must be the one the config asks for."""
    kind = saved.get("tokenizer", "byte")
    if kind != config.tokenizer:
        raise CheckpointError(f"cannot resume {ckpt}: it was trained with the {kind!r} tokenizer, "
                              f"the config asks for {config.tokenizer!r}")
    if kind == "bpe" and saved.get("bpe_vocab_size") != config.bpe_vocab_size:
        raise CheckpointError(f"cannot resume {ckpt}: its BPE vocabulary was trained with vocab size "
                              f"{saved.get('bpe_vocab_size')}, the config asks for {config.bpe_vocab_size}")


def check_resume_model(ckpt: Path, model_cfg: MTPConfig) -> None:
    """The checkpoint's model config must equal the one the run would build."""
    saved_cfg = load_model_config(ckpt)
    diffs = [f"{k}: checkpoint {v!r}, config {getattr(model_cfg, k)!r}"
             for k, v in saved_cfg.to_dict().items() if getattr(model_cfg, k) != v]
    if diffs:
        raise CheckpointError(f"cannot resume {ckpt}: the model config differs ({'; '.join(diffs)})")


def check_data(train, val, config: TrainConfig, world_size: int = 1) -> None:
    """Refuse splits too small to train on (fewer sequences than one batch) or to validate on
    (fewer than one sequence per rank), before the first step."""
    if train is not None and steps_per_epoch(len(train), config.micro_batch_size, world_size) == 0:
        raise DataError(f"the training split has {len(train)} sequences of seq_len={config.seq_len}, fewer "
                        f"than one batch of {config.micro_batch_size}"
                        f"{f' x {world_size} ranks' if world_size > 1 else ''}; "
                        "add data or lower --batch-size / --seq-len")
    if val is not None and len(val) < world_size:
        raise DataError(f"the validation split has {len(val)} sequences of seq_len={config.seq_len}; add data, "
                        "raise val_fraction, lower --seq-len, or set val_fraction=0")
