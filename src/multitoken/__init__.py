"""multitoken: multi-token prediction training and lossless multi-token decoding.

The names a user starts from: :class:`MTPConfig` / :class:`MTPModel` (a native MTP language
model), :class:`MTPLoss` and :func:`shift_targets` (training), :func:`generate` (plain, chain,
draft-model and tree decoding over any model of the decode protocol), and
:class:`MTPHeadsForCausalLM` (MTP heads on a Hugging Face causal LM; imported on first use so
that ``import multitoken`` stays light).
"""
from multitoken.decoding import generate
from multitoken.model.config import MTPConfig
from multitoken.model.native import MTPModel
from multitoken.model.targets import shift_targets
from multitoken.training.loss import MTPLoss

__all__ = ["MTPConfig", "MTPModel", "MTPLoss", "shift_targets", "generate", "MTPHeadsForCausalLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MTPHeadsForCausalLM":
        from multitoken.hf.wrapper import MTPHeadsForCausalLM
        return MTPHeadsForCausalLM
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")
