"""Where is the paddle? A colour rule that reads Breakout's paddle from its row, on real and generated frames.

    python benchmarks/breakout_paddle.py runs/breakout_max/stage1 runs/breakout_max/dmd_2step \
        --train data/breakout32max_train_4k --eval data/breakout32max_eval --episodes 64

Nothing is learned from generated frames. From real frames of `--train` the rule takes a background (the
per-pixel minimum of "redness", R - max(G, B)), the paddle's band (the rows that hold moving red in at least 90 %
of the frames) and a least-squares line from the red mass's mean column in the band to the RAM paddle x. On the
held-out episodes it then reports, for real frames and for each model's open-loop rollout from one frame under
the recorded actions (eval/world's open_loop, as benchmarks/world_metrics.py streams it):

- the paddle-x error of the rule (RAM units; real frames give the rule's own error);
- how often the band holds no paddle (red mass below half a real paddle's) or two (above 1.5x), overall and
  after each action.

docs/world_model.md, "Breakout": the learned probe of world_metrics reads the same error from these models; this
says why (the paddle is erased or doubled, not drawn in the wrong place).
"""

from __future__ import annotations

import argparse
import json


def redness(frames):
    """uint8-range frames [..., 3, H, W] -> [..., H, W]: how much red exceeds the other channels (paddle, ball)."""
    return (frames[..., 0, :, :] - frames[..., 1:, :, :].amax(-3)).clamp(min=0)


def main(argv=None) -> int:
    import torch

    from framecast.data.envs import load_episodes
    from framecast.eval import world as W
    from framecast.generate import load
    from framecast.models.codecs import pixels_to_uint8

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="*")
    p.add_argument("--train", default="data/breakout32max_train_4k", help="real frames the rule is calibrated on")
    p.add_argument("--calibrate", type=int, default=512, help="episodes of --train used")
    p.add_argument("--eval", default="data/breakout32max_eval")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="write the numbers as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    tr = load_episodes(a.train)
    if tr["manifest"]["env"] != "breakout":
        raise SystemExit(f"{a.train} is a {tr['manifest']['env']} recording, not breakout")
    red = redness(tr["frames"][:a.calibrate].float())  # [E, F, H, W]
    background = red.flatten(0, 1).amin(0)  # [H, W]: the static red (wall corners)
    band = ((red - background).clamp(min=0) > 60).any(-1).float().mean((0, 1)) > 0.9  # [H]
    if not band.any():
        raise SystemExit("no row holds the paddle in 90 % of the frames: not a Breakout recording this rule reads")

    def band_mass(red):  # redness [..., H, W] -> per-column red mass in the band [..., W]
        return (red - background).clamp(min=0)[..., band, :].sum(-2)

    def mass(frames):  # uint8 frames [..., 3, H, W]
        return band_mass(redness(frames.float()))

    def column(m):
        return (m * torch.arange(m.shape[-1])).sum(-1) / m.sum(-1).clamp(min=1e-6)

    m_tr = band_mass(red)
    X = torch.stack([column(m_tr).flatten(), torch.ones(m_tr[..., 0].numel())], 1)
    line = torch.linalg.lstsq(X, tr["state"][:a.calibrate, :, 0].float().flatten()[:, None]).solution.flatten()
    paddle = float(m_tr.sum(-1).median())  # the red mass of one paddle

    ev = load_episodes(a.eval)
    frames, actions = ev["frames"][:a.episodes], ev["actions"][:a.episodes]
    truth = ev["state"][:a.episodes, 1:, 0].float()  # [E, F-1]
    names = ev["manifest"]["actions"]

    def scores(m):  # m [E, F-1, W]
        x = line[0] * column(m) + line[1]
        total = m.sum(-1)
        gone, two = total < 0.5 * paddle, total > 1.5 * paddle
        after = {n: round(float(gone[actions[:, 1:] == k].float().mean()), 3) for k, n in enumerate(names)}
        return {"paddle_x_mae": round(float((x - truth).abs().mean()), 2),
                "paddle_x_mae_h1": round(float((x - truth)[:, 0].abs().mean()), 2),
                "no_paddle": round(float(gone.float().mean()), 3), "two_paddles": round(float(two.float().mean()), 3),
                "no_paddle_after": after}

    out = {"settings": vars(a), "band_rows": band.nonzero().flatten().tolist(), "line": line.tolist(),
           "real frames": scores(mass(frames[:, 1:]))}
    for ck in a.ckpts:
        gen = W.open_loop(load(ck), frames, actions, context=1, seed=a.seed)  # [E, F-1, 3, H, W] in [-1, 1]
        out[ck] = scores(mass(pixels_to_uint8(gen)))  # as a viewer gets them
    print(f"band rows {out['band_rows']}, x = {line[0]:.2f} * column + {line[1]:.2f}")
    print("| frames | paddle x error | at h=1 | no paddle | two paddles | no paddle after " + " / ".join(names) + " |")
    print("|---|---|---|---|---|---|")
    for k, s in out.items():
        if isinstance(s, dict) and "paddle_x_mae" in s:
            after = " / ".join(f"{s['no_paddle_after'][n]:.2f}" for n in names)
            print(f"| {k} | {s['paddle_x_mae']:.2f} | {s['paddle_x_mae_h1']:.2f} | {s['no_paddle']:.3f} | "
                  f"{s['two_paddles']:.3f} | {after} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
