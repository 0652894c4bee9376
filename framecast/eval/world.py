"""World-model metrics on held-out recorded episodes (issue: world model, point 3; docs/world_model.md, metrics).

Open loop: the model sees the first `context` frames of an episode and generates the rest under the recorded
actions (actions[:, f] leads to frame f), with no access to later ground truth. PSNR against the recorded
frames per horizon says how well it predicts; the same with actions shuffled across episodes gives
ΔPSNR = PSNR(real) - PSNR(shuffled), which is near 0 for a model that ignores its actions (controllability).

Pixel metrics reward blur and cannot say *which* action a clip shows, so three probes trained only on real
frames of a training recording read the generated frames (§4.3, §4.5, §4.6):

* inverse dynamics (IDM): (frame f-1, frame f) -> the action that led to f. Its accuracy on held-out real
  transitions is the ceiling (below 100 %: a forward into a wall looks exactly like `stay`, §3.4), against
  actions shuffled across episodes it is the floor; on generated transitions it says whether the model shows
  the action it was given.
* state probe: one frame -> the recorded state (MiniGrid x, y, heading; Breakout paddle / ball), so a
  generated rollout can be compared with the true trajectory in the state's own units. Measured on real
  held-out frames: Breakout (probe trained on 256 recorded episodes) paddle_x MAE 0.6 RAM units vs 40 for the
  best constant guess; MiniGrid's egocentric view shows neither absolute position nor heading (x MAE 4.19
  vs 4.18 constant, heading 27.5 % vs 24.7 %), so there the probe is reported but uninformative --
  `real_reference` gives both numbers, and the benchmark says so when they are close.
* layout (MiniGrid, a colour rule, nothing learned): the 7x7 cells of the egocentric view as unseen / floor /
  wall, and the free cells straight ahead -- the agent's local state, visible in one frame. Generated vs
  recorded layout under the recorded actions, under shuffled ones, and for a world that never moves.
* loop closure (MiniGrid): four turns in place return exactly to the start view in the real environment;
  a world model that keeps a consistent world should come back too (Genie-3-style revisit consistency).

The IDM and the probe are small conv nets, deterministic per seed and cached on disk keyed by the training
recording's manifest and their settings (as eval/features.py caches its encoder), so reruns are instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..models.conditioning import Cond

Tensor = torch.Tensor


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per frame for frames in [-1, 1] (peak-to-peak 2): [..., C, H, W] -> [...]."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr of {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = ((pred.float() - target.float()) ** 2).flatten(-3).mean(-1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def ssim(pred: Tensor, target: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM per frame (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, valid positions only, mean over
    channels) for frames in [-1, 1]: [..., C, H, W] -> [...]. The window shrinks (odd) for frames under 11 px."""
    if pred.shape != target.shape:
        raise ValueError(f"ssim of {tuple(pred.shape)} vs {tuple(target.shape)}")
    lead, (C, H, W) = pred.shape[:-3], pred.shape[-3:]
    window = min(window, H, W)
    window -= 1 - window % 2  # odd, so the window has a centre
    x = pred.float().reshape(-1, C, H, W)
    y = target.float().reshape(-1, C, H, W)
    r = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g1 = torch.exp(-r**2 / (2 * sigma**2))
    g1 = g1 / g1.sum()
    kernel = (g1[:, None] * g1[None, :]).expand(C, 1, window, window)  # [C, 1, k, k] depthwise

    def blur(t: Tensor) -> Tensor:
        return nn.functional.conv2d(t, kernel, groups=C)  # [N, C, H-k+1, W-k+1]

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # data range 2 for [-1, 1]
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).reshape(lead)


def to_video(frames_uint8: Tensor) -> Tensor:
    return frames_uint8.float() / 127.5 - 1


@torch.no_grad()
def open_loop(model, meta: dict, text_encoder, frames: Tensor, actions: Tensor, *, context: int = 1,
              seed: int = 0, **sample_kw) -> Tensor:
    """Generate frames [context, F) of each episode from its first `context` frames and its actions.
    `sample_kw` go to pipeline.sample (e.g. steps=, guidance= to override the checkpoint's)."""
    from ..pipeline import sample

    E, F = actions.shape
    if frames.shape[:2] != (E, F) or not 0 < context < F:
        raise ValueError(f"episodes {tuple(frames.shape)} / actions {tuple(actions.shape)} with context {context}")
    video = to_video(frames)
    text = text_encoder.encode([""] * E)
    null_action = int(actions[:, 0].max())
    cond = Cond(text, actions)
    null = Cond(text.clone(), torch.full_like(actions, null_action))
    return sample(model, meta, cond, null, num_frames=F - context, seed=seed, context=video[:, :context], **sample_kw)


