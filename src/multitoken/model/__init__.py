"""The native MTP model: config, trunk and heads, target shifting, and the decode protocol."""
from multitoken.model.config import HEAD_TYPES, MTPConfig
from multitoken.model.heads import HEAD_CLASSES, Heads, build_heads
from multitoken.model.layers import KVCache
from multitoken.model.native import MTPModel
from multitoken.model.protocol import (
    ConfigDecoderAttributes, DecodeState, DraftPicker, MTPDecoderModel, RowSelectingModel, check_row_index,
    supports_row_selection,
)
from multitoken.model.targets import IGNORE_INDEX, shift_targets

__all__ = [
    "MTPConfig", "HEAD_TYPES", "MTPModel", "Heads", "HEAD_CLASSES", "build_heads", "shift_targets",
    "IGNORE_INDEX", "KVCache", "MTPDecoderModel", "DecodeState", "DraftPicker", "ConfigDecoderAttributes",
    "RowSelectingModel", "supports_row_selection", "check_row_index",
]
