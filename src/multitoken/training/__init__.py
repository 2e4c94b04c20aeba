"""Training: the MTP trainer and its config, loss, checkpoints, and head training on a frozen HF base."""
from multitoken.training.checkpoint import (
    CheckpointError, CheckpointNotFoundError, find_checkpoint, load_model, read_eval, read_train_config,
    resolve_checkpoint, save_checkpoint,
)
from multitoken.training.config import TrainConfig, build_config, merge_config, parse_set
from multitoken.training.heads import train_heads
from multitoken.training.heads_config import HeadsTrainConfig, HeadsTrainError
from multitoken.training.heads_run import run_heads_train
from multitoken.training.loss import WEIGHTINGS, MTPLoss, mtp_backward, naive_backward
from multitoken.training.metrics import METRICS, format_head_table
from multitoken.training.run import train_demo_model
from multitoken.training.trainer import MTPTrainer, TrainingDiverged

__all__ = [
    "MTPTrainer", "build_config", "merge_config", "parse_set", "TrainConfig", "format_head_table",
    "train_demo_model", "TrainingDiverged", "METRICS", "load_model", "save_checkpoint", "find_checkpoint",
    "resolve_checkpoint", "read_train_config", "read_eval", "CheckpointNotFoundError", "CheckpointError",
    "MTPLoss", "mtp_backward", "naive_backward", "WEIGHTINGS", "HeadsTrainConfig", "run_heads_train",
    "train_heads", "HeadsTrainError",
]
