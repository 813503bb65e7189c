import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite is many small ops on a 2-core machine: one intra-op thread is faster and steadier.
torch.set_num_threads(1)

from sf_core.config import WanConfig  # noqa: E402
from fixtures.dit import tiny_dit_state_dict  # noqa: E402
from sf_core.wan import WanBackbone, WanModel  # noqa: E402


@pytest.fixture
def tiny_config() -> WanConfig:
    return WanConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> WanModel:
    model = WanModel(tiny_config)
    model.load_state_dict(tiny_dit_state_dict(tiny_config, seed=0))
    return model.eval().requires_grad_(False)


@pytest.fixture
def backbone(tiny_model) -> WanBackbone:
    return WanBackbone(tiny_model, dtype=torch.float32, attn="sdpa")


@pytest.fixture
def text(tiny_config) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 24, tiny_config.text_dim, generator=g)
