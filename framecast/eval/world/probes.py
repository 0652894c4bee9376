"""Small conv nets trained only on real frames of a training recording, to read generated frames
(docs/world_model.md, metrics).

* inverse dynamics (IDM): (frame f-1, frame f) -> the action that led to f. Its accuracy on held-out real
  transitions is the ceiling (below 100 %: a forward into a wall looks exactly like `stay`), against actions
  shuffled across episodes it is the floor; on generated transitions it says whether the model shows the
  action it was given.
* state probe: one frame -> the recorded state (MiniGrid x, y, heading; Breakout paddle / ball), so a
  generated rollout can be compared with the true trajectory in the state's own units. On real held-out
  frames: Breakout (probe trained on 256 recorded episodes) paddle_x MAE 0.6 RAM units vs 40 for the best
  constant guess; MiniGrid's egocentric view shows neither absolute position nor heading (x MAE 4.19 vs 4.18
  constant, heading 27.5 % vs 24.7 %), so there the probe is reported but uninformative -- report.real_reference
  gives both numbers.

Both are deterministic per seed and cached on disk keyed by the training recording's manifest and their
settings (eval/cache.py, as eval/features.py caches its encoder), so reruns are instant.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...data.envs import load_episodes, read_manifest
from ..cache import load_or_train
from .pixels import to_video

Tensor = torch.Tensor


def as_episodes(data) -> dict:
    """A recording (a folder, loaded) or an already loaded load_episodes dict."""
    return load_episodes(data) if isinstance(data, (str, Path)) else data


# ------------------------------------------------------------------------------------------------
# The networks
# ------------------------------------------------------------------------------------------------


def _trunk(cin: int, width: int) -> nn.Sequential:
    """Three stride-2 convs and a 4x4 adaptive pool: keeps the coarse layout (where the walls are matters for
    the probe, which way the view moved for the IDM) at any frame size >= 8 px, for a few MFLOP a 32 px frame."""
    return nn.Sequential(
        nn.Conv2d(cin, width, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * width, 4 * width), nn.GELU())


class InverseDynamics(nn.Module):
    """(prev, next) frames in [-1, 1] concatenated on channels [B, 6, H, W] -> logits over the real actions
    [B, num_actions] (never the null action: every recorded transition has a real one)."""

    def __init__(self, num_actions: int, width: int = 32) -> None:
        super().__init__()
        # the difference is given explicitly as well: `stay` is then an all-zero input, motion is local
        self.body = _trunk(9, width)
        self.head = nn.Linear(4 * width, num_actions)
        self.num_actions = num_actions

    def forward(self, pair: Tensor) -> Tensor:
        if pair.ndim != 4 or pair.shape[1] != 6:
            raise ValueError(f"the IDM takes (prev, next) frame pairs [B, 6, H, W], got {tuple(pair.shape)}")
        pair = pair.float().clamp(-1, 1)  # generated frames may overshoot [-1, 1]
        return self.head(self.body(torch.cat([pair, pair[:, 3:] - pair[:, :3]], 1)))  # [B, A]


def _kinds(fields: list[str]) -> list[str]:
    """A heading/direction is a class (4 discrete values, no order across the wrap-around); positions are
    regressed and scored by mean absolute error in their own units."""
    return ["class" if f in ("heading", "dir", "direction") else "reg" for f in fields]


class StateProbe(nn.Module):
    """One frame in [-1, 1] [B, 3, H, W] -> the recorded state, field by field: logits for class fields,
    one normalised value for regression fields. `predict` gives [B, S] in the fields' units."""

    def __init__(self, fields: list[str], kinds: list[str], classes: list[int], width: int = 32) -> None:
        super().__init__()
        if not (len(fields) == len(kinds) == len(classes)) or any(k not in ("class", "reg") for k in kinds):
            raise ValueError(f"fields {fields}, kinds {kinds} (class or reg), classes {classes} must align")
        self.fields, self.kinds, self.classes = list(fields), list(kinds), [int(c) for c in classes]
        self.sizes = [c if k == "class" else 1 for k, c in zip(self.kinds, self.classes)]
        self.body = _trunk(3, width)
        self.head = nn.Linear(4 * width, sum(self.sizes))
        S = len(fields)
        # regression targets are standardised with training statistics; `baseline` is the best constant guess
        # (median / majority class), the floor a probe has to beat
        self.register_buffer("mean", torch.zeros(S))
        self.register_buffer("std", torch.ones(S))
        self.register_buffer("baseline", torch.zeros(S))

    def forward(self, frames: Tensor) -> list[Tensor]:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"the state probe takes frames [B, 3, H, W], got {tuple(frames.shape)}")
        out = self.head(self.body(frames.float().clamp(-1, 1)))  # [B, sum(sizes)]
        return list(out.split(self.sizes, dim=1))

    def loss(self, frames: Tensor, state: Tensor) -> Tensor:
        total = 0.0
        for i, (kind, out) in enumerate(zip(self.kinds, self(frames))):
            if kind == "class":
                total = total + nn.functional.cross_entropy(out, state[:, i].long())
            else:
                target = (state[:, i].float() - self.mean[i]) / self.std[i]
                total = total + nn.functional.smooth_l1_loss(out[:, 0], target)
        return total

    def predict(self, frames: Tensor) -> Tensor:
        cols = [out.argmax(1).float() if kind == "class" else out[:, 0] * self.std[i] + self.mean[i]
                for i, (kind, out) in enumerate(zip(self.kinds, self(frames)))]
        return torch.stack(cols, 1)  # [B, S]