def shuffle_actions(actions: Tensor, context: int = 1) -> Tensor:
    """Every episode gets the next episode's actions after its context (torch.roll: no episode keeps its own,
    and the action statistics are unchanged, so only the pairing with the frames is lost)."""
    perm = torch.roll(torch.arange(len(actions)), 1)
    out = actions.clone()
    out[:, context:] = actions[perm][:, context:]  # [E, F]
    return out


def controllability(model, meta: dict, text_encoder, frames: Tensor, actions: Tensor, *, context: int = 1,
                    seed: int = 0) -> dict:
    """Mean PSNR (and per horizon) under the recorded actions and under actions shuffled across episodes."""
    target = to_video(frames[:, context:])
    real = psnr(open_loop(model, meta, text_encoder, frames, actions, context=context, seed=seed), target)
    shuffled_actions = shuffle_actions(actions, context)
    shuf = psnr(open_loop(model, meta, text_encoder, frames, shuffled_actions, context=context, seed=seed), target)
    return {"psnr": float(real.mean()), "psnr_shuffled": float(shuf.mean()),
            "delta_psnr": float(real.mean() - shuf.mean()),
            "psnr_by_horizon": real.mean(0).tolist(), "psnr_shuffled_by_horizon": shuf.mean(0).tolist()}


# ------------------------------------------------------------------------------------------------
# Small frame networks trained on real frames (IDM, state probe)
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


def _fit(net: nn.Module, loss_fn, batch_fn, *, steps: int, lr: float, seed: int, desc: str,
         progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)  # short warm-up, then cosine decay: stable at batch 128 and lr 2e-3
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
    return losses


def _init(cls, *args, seed: int, **kw):
    """Build a network with weights drawn from `seed` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kw)


def _episodes(data) -> dict:
    from ..data.envs import load_episodes

    return load_episodes(data) if isinstance(data, (str, Path)) else data


def train_idm(episodes, *, steps: int = 1500, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
              width: int = 32, progress: bool = True) -> tuple[InverseDynamics, dict]:
    """Train the IDM on every real transition f-1 -> f (f >= 1) of a recording (a folder or load_episodes dict).
    Returns it in eval mode with its final training loss."""
    ep = _episodes(episodes)
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

    losses = _fit(idm, lambda x, y: nn.functional.cross_entropy(idm(x), y), batch, steps=steps, lr=lr,
                  seed=seed, desc="IDM", progress=progress)
    return idm.eval(), {"final_loss": sum(losses[-50:]) / len(losses[-50:])}


def train_probe(episodes, *, steps: int = 2000, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                width: int = 32, kinds: list[str] | None = None, progress: bool = True) -> tuple[StateProbe, dict]:
    """Train the state probe on every real frame of a recording, for all of its manifest's state_fields."""
    ep = _episodes(episodes)
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

    losses = _fit(probe, probe.loss, batch, steps=steps, lr=lr, seed=seed, desc="state probe", progress=progress)
    return probe.eval(), {"final_loss": sum(losses[-50:]) / len(losses[-50:])}


def _cached(kind: str, train_root: str | Path, cache_dir: str | Path, settings: dict, build, train):
    """`kind` trained on the recording `train_root`, cached under a key of its manifest and `settings`."""
    from ..data.envs import load_episodes
    from .cache import load_or_train

    root = Path(train_root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"the {kind} trains on a recording; {root} has no readable manifest.json "
                                f"({e})") from None
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
    """Counts [true action][IDM action] (research §4.3: per-class, to see which actions a model blurs together)."""
    flat = target.flatten() * num_actions + pred.flatten()
    return torch.bincount(flat, minlength=num_actions**2).view(num_actions, num_actions).tolist()


