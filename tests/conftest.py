import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from framecast import config as C
from framecast.generate import build_denoiser


@contextlib.contextmanager
def benchmark_module(name: str):
    """benchmarks/<name>.py imported as module `name` (registered in sys.modules while in use: dataclasses look
    their module up there), for the tests that keep the benchmark scripts from rotting."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: threads only add synchronisation cost there, up to
    10x (and 200x next to another CPU job on this 2-core machine); one thread is also deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A small MiniGrid training recording (48 episodes, 336 transitions) and a held-out one (other seed), 16 px,
    for the world-model evaluation tests."""
    pytest.importorskip("minigrid", reason="needs the [world] extra: pip install -e '.[world]'")
    from framecast.data.envs import record

    root = tmp_path_factory.mktemp("wm_eval")
    kw = dict(frames=8, tile=2, size=16, shard_size=16, progress=False)
    record("minigrid", root / "train", episodes=48, seed=0, **kw)
    record("minigrid", root / "eval", episodes=16, seed=1, **kw)
    return root / "train", root / "eval"


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


STUDENT = ["stage=dmd", "model.num_actions=4", "model.text_dim=32", "data.name=episodes", "data.text_encoder=hash",
           "data.text_tokens=4", "few_step.denoising_steps=[1000,500]"]


def student_world(**kw):
    """A play World with the MiniGrid 2-step student's shapes (toy preset, 32x32, 4 actions, 2-step frame-wise)
    and random weights; the action embedding is random too (a fresh one is zero), so actions visibly matter."""
    from framecast.data.envs import ENVS
    from framecast.models.conditioning import build_text_encoder
    from framecast.play import World
    from framecast.stages import sampling_spec

    cfg = C.load(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml", STUDENT)
    model = build_denoiser(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.action_embed.table.weight.normal_(0, 1.0, generator=g)  # zero-initialised in a fresh model
    spec = sampling_spec(cfg)
    enc = build_text_encoder(spec.text_encoder, cfg.model.text_dim, spec.text_tokens, 0)
    env = ENVS["minigrid"]
    starts = torch.rand(3, *spec.pixel_shape, generator=g) * 2 - 1  # [N, C, H, W] pixels
    defaults = dict(window=4, fps=0.0, max_sessions=2)
    return World(model, spec, enc, list(env.actions), env.key_map, starts, **(defaults | kw))


@pytest.fixture(scope="session")
def make_student_world():
    return student_world


class RunsCode:
    """A pickle payload that would run a shell command when unpickled: loaders must refuse it unrun
    (torch.load(weights_only=True)). The command only creates `marker`, so a test can see that it never ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)
