"""Wan2.1 DiT: module tree with Wan names, forward passes, RoPE and attention backends."""

from .forward import PromptKV, WanBackbone
from .modules import WanModel
from .plans import BlockCausal, Bidirectional

__all__ = ["WanModel", "WanBackbone", "PromptKV", "BlockCausal", "Bidirectional"]