@torch.no_grad()
def probe_predict(probe: StateProbe, video: Tensor, batch_size: int = 512) -> Tensor:
    """Probe state of frames [..., 3, H, W] in [-1, 1] -> [..., S] in the fields' units."""
    flat = video.reshape(-1, *video.shape[-3:])
    out = torch.cat([probe.predict(flat[i:i + batch_size]) for i in range(0, len(flat), batch_size)])
    return out.view(*video.shape[:-3], len(probe.fields))


def probe_scores(probe: StateProbe, pred_state: Tensor, state: Tensor, suffix: str = "") -> dict[str, float]:
    """Per field: accuracy (`<field>_acc`) for class fields, mean absolute error in the field's units
    (`<field>_mae`) for regression fields, of predicted [..., S] against true [..., S]."""
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


def _select(eval_episodes: dict, episodes: int | None) -> tuple[Tensor, Tensor, Tensor, dict]:
    ep = _episodes(eval_episodes)
    n = len(ep["actions"]) if episodes is None else episodes
    if not 2 <= n <= len(ep["actions"]):
        raise ValueError(f"need 2..{len(ep['actions'])} episodes (shuffling pairs them up), got {n}")
    return ep["frames"][:n], ep["actions"][:n], ep["state"][:n], ep["manifest"]


def real_reference(eval_episodes, idm: InverseDynamics, probe: StateProbe | None = None, *, context: int = 1,
                   episodes: int | None = None) -> dict:
    """Ceiling and floor on held-out REAL frames, for the same frames/transitions world_metrics scores
    (transitions into frames f >= context, frames f >= context):

    idm_acc: IDM on real transitions vs the recorded actions -- the ceiling (< 100 %: a blocked forward shows
      the same pair of frames as `stay`, research §3.4); idm_acc_shuffled: the same transitions vs actions
      shuffled across episodes -- the floor (what agreeing by chance with the action statistics gives);
    idm_confusion: counts [recorded action][IDM action];
    probe_<field>_{acc,mae}: probe on real frames (ceiling); ..._const: the best constant guess (floor)."""
    frames, actions, state, manifest = _select(eval_episodes, episodes)
    video = to_video(frames)  # [E, F, 3, H, W]
    pred = idm_predict(idm, video, start=context)  # [E, F-context]
    rec = actions[:, context:]
    out = {"idm_acc": float((pred == rec).float().mean()),
           "idm_acc_shuffled": float((pred == shuffle_actions(actions, context)[:, context:]).float().mean()),
           "idm_confusion": confusion(pred, rec, idm.num_actions)}
    if manifest.get("env") == "minigrid":  # a world that never moves: the last context frame held still
        frozen = video[:, context - 1:context].expand_as(video[:, context:])
        out.update(layout_scores(frozen, video[:, context:], manifest, "_frozen"))
    if probe is not None:
        target = state[:, context:]  # [E, F-context, S]
        out.update(probe_scores(probe, probe_predict(probe, video[:, context:]), target))
        const = probe.baseline.expand_as(target)
        out.update(probe_scores(probe, const, target, "_const"))
    return out


# ------------------------------------------------------------------------------------------------
# MiniGrid's egocentric layout, read from pixels by a colour rule (no learned net)
# ------------------------------------------------------------------------------------------------

# Mean brightness of a cell of MiniGrid's egocentric view (the visible-cell highlight included), measured on
# recorded frames: unseen cells are black, floor 76, wall 146 (the agent's cell reads as floor, the goal as
# wall). The view is the agent's local state -- what is around and ahead of it -- which, unlike x, y and
# heading, is visible in one frame (docs/world_model.md, metrics: "wall layout (egocentric)").
LAYOUT_CLASSES = ("unseen", "floor", "wall")
LAYOUT_LEVELS = (0.0, 76.0, 146.0)
VIEW_CELLS = 7  # MiniGrid's default agent_view_size


def minigrid_layout(video: Tensor, *, tile: int, size: int, cells: int = VIEW_CELLS) -> Tensor:
    """Frames [..., 3, H, W] in [-1, 1] -> cell classes [..., cells, cells] (LAYOUT_CLASSES), the agent at the
    bottom-middle cell looking up. `tile` and `size` are the recording's (its manifest)."""
    view = cells * tile
    off = (size - view) // 2  # framecast record pads the view to size x size, centred
    if off < 0 or tuple(video.shape[-2:]) != (size, size):
        raise ValueError(f"frames of {tuple(video.shape[-2:])} px do not hold a {cells}x{cells}-cell view at tile "
                         f"{tile} padded to {size}")
    x = (video.float().clamp(-1, 1) + 1) * 127.5
    x = x[..., off:off + view, off:off + view].mean(-3)  # [..., view, view] brightness
    cell = x.unflatten(-2, (cells, tile)).unflatten(-1, (cells, tile)).mean((-3, -1))  # [..., cells, cells]
    levels = torch.tensor(LAYOUT_LEVELS)
    return (cell[..., None] - levels).abs().argmin(-1)


