"""MiniGrid's egocentric layout read from pixels by a colour rule (nothing learned), and the loop-closure score.

The 7x7 cells of the egocentric view as unseen / floor / wall, and the free cells straight ahead: the agent's
local state -- what is around and ahead of it -- which, unlike x, y and heading, is visible in one frame
(docs/world_model.md, metrics: "wall layout (egocentric)"). Generated layouts are compared with the recorded
ones under the recorded actions, under shuffled ones, and for a world that never moves.

Loop closure: four turns in place return exactly to the start view in the real environment; a world model
that keeps a consistent world should come back too (revisit consistency). `loop_scores` scores generated
turn sequences against their start views; rollouts.loop_closure generates them.
"""

from __future__ import annotations

import torch

from ...data.environments import view_offset
from .pixels import psnr

Tensor = torch.Tensor

# Mean brightness of a cell of MiniGrid's egocentric view (the visible-cell highlight included), measured on
# recorded frames: unseen cells are black, floor 76, wall 146 (the agent's cell reads as floor, the goal as wall).
LAYOUT_CLASSES = ("unseen", "floor", "wall")
LAYOUT_LEVELS = (0.0, 76.0, 146.0)
VIEW_CELLS = 7  # MiniGrid's default agent_view_size

LOOP_SEQUENCES = ("left", "right", "stay")  # the action repeated in each loop-closure rollout


def minigrid_layout(video: Tensor, *, tile: int, size: int, align: str = "center", cells: int = VIEW_CELLS) -> Tensor:
    """Frames [..., 3, H, W] in [-1, 1] -> cell classes [..., cells, cells] (LAYOUT_CLASSES), the agent at the
    bottom-middle cell looking up. `tile`, `size` and `align` are the recording's (its manifest)."""
    view = cells * tile
    off = view_offset(align, size, view) if view <= size else -1  # where framecast record put the view
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
    kw = dict(tile=int(manifest["tile"]), size=int(manifest["size"]), align=manifest.get("align", "center"))
    lp, lt = minigrid_layout(pred, **kw), minigrid_layout(target, **kw)  # [..., 7, 7]
    return {f"layout_acc{suffix}": float((lp == lt).float().mean()),
            f"ahead_mae{suffix}": float((free_ahead(lp) - free_ahead(lt)).abs().float().mean())}


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
