import os

import pytest
import torch

# Two cores: keep intra-op threads at 2 and never spawn more from tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic shards go to a per-session temp cache, never to the user's ~/.cache."""
    monkeypatch.setenv("DLLM_ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "dllm_zoo_cache"))
