"""Stage 2a: ODE initialisation of a few-step generator (method.md §5, §9.1).

Pairs. The teacher's probability-flow ODE is solved with Euler on an N-step shifted grid (with CFG) from
sigma 1, keeping the states at the few-step anchor sigmas, the endpoint and the clean video:

* causal (Causal Forcing): the Stage-1 **AR teacher**, per block, with the ground-truth clean prefix as
  context (method.md §5.1, §12.17). Two modes give the same pairs (tested to fp32 tolerance):
  `cached`, block by block through `rollout` with the KV cache holding the ground-truth blocks < b, and
  `packed`, all blocks at once under the teacher-forcing plan (the reference's "full" mode).
* bidirectional (Self Forcing / CausVid baseline): the bidirectional base solves the whole video jointly,
  so frame i's endpoint depends on the noise of later frames (P1 Lemma 3.2).

Regression (method.md §5.2). x0_hat = G(x_{s_j}, s_j) against the stored endpoint, x0-space MSE:

* causal: one anchor index j per video shared by all frames, clean ground-truth context through the
  teacher-forcing plan, so the target is a function of the student's inputs (frame-level injective);
* bidirectional baseline: an independent anchor per block and the *noisy same-trajectory* frames as
  context under the block-causal plan (SF `uniform_timestep=False`, method.md §11). The student cannot see
  the future noise its targets depend on, so it learns the conditional expectation (P1 Prop. 3.3).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import rng
from ..errors import ConfigError
from .. import flow
from ..data.batch import Batch
from ..models.attention import AttentionPlan
from ..models.conditioning import Cond
from ..models.denoiser import Guidance
from ..train.loop import step_generator
from ..rollout import rollout
from ..sampling import euler
from . import Losses, Objective

Tensor = torch.Tensor
TEACHERS = ("causal", "bidirectional")


@dataclass
class ODEPairs:
    states: Tensor  # [B, A, F, C, H, W] teacher states at the anchor sigmas
    sigmas: Tensor  # [A] the anchor sigmas (exact)
    endpoint: Tensor  # [B, F, C, H, W] the ODE solution at sigma 0 (the regression target)
    clean: Tensor  # [B, F, C, H, W] ground truth, the causal student's context


def _packed(teacher, noise: Tensor, cond: Cond, sig: Tensor, idx: list[int], guidance, **kw) -> tuple[Tensor, Tensor]:
    """One forward per Euler step for the whole video, every frame at the same sigma."""
    x, keep = noise, {}
    B, F = noise.shape[:2]
    for n in range(len(sig) - 1):
        if n in idx:
            keep[n] = x
        s = torch.full((B, F), float(sig[n]), device=x.device)  # [B, F]: per-frame sigma on the model's device
        s_next = torch.full((B, F), float(sig[n + 1]), device=x.device)
        v = teacher.velocity(x, s, cond, guidance=guidance, **kw)
        x = flow.euler_step(x, v, s, s_next)
    return torch.stack([keep[i] for i in idx], dim=1), x


@torch.no_grad()
def generate_pairs(teacher, x_gt: Tensor, cond: Cond, noise: Tensor, *, block_size: int, steps: int, shift: float,
                   anchors: Tensor, guidance: Guidance | None = None, mode: str = "cached",
                   teacher_kind: str = "causal") -> ODEPairs:
    """Solve the teacher's ODE from `noise` (sigma 1) and keep the states at `anchors` (method.md §5.1)."""
    sig = flow.grid(steps, shift)
    idx = flow.grid_indices(anchors.to(torch.float64), steps, shift)  # fails loudly if anchors are off the grid
    sig32 = sig.float()
    if teacher_kind not in TEACHERS:
        raise ConfigError(f"unknown ode.teacher_kind {teacher_kind!r}; choose one of {TEACHERS}")
    if teacher_kind == "bidirectional":
        states, endpoint = _packed(teacher, noise, cond, sig32, idx, guidance, plan=AttentionPlan("bidirectional"))
    elif mode == "packed":
        states, endpoint = _packed(teacher, noise, cond, sig32, idx, guidance,
                                   plan=AttentionPlan("teacher_forcing", block_size), clean=x_gt)
    elif mode == "cached":
        blocks, block_states = [], []

        def sampler(den, xb, sigmas, c, **kw):
            keep = {0: xb} if 0 in idx else {}
            out = euler(den, xb, sigmas, c, callback=lambda i, y: keep.__setitem__(i + 1, y), **kw)
            block_states.append(torch.stack([keep[i] for i in idx], dim=1))  # [B, A, K, ...]
            return out

        for blk in rollout(teacher, noise, cond, sampler=sampler, sigmas=sig32, block_size=block_size,
                           guidance=guidance, teacher_context=x_gt, commit_last=False):
            blocks.append(blk.x0)
        states, endpoint = torch.cat(block_states, dim=2), torch.cat(blocks, dim=1)
    else:
        raise ConfigError(f"unknown ode.pair_mode {mode!r}; choose cached or packed")
    return ODEPairs(states, anchors.float(), endpoint, x_gt)


