"""World-model metrics on held-out recorded episodes (docs/world_model.md, metrics), by concern:

* pixels: PSNR, SSIM and recorded frames as video;
* rollouts: open-loop generation from a `generate.LoadedModel`, shuffled actions, ΔPSNR controllability,
  loop closure;
* probes: the inverse-dynamics model and the state probe, trained on real frames and cached, and their scores;
* layout: MiniGrid's egocentric layout read by a colour rule, and the loop-closure score;
* report: `world_metrics` (everything for one model) and `real_reference` (ceilings and floors on real frames).
"""

from .layout import (LAYOUT_CLASSES, LAYOUT_LEVELS, LOOP_SEQUENCES, VIEW_CELLS, free_ahead, layout_scores,
                     loop_scores, minigrid_layout)
from .pixels import psnr, ssim, to_video
from .probes import (InverseDynamics, StateProbe, as_episodes, confusion, idm_accuracy, idm_predict,
                     load_or_train_idm, load_or_train_probe, probe_predict, probe_scores, train_idm, train_probe)
from .report import real_reference, world_metrics
from .rollouts import controllability, loop_closure, open_loop, shuffle_actions

__all__ = [
    "LAYOUT_CLASSES", "LAYOUT_LEVELS", "LOOP_SEQUENCES", "VIEW_CELLS", "InverseDynamics", "StateProbe",
    "as_episodes", "confusion", "controllability", "free_ahead", "idm_accuracy", "idm_predict", "layout_scores",
    "load_or_train_idm", "load_or_train_probe", "loop_closure", "loop_scores", "minigrid_layout", "open_loop",
    "probe_predict", "probe_scores", "psnr", "real_reference", "shuffle_actions", "ssim", "to_video",
    "train_idm", "train_probe", "world_metrics",
]