# ------------------------------------------------------------------------------------------------
# Training on a real recording, and the on-disk cache
# ------------------------------------------------------------------------------------------------


def _fit(net: nn.Module, loss_fn, batch_fn, *, steps: int, lr: float, seed: int, desc: str,
         progress: bool) -> dict:
    """AdamW with a short warm-up, then cosine decay (stable at batch 128 and lr 2e-3); the final loss."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        loss = loss_fn(*batch_fn(g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:])}


def _init(cls, *args, seed: int, **kw):
    """Build a network with weights drawn from `seed` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kw)


def train_idm(episodes, *, steps: int = 1500, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
              width: int = 32, progress: bool = True) -> tuple[InverseDynamics, dict]:
    """Train the IDM on every real transition f-1 -> f (f >= 1) of a recording (a folder or load_episodes dict).
    Returns it in eval mode with its final training loss."""
    ep = as_episodes(episodes)
    frames, actions = ep["frames"], ep["actions"]  # [E, F, 3, H, W] uint8, [E, F]
    E, F = actions.shape
    A = int(ep["manifest"]["null_action"])
    if F < 2 or int(actions[:, 1:].max()) >= A:
        raise ValueError(f"the IDM needs episodes of >= 2 frames with real actions < {A}, got {tuple(actions.shape)}")
    idm = _init(InverseDynamics, A, width, seed=seed)

    def batch(g):
        e = torch.randint(0, E, (batch_size,), generator=g)
        f = torch.randint(1, F, (batch_size,), generator=g)
        pair = torch.cat([to_video(frames[e, f - 1]), to_video(frames[e, f])], 1)  # [B, 6, H, W]
        return pair, actions[e, f]

    stats = _fit(idm, lambda x, y: nn.functional.cross_entropy(idm(x), y), batch, steps=steps, lr=lr,
                 seed=seed, desc="IDM", progress=progress)
    return idm, stats


def train_probe(episodes, *, steps: int = 2000, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                width: int = 32, kinds: list[str] | None = None, progress: bool = True) -> tuple[StateProbe, dict]:
    """Train the state probe on every real frame of a recording, for all of its manifest's state_fields."""
    ep = as_episodes(episodes)
    frames, state = ep["frames"].flatten(0, 1), ep["state"].flatten(0, 1)  # [N, 3, H, W] uint8, [N, S]
    fields = list(ep["manifest"]["state_fields"])
    kinds = kinds or _kinds(fields)
    if state.shape[1] != len(fields) or len(kinds) != len(fields):
        raise ValueError(f"state has {state.shape[1]} fields, the manifest names {fields}, kinds {kinds}")
    classes = [int(state[:, i].max()) + 1 if k == "class" else 0 for i, k in enumerate(kinds)]
    probe = _init(StateProbe, fields, kinds, classes, width, seed=seed)
    s = state.float()
    with torch.no_grad():
        probe.mean.copy_(s.mean(0))
        probe.std.copy_(s.std(0).clamp_min(1e-3))
        probe.baseline.copy_(torch.stack([s[:, i].mode().values if k == "class" else s[:, i].median()
                                          for i, k in enumerate(kinds)]))
    N = len(frames)

    def batch(g):
        i = torch.randint(0, N, (batch_size,), generator=g)
        return to_video(frames[i]), state[i]

    stats = _fit(probe, probe.loss, batch, steps=steps, lr=lr, seed=seed, desc="state probe", progress=progress)
    return probe, stats


def _cached(kind: str, train_root: str | Path, cache_dir: str | Path, settings: dict, build, train):
    """`kind` trained on the recording `train_root`, cached under a key of its manifest and `settings`."""
    root = Path(train_root)
    manifest = read_manifest(root)  # the IDM and the probe train on a recording
    key = {"kind": kind, "version": 1, "manifest": manifest, **settings}
    return load_or_train(cache_dir, kind, key, build, lambda: train(load_episodes(root)))


def load_or_train_idm(train_root: str | Path, cache_dir: str | Path, *, steps: int = 1500, seed: int = 0,
                      batch_size: int = 128, lr: float = 2e-3, width: int = 32,
                      progress: bool = True) -> tuple[InverseDynamics, dict]:
    """The IDM of a training recording, trained once and cached under `cache_dir` (keyed by the recording's
    manifest and these settings). Returns (idm in eval mode, info)."""
    settings = dict(steps=steps, seed=seed, batch_size=batch_size, lr=lr, width=width)
    return _cached("idm", train_root, cache_dir, settings,
                   lambda info: InverseDynamics(int(info["manifest"]["null_action"]), width),
                   lambda ep: train_idm(ep, progress=progress, **settings))


