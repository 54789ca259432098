"""Shared fixture: the tiny LLaDA of :mod:`sampler_helpers` (scaled-up init, peaked logits)."""

from __future__ import annotations

import pytest
from sampler_helpers import make_model

from dllm_zoo.backbones import LLaDABackbone


@pytest.fixture(scope="session")
def model() -> LLaDABackbone:
    return make_model()
