"""Tiny text-to-video models for the play tests, in the layouts users hold: a framecast causal checkpoint on
the toy's identity codec, and (where the Wan fixtures exist) a tiny random Wan2.1 folder with its VAE and umT5
plus a Causal-Forcing-style model.pt on top of it."""

from pathlib import Path

from framecast import config as C
from framecast.generate import build_denoiser
from framecast.stages import normalise, sampling_spec
from framecast.train import checkpoint as ckpt

from .conftest import randomise
from .wan_tiny_full import write_tiny_cf, write_tiny_wan

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def framecast_t2v(tmp: Path) -> tuple[Path, None, None]:
    cfg = normalise(C.load(TINY, ["stage=dmd", "few_step.denoising_steps=[1000,500]",
                                  "few_step.first_block_steps=[1000,750,500,250]"]))
    model = randomise(build_denoiser(cfg.model), std=0.1)
    meta = {"stage": cfg.stage, "sampling": sampling_spec(cfg).to_json(), "config": C.to_dict(cfg),
            "roles": ["model"], "ema": []}
    path = ckpt.save(tmp / "t2v" / "ckpt", 1, weights={"model": model.state_dict()}, meta=meta)
    return path, None, None


def wan_release(tmp: Path) -> tuple[Path, Path, tuple[int, int]]:
    """A tiny Causal Forcing frame-wise 2-step `model.pt` on a tiny diffusers Wan folder (VAE + umT5), 32x32."""
    diff, _, sd = write_tiny_wan(tmp / "wan")
    return write_tiny_cf(tmp / "cf" / "framewise-2step.pt", sd), diff, (32, 32)


def t2v_checkpoints(kind: str, tmp: Path):
    """(model, base or None, size or None) of a text-to-video model of `kind`."""
    return {"framecast": framecast_t2v, "wan": wan_release}[kind](tmp)


t2v_checkpoints.kinds = ["framecast", "wan"]
