"""multitoken: multi-token prediction training and lossless multi-token decoding."""
from multitoken.model.config import MTPConfig
from multitoken.training.loss import MTPLoss
from multitoken.model.native import MTPModel
from multitoken.model.targets import shift_targets

__all__ = ["MTPConfig", "MTPModel", "MTPLoss", "shift_targets"]
__version__ = "0.1.0"
