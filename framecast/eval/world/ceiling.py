"""How much of an open-loop MiniGrid rollout one context frame determines: the layout-accuracy ceiling.

The egocentric view shows a 7x7-cell patch in front of the agent. Once it turns or walks, part of the new view
covers cells it has never seen: no model given only the first frame can know them. `context_ceiling` scores an
oracle that is given more than any world model has (the true pose and the true visibility of every cell at
every frame) and predicts each visible cell from what frame 0 showed of that world position; a cell frame 0
did not show gets a guess: a wall if it continues a wall frame 0 showed (two walls in a row before it along a
row or column: FourRooms' walls are straight), else the most frequent class of such cells at that view position,
fitted on the episodes scored (a generous guess). Its accuracy bounds what a world model can reach from one
frame, up to a better guess on the unseen cells (docs/world_model.md, "What one frame determines").
"""

from __future__ import annotations

import numpy as np
import torch

from .layout import LAYOUT_CLASSES, VIEW_CELLS, minigrid_layout

# MiniGrid's heading -> unit step in the grid (minigrid.core.constants.DIR_TO_VEC): east, south, west, north
DIR_TO_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))
UNSEEN, FLOOR, WALL = (LAYOUT_CLASSES.index(c) for c in ("unseen", "floor", "wall"))


def view_world_coords(state: np.ndarray, cells: int = VIEW_CELLS) -> np.ndarray:
    """World cell (x, y) of every view cell: state [..., 3] (x, y, heading) -> [..., cells, cells, 2]. View row r,
    column c (the agent at the bottom-middle looking up) is `cells - 1 - r` cells ahead and `c - cells // 2` to
    the right: the inverse of MiniGridEnv.get_view_coords."""
    state = np.asarray(state, dtype=np.int64)
    vec = np.asarray(DIR_TO_VEC, dtype=np.int64)[state[..., 2]]  # [..., 2] forward
    right = np.stack([-vec[..., 1], vec[..., 0]], -1)  # [..., 2]: MiniGridEnv.right_vec
    r, c = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    ahead, side = cells - 1 - r, c - cells // 2  # [cells, cells]
    pos = state[..., None, None, :2]  # [..., 1, 1, 2]
    return pos + ahead[..., None] * vec[..., None, None, :] + side[..., None] * right[..., None, None, :]


def context_ceiling(frames: torch.Tensor, state: torch.Tensor, manifest: dict, context: int = 1) -> dict:
    """The oracle above over frames [context, F) of recorded episodes: frames uint8 [E, F, 3, H, W], state
    [E, F, 3]. Returns its layout accuracy (overall and per horizon), the fractions of unseen / already-seen /
    never-seen cells, the frozen world's accuracy for scale, and `seen_consistent` (1.0 when the geometry is
    right: a world position shown twice shows the same class)."""
    if frames.ndim != 5 or state.shape[:2] != frames.shape[:2] or state.shape[-1] < 3:
        raise ValueError(f"frames {tuple(frames.shape)} and state {tuple(state.shape)}: need [E, F, 3, H, W] "
                         f"and [E, F, >=3] (x, y, heading)")
    E, F = frames.shape[:2]
    if not 0 < context < F:
        raise ValueError(f"context {context} must be in [1, {F})")
    lay = minigrid_layout(frames.float() / 127.5 - 1, tile=int(manifest["tile"]), size=int(manifest["size"]),
                          align=manifest.get("align", "center"))
    lay = lay.numpy()  # [E, F, 7, 7]
    xy = view_world_coords(state.numpy()[..., :3])  # [E, F, 7, 7, 2]
    n = lay.shape[-1]
    known = np.full((E, F, n, n), -1)  # the class frame(s) < context showed at that world position, -1: never
    for e in range(E):
        seen: dict[tuple[int, int], int] = {}
        for f in range(context):
            for (x, y), k in zip(xy[e, f].reshape(-1, 2).tolist(), lay[e, f].ravel().tolist()):
                if k != UNSEEN:
                    seen[(x, y)] = k
        walls = {p for p, k in seen.items() if k == WALL}
        for f in range(context, F):
            known[e, f] = np.array([seen.get((x, y), -1) for x, y in xy[e, f].reshape(-1, 2).tolist()]).reshape(n, n)
            cont = np.array([any((x + a, y + b) in walls and (x + 2 * a, y + 2 * b) in walls
                                 for a, b in DIR_TO_VEC) for x, y in xy[e, f].reshape(-1, 2).tolist()])
            known[e, f] = np.where((known[e, f] < 0) & cont.reshape(n, n), -2, known[e, f])  # -2: continues a wall
    true, known = lay[:, context:], known[:, context:]  # [E, T, 7, 7]
    seen_mask = (true != UNSEEN) & (known >= 0)
    novel = (true != UNSEEN) & (known < 0)
    pred = np.where(true == UNSEEN, UNSEEN, np.where(known >= 0, known, np.where(known == -2, WALL, -1)))
    for r in range(n):  # the generous per-position guess for never-seen cells that continue no wall
        for c in range(n):
            m = novel[:, :, r, c] & (known[:, :, r, c] == -1)
            if m.any():
                vals, counts = np.unique(true[:, :, r, c][m], return_counts=True)
                pred[:, :, r, c][m] = vals[counts.argmax()]
    frozen = np.broadcast_to(lay[:, context - 1:context], true.shape)
    hit = pred == true
    return {"layout_acc_ceiling": float(hit.mean()),
            "layout_acc_ceiling_by_h": hit.mean((0, 2, 3)).tolist(),
            "layout_acc_frozen": float((frozen == true).mean()),
            "unseen_frac": float((true == UNSEEN).mean()), "seen_frac": float(seen_mask.mean()),
            "novel_frac": float(novel.mean()), "novel_by_h": novel.mean((0, 2, 3)).tolist(),
            "novel_guess_acc": float(hit[novel].mean()) if novel.any() else 1.0,
            "seen_consistent": float((known[seen_mask] == true[seen_mask]).mean()) if seen_mask.any() else 1.0}
