"""Tiny text-to-video models for the play tests, in the layouts users hold: a framecast causal checkpoint on
the toy's identity codec, and (where the Wan fixtures exist) a tiny random Wan2.1 folder with its VAE and umT5
plus a Causal-Forcing-style model.pt on top of it."""

from pathlib import Path

from framecast import config as C
from framecast.generate import build_denoiser
from framecast.stages import normalise, sampling_spec
from framecast.train import checkpoint as ckpt

from .conftest import randomise

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def framecast_t2v(tmp: Path) -> tuple[Path, None]:
    cfg = normalise(C.load(TINY, ["stage=dmd", "few_step.denoising_steps=[1000,500]",
                                  "few_step.first_block_steps=[1000,750,500,250]"]))
    model = randomise(build_denoiser(cfg.model), std=0.1)
    meta = {"stage": cfg.stage, "sampling": sampling_spec(cfg).to_json(), "config": C.to_dict(cfg),
            "roles": ["model"], "ema": []}
    path = ckpt.save(tmp / "t2v" / "ckpt", 1, weights={"model": model.state_dict()}, meta=meta)
    return path, None


def t2v_checkpoints(kind: str, tmp: Path):
    return {"framecast": framecast_t2v}[kind](tmp)


t2v_checkpoints.kinds = ["framecast"]
