"""Samplers for masked-diffusion LMs and their swappable policies (DESIGN.md §3 "Samplers")."""

from dllm_zoo.samplers.base import Sampler, SamplerOutput
from dllm_zoo.samplers.block import BlockSampler
from dllm_zoo.samplers.confidence import Confidence, LowConfidence, Margin, NegEntropy, RandomConfidence
from dllm_zoo.samplers.likelihood import elbo_log_likelihood, stratified_mask_counts
from dllm_zoo.samplers.maskgit import MaskGITSampler, draw_codes, guided_logits, gumbel_temperature, t2i_special_ids
from dllm_zoo.samplers.parallel import JointPlan, ParallelSampler, canvas_after, committed_at
from dllm_zoo.samplers.sampling import filter_logits, sample_tokens
from dllm_zoo.samplers.semi_ar import LLaDASampler, add_gumbel_noise
from dllm_zoo.samplers.transfer import (
    Dynamic,
    EntropyBounded,
    Factor,
    StaticQuota,
    Threshold,
    TransferRule,
    confidence_ranks,
    top_k_mask,
)

__all__ = [
    "BlockSampler",
    "EntropyBounded",
    "filter_logits",
    "sample_tokens",
    "Confidence",
    "Dynamic",
    "Factor",
    "LLaDASampler",
    "LowConfidence",
    "MaskGITSampler",
    "Margin",
    "NegEntropy",
    "RandomConfidence",
    "Sampler",
    "SamplerOutput",
    "StaticQuota",
    "Threshold",
    "TransferRule",
    "add_gumbel_noise",
    "canvas_after",
    "committed_at",
    "draw_codes",
    "guided_logits",
    "JointPlan",
    "ParallelSampler",
    "confidence_ranks",
    "elbo_log_likelihood",
    "gumbel_temperature",
    "stratified_mask_counts",
    "t2i_special_ids",
    "top_k_mask",
]
