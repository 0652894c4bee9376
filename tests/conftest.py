import pytest
import torch

from framecast import config as C
from framecast.pipeline import build_denoiser


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: threads only add synchronisation cost there, up to
    10x (and 200x next to another CPU job on this 2-core machine); one thread is also deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Wan zero-initialises nothing we rely on, but diffusers' defaults give near-identity blocks; random
    weights make equivalence tests sensitive to every path."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def tiny_cfg() -> C.ModelConfig:
    return C.model_preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    return randomise(build_denoiser(tiny_cfg)).eval()