def free_ahead(layout: Tensor) -> Tensor:
    """Floor cells straight ahead of the agent before the first non-floor cell: [..., cells, cells] -> [...]
    (0: facing a wall -- `forward` cannot move)."""
    cells = layout.shape[-1]
    column = layout[..., : cells - 1, cells // 2].flip(-1)  # [..., cells-1]: from the agent's cell upward
    blocked = column != LAYOUT_CLASSES.index("floor")
    first = blocked.float().argmax(-1)  # index of the first non-floor cell
    return torch.where(blocked.any(-1), first, torch.full_like(first, cells - 1))


def layout_scores(pred: Tensor, target: Tensor, manifest: dict, suffix: str = "") -> dict[str, float]:
    """Cell accuracy of the generated layout vs the recorded one, and the error of the free cells ahead."""
    kw = dict(tile=int(manifest["tile"]), size=int(manifest["size"]))
    lp, lt = minigrid_layout(pred, **kw), minigrid_layout(target, **kw)  # [..., 7, 7]
    return {f"layout_acc{suffix}": float((lp == lt).float().mean()),
            f"ahead_mae{suffix}": float((free_ahead(lp) - free_ahead(lt)).abs().float().mean())}


# ------------------------------------------------------------------------------------------------
# Loop closure and the one-call summary
# ------------------------------------------------------------------------------------------------

LOOP_SEQUENCES = ("left", "right", "stay")


def loop_scores(start: Tensor, generated: dict[str, Tensor]) -> dict:
    """PSNR of each generated step to the start view: start [N, 3, H, W], generated[name] [N, T, 3, H, W]
    (in [-1, 1]) after T turns of one kind. `loop_psnr` (after T turns, T = a full circle: the same view in
    the real world) should be high; `half_turn_psnr` (after T/2 turns: the opposite view) and the start of
    `by_step` give the scale of a different view; `stay_psnr` (after T stays) is what the model can do at best."""
    by_step = {k: psnr(v, start[:, None].expand_as(v)).mean(0).tolist() for k, v in generated.items()}
    T = len(by_step["left"])
    return {"loop_psnr": (by_step["left"][-1] + by_step["right"][-1]) / 2,
            "half_turn_psnr": (by_step["left"][T // 2 - 1] + by_step["right"][T // 2 - 1]) / 2,
            "stay_psnr": by_step["stay"][-1], "by_step": by_step}


@torch.no_grad()
def loop_closure(model, meta: dict, text_encoder, start_frames: Tensor, *, action_names, turns: int = 4,
                 seed: int = 0, **sample_kw) -> dict:
    """From clean start views (uint8 [N, 3, H, W], one context frame each) generate open loop under
    [left x turns], [right x turns] and [stay x turns] in one batch, and score with loop_scores.

    Only meaningful where `turns` turns are a full circle (MiniGrid: 4 x 90 degrees)."""
    names = list(action_names)
    missing = [a for a in LOOP_SEQUENCES if a not in names]
    if missing or turns < 2 or turns % 2:
        raise ValueError(f"loop closure needs actions {LOOP_SEQUENCES} (have {names}, missing {missing}) and an "
                         f"even number of turns, got {turns}")
    N = len(start_frames)
    null = len(names)
    acts = torch.tensor([[null] + [names.index(a)] * turns for a in LOOP_SEQUENCES])  # [3, 1+T]
    acts = acts.repeat_interleave(N, 0)  # [3N, 1+T]: N starts per sequence
    frames = start_frames[None].expand(len(LOOP_SEQUENCES), *start_frames.shape).flatten(0, 1)  # [3N, 3, H, W]
    frames = frames[:, None].expand(-1, turns + 1, -1, -1, -1)  # [3N, 1+T, 3, H, W]: only frame 0 is read
    gen = open_loop(model, meta, text_encoder, frames, acts, context=1, seed=seed, **sample_kw)  # [3N, T, 3, H, W]
    return loop_scores(to_video(start_frames), dict(zip(LOOP_SEQUENCES, gen.split(N))))


def world_metrics(model, meta: dict, text_encoder, eval_episodes, idm: InverseDynamics | None = None,
                  probe: StateProbe | None = None, *, context: int = 1, seed: int = 0, episodes: int | None = None,
                  loop_starts: int | None = 32, **sample_kw) -> dict:
    """All world-model metrics of one model on held-out episodes (a folder or load_episodes dict), from two
    open-loop rollouts with the same seed: under the recorded actions and under shuffled ones (so a model
    that ignores actions scores exactly the same in both).

    psnr / ssim (+ _shuffled, by_horizon), delta_psnr: fidelity and ΔPSNR controllability (§4.1, §4.2);
    idm_acc: IDM on generated transitions (context frame -> first generated frame included) vs the recorded
      actions that drove them;
    idm_acc_shuffled: the shuffled-action rollout read against the recorded actions -- the model's floor (the
      same number as idm_acc for a model that ignores actions);
    idm_acc_followed_shuffled: the shuffled-action rollout against the shuffled actions it was given;
    idm_acc_by_horizon, idm_confusion ([recorded action][IDM action] counts) for the recorded-action rollout;
    probe_<field>_{acc,mae}(+_shuffled): the probe on generated frames vs the recorded state (§4.5);
    loop: loop_closure from the start frames of the first `loop_starts` episodes (MiniGrid; None elsewhere).
    Compare with real_reference(...) for the ceilings and floors on real frames."""
    frames, actions, state, manifest = _select(eval_episodes, episodes)
    shuffled = shuffle_actions(actions, context)
    gen = open_loop(model, meta, text_encoder, frames, actions, context=context, seed=seed, **sample_kw)
    gen_s = open_loop(model, meta, text_encoder, frames, shuffled, context=context, seed=seed, **sample_kw)
    target = to_video(frames[:, context:])  # [E, F-context, 3, H, W]
    p, p_s = psnr(gen, target), psnr(gen_s, target)  # [E, F-context]
    s, s_s = ssim(gen, target), ssim(gen_s, target)
    out = {"episodes": len(actions), "context": context,
           "psnr": float(p.mean()), "psnr_shuffled": float(p_s.mean()), "delta_psnr": float(p.mean() - p_s.mean()),
           "ssim": float(s.mean()), "ssim_shuffled": float(s_s.mean()),
           "psnr_by_horizon": p.mean(0).tolist(), "psnr_shuffled_by_horizon": p_s.mean(0).tolist()}
    if idm is not None:
        ctx = to_video(frames[:, :context])
        full, full_s = torch.cat([ctx, gen], 1), torch.cat([ctx, gen_s], 1)  # [E, F, 3, H, W]
        pred, pred_s = idm_predict(idm, full, start=context), idm_predict(idm, full_s, start=context)  # [E, F-ctx]
        rec = actions[:, context:]
        out.update(idm_acc=float((pred == rec).float().mean()), idm_acc_shuffled=float((pred_s == rec).float().mean()),
                   idm_acc_followed_shuffled=float((pred_s == shuffled[:, context:]).float().mean()),
                   idm_acc_by_horizon=(pred == rec).float().mean(0).tolist(),
                   idm_confusion=confusion(pred, rec, idm.num_actions))
    if manifest.get("env") == "minigrid":
        out.update(layout_scores(gen, target, manifest))
        out.update(layout_scores(gen_s, target, manifest, "_shuffled"))
    if probe is not None:
        truth = state[:, context:]  # [E, F-context, S]
        out.update(probe_scores(probe, probe_predict(probe, gen), truth))
        out.update(probe_scores(probe, probe_predict(probe, gen_s), truth, "_shuffled"))
    out["loop"] = None
    if manifest.get("env") == "minigrid" and loop_starts != 0:
        n = len(actions) if loop_starts is None else min(loop_starts, len(actions))
        out["loop"] = loop_closure(model, meta, text_encoder, frames[:n, 0], action_names=manifest["actions"],
                                   seed=seed, **sample_kw)
    return out
