"""multitoken: multi-token prediction training and lossless multi-token decoding."""
from .config import MTPConfig
from .loss import MTPLoss
from .model import MTPModel
from .targets import shift_targets

__all__ = ["MTPConfig", "MTPModel", "MTPLoss", "shift_targets"]
__version__ = "0.1.0"
