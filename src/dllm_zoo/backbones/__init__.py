"""Mask-predictor backbones: the :class:`Backbone` contract and the model families that implement it."""

from dllm_zoo.backbones.base import Backbone, BackboneOutput
from dllm_zoo.backbones.cache import KVCache
from dllm_zoo.backbones.llada import LLaDABackbone, LLaDAConfig
from dllm_zoo.backbones.sdar import SDARBackbone, SDARConfig

__all__ = ["Backbone", "BackboneOutput", "KVCache", "LLaDABackbone", "LLaDAConfig", "SDARBackbone", "SDARConfig"]