class ODERegression(Objective):
    """x0-MSE of the student at the stored anchor states; the batch's `extra` holds states and endpoint."""

    def __init__(self, model, *, anchors: Tensor, block_size: int, teacher_kind: str = "causal") -> None:
        if teacher_kind not in TEACHERS:
            raise ConfigError(f"unknown ode.teacher_kind {teacher_kind!r}; choose one of {TEACHERS}")
        self.model, self.anchors, self.kind = model, anchors.float(), teacher_kind
        self.block_size = block_size
        kind = "teacher_forcing" if teacher_kind == "causal" else "block_causal"
        self.plan = AttentionPlan(kind, block_size)
        self.roles = {"model": model}

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x_in [B, F, C, H, W], sigma [B, F]): the student's noisy input and its per-frame sigma."""
        states = batch.extra["states"]  # [B, A, F, C, H, W]
        B, A, F = states.shape[:3]
        if A != len(self.anchors):
            raise ValueError(f"pair store has {A} anchors, the objective expects {len(self.anchors)}")
        if self.kind == "causal":  # one anchor per video, shared by all frames (method.md §5.2)
            j = rng.randint(0, A, (B, 1), generator).expand(B, F)  # [B, F]
        else:  # independent anchor per block (SF, method.md §11); frames of a block share it (method.md §12.23)
            nb = -(-F // self.block_size)
            j = rng.randint(0, A, (B, nb), generator).repeat_interleave(self.block_size, 1)[:, :F]
        j = j.to(states.device)
        x_in = states.gather(1, j[:, None, :, None, None, None].expand(B, 1, F, *states.shape[3:]))[:, 0]
        return x_in, self.anchors.to(states.device)[j]

    def losses(self, batch: Batch, step: int, generator: torch.Generator) -> Losses:
        x_in, sigma = self.inputs(batch, generator)
        clean = batch.video if self.kind == "causal" else None  # GT context for the causal student only
        x0 = self.model.x0(x_in, sigma, batch.cond, plan=self.plan, clean=clean)
        loss = (x0 - batch.extra["endpoint"]).pow(2).mean()
        return {"model": (loss, {"loss": loss.item()})}


def write_pairs(store, teacher, source, *, block_size: int, steps: int, shift: float, anchors: Tensor,
                guidance: float, seed: int, mode: str = "cached", teacher_kind: str = "causal",
                progress: bool = True, rank: int = 0, world: int = 1) -> None:
    """Fill the missing shards of `store` (data/trajectories.py); resumable, with a progress bar.

    Shard i draws its videos and noise from Generator(seed, i) only, so a resumed generation writes
    exactly the shards an uninterrupted one would have.
    """
    from tqdm.auto import tqdm

    todo = [i for i in store.missing() if i % world == rank]  # torchrun: this rank's shards
    total = int(store.manifest["num_pairs"])
    bar = tqdm(total=total, initial=total - sum(store.shard_len(i) for i in todo), disable=not progress,
               desc="ode pairs", unit="traj", dynamic_ncols=True)
    for i in todo:
        t0 = time.perf_counter()
        g = step_generator(seed, i)
        # drawn on the CPU generator (the same pairs on any device), then moved to the teacher's device
        batch = source.batch(store.shard_len(i), g)
        noise = torch.randn(batch.video.shape, generator=g)
        params = getattr(teacher, "parameters", None)  # analytic test teachers have none: they stay on the CPU
        batch = batch.to(next(params()).device) if params is not None else batch
        noise = noise.to(batch.video)
        cfg = Guidance(guidance, batch.null) if guidance != 1.0 else None
        pairs = generate_pairs(teacher, batch.video, batch.cond, noise, block_size=block_size, steps=steps,
                               shift=shift, anchors=anchors, guidance=cfg, mode=mode, teacher_kind=teacher_kind)
        tensors = {"states": pairs.states, "endpoint": pairs.endpoint, "clean": pairs.clean,
                   "text": batch.cond.text, "null": batch.null.text}
        if batch.cond.actions is not None:  # world models: the pairs were made under these actions
            tensors.update(actions=batch.cond.actions, null_actions=batch.null.actions)
        store.write(i, tensors, batch.captions)
        record_seconds(store.root, i, time.perf_counter() - t0, rank=rank if world > 1 else None)
        bar.update(store.shard_len(i))
    bar.close()


TIMING = "timing.json"  # shard -> seconds it took to generate, beside the manifest (Stage-2 cost, docs/results.md)


def record_seconds(root: Path, shard: int, seconds: float, *, rank: int | None = None) -> None:
    """Add a shard's generation time to timing.json (`rank` under torchrun: its own timing.rank<r>.json, so the
    ranks never write one file; read_timing merges them)."""
    from ..data.trajectories import read_json_timing

    path = Path(root) / (TIMING if rank is None else f"timing.rank{rank}.json")
    times = read_json_timing(path)  # an unreadable one is a PairStoreError naming it
    times[str(shard)] = round(seconds, 3)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(times, indent=1))
    tmp.replace(path)


def pair_seconds(root: str | Path) -> tuple[float, bool]:
    """Seconds spent generating a pair store, and whether that is measured (timing.json) or estimated from
    the shards' modification times (stores written before timing.json existed: the first shard is assumed
    to take the median of the others)."""
    from ..data.trajectories import read_timing

    root = Path(root)
    if (root / TIMING).exists() or any(root.glob("timing.rank*.json")):
        return float(sum(read_timing(root).values())), True
    stamps = sorted(p.stat().st_mtime for p in root.glob("shard_*.safetensors"))
    if len(stamps) < 2:
        return float("nan"), False
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return float(sum(gaps) + sorted(gaps)[len(gaps) // 2]), False