def load_or_train_probe(train_root: str | Path, cache_dir: str | Path, *, steps: int = 2000, seed: int = 0,
                        batch_size: int = 128, lr: float = 2e-3, width: int = 32, kinds: list[str] | None = None,
                        progress: bool = True) -> tuple[StateProbe, dict]:
    """The state probe of a training recording, trained once and cached like load_or_train_idm."""
    settings = dict(steps=steps, seed=seed, batch_size=batch_size, lr=lr, width=width, kinds=kinds)

    def train(ep):
        probe, stats = train_probe(ep, progress=progress, **settings)
        return probe, {**stats, "fields": probe.fields, "kinds": probe.kinds, "classes": probe.classes}

    return _cached("probe", train_root, cache_dir, settings,
                   lambda info: StateProbe(info["fields"], info["kinds"], info["classes"], width), train)


# ------------------------------------------------------------------------------------------------
# Scoring frames with the IDM and the probe
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def idm_predict(idm: InverseDynamics, video: Tensor, *, start: int = 1, batch_size: int = 512) -> Tensor:
    """The IDM's action for every transition f-1 -> f, f >= start, of clips [E, F, 3, H, W] in [-1, 1] ->
    [E, F - start] action ids."""
    E, F = video.shape[:2]
    if video.ndim != 5 or not 1 <= start < F:
        raise ValueError(f"idm_predict needs clips [E, F >= 2, 3, H, W] and 1 <= start < F, got "
                         f"{tuple(video.shape)}, start {start}")
    pairs = torch.cat([video[:, start - 1:-1], video[:, start:]], 2).flatten(0, 1)  # [E*(F-start), 6, H, W]
    out = torch.cat([idm(pairs[i:i + batch_size]).argmax(1) for i in range(0, len(pairs), batch_size)])
    return out.view(E, F - start)


def idm_accuracy(idm: InverseDynamics, video: Tensor, actions: Tensor, *, start: int = 1) -> float:
    """Fraction of transitions f-1 -> f (f >= start) of clips [E, F, 3, H, W] in [-1, 1] whose IDM action is
    actions[:, f] (actions [E, F], actions[:, f] leads to frame f)."""
    if actions.shape != video.shape[:2]:
        raise ValueError(f"actions {tuple(actions.shape)} do not match clips {tuple(video.shape[:2])}")
    return float((idm_predict(idm, video, start=start) == actions[:, start:]).float().mean())


def confusion(pred: Tensor, target: Tensor, num_actions: int) -> list[list[int]]:
    """Counts [true action][IDM action]: per class, to see which actions a model blurs together."""
    flat = target.flatten() * num_actions + pred.flatten()
    return torch.bincount(flat, minlength=num_actions**2).view(num_actions, num_actions).tolist()


def turn_confusion(counts: list[list[int]], action_names) -> float | None:
    """Of the transitions recorded as `left` or `right`, the fraction the IDM reads as the other turn (from
    `confusion` counts [true][IDM]); None where the actions have no left and right turn. A model that turns
    but cannot tell which way reads near 0.5 (docs/world_model.md, "Left and right")."""
    names = list(action_names)
    if "left" not in names or "right" not in names:
        return None
    left, right = names.index("left"), names.index("right")
    turns = sum(counts[left]) + sum(counts[right])
    return (counts[left][right] + counts[right][left]) / turns if turns else None


@torch.no_grad()
def probe_predict(probe: StateProbe, video: Tensor, batch_size: int = 512) -> Tensor:
    """Probe state of frames [..., 3, H, W] in [-1, 1] -> [..., S] in the fields' units."""
    flat = video.reshape(-1, *video.shape[-3:])
    out = torch.cat([probe.predict(flat[i:i + batch_size]) for i in range(0, len(flat), batch_size)])
    return out.view(*video.shape[:-3], len(probe.fields))


def probe_scores(probe: StateProbe, pred_state: Tensor, state: Tensor, suffix: str = "") -> dict[str, float]:
    """Per field: accuracy (`probe_<field>_acc`) for class fields, mean absolute error in the field's units
    (`probe_<field>_mae`) for regression fields, of predicted [..., S] against true [..., S]."""
    if pred_state.shape != state.shape:
        raise ValueError(f"probe predictions {tuple(pred_state.shape)} vs states {tuple(state.shape)}")
    out = {}
    for i, (f, k) in enumerate(zip(probe.fields, probe.kinds)):
        p, t = pred_state[..., i].float(), state[..., i].float()
        if k == "class":
            out[f"probe_{f}_acc{suffix}"] = float((p == t).float().mean())
        else:
            out[f"probe_{f}_mae{suffix}"] = float((p - t).abs().mean())
    return out
