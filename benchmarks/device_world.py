"""GPU check of the world-model path (run on a CUDA machine; prints JSON).

    python benchmarks/device_world.py --out results.json [--train] [--frames 1000]

1. `--train`: the MiniGrid recipe end to end on CUDA (`framecast pipeline --recipe configs/minigrid.yaml
   train.device=cuda`), timed per stage (needs data/minigrid_{train,eval}).
2. A streaming Session of the MiniGrid 2-step student on CUDA: frames/s over `--frames` frames under a key
   script, and the allocated GPU memory at frame 100 vs the last frame (flat = rolling KV cache).
3. Wan2.1-1.3B scale: the `wan2.1-1.3b` preset with an action embedder (random weights) as a frame-wise 2-step
   (and 1-step) Session on 480x832 latents (16 x 60 x 104, 1560 tokens/frame) with a rolling window: latent
   frames/s and memory, bf16 weights (fp32 if bf16 fails, with the error recorded).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_session(session, frames: int, actions, sync) -> dict:
    import torch

    session.reset(first_frame=None, seed=0)
    mem = {}
    for i in range(3):  # warm-up: the first frame has its own schedule, kernels get picked
        session.step(actions[i % len(actions)])
    sync()
    t0 = time.perf_counter()
    for i in range(frames):
        session.step(actions[i % len(actions)])
        if i + 1 in (min(100, frames // 2), frames):
            sync()
            mem[i + 1] = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
    sync()
    dt = time.perf_counter() - t0
    return {"frames": frames, "fps": frames / dt, "ms_per_frame": 1e3 * dt / frames, "alloc_mib": mem,
            "cached_frames": session.cached_frames}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--train", action="store_true")
    p.add_argument("--runs", default="/tmp/gpuruns")
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--wan-frames", type=int, default=60)
    p.add_argument("--train-timeout", type=float, default=360, help="seconds; the pipeline resumes if re-run")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__}

    def save():
        Path(args.out).write_text(json.dumps(res, indent=1))

    if args.train:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "framecast.cli", "pipeline", "--recipe", str(ROOT / "configs" / "minigrid.yaml"),
               "--out", args.runs, f"train.device={dev}", "train.progress=false"]
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.train_timeout)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
        res["train"] = {"rc": rc, "seconds": time.perf_counter() - t0, "stdout": out[-3000:], "stderr": err[-3000:]}
        print(json.dumps(res["train"], indent=1), flush=True)
        save()

    from framecast import config as C
    from framecast.models.conditioning import build_text_encoder
    from framecast.generate import build_denoiser
    from framecast.stages import sampling_spec
    from framecast.stream import Session

    ckpt = Path(args.runs) / "minigrid" / "dmd_2step"
    if ckpt.exists():
        s = Session.from_checkpoint(ckpt, device=dev, window=8)
        res["minigrid_session"] = timed_session(s, args.frames, [2, 2, 0, 3, 1, 2], sync)
        print("minigrid session", res["minigrid_session"], flush=True)
        save()

    # Wan2.1-1.3B scale, random weights: speed and memory only
    for steps in ([1000, 500], [1000]):
        over = ["stage=dmd", "model.preset=wan2.1-1.3b", "model.num_actions=4", "data.name=episodes",
                "data.height=60", "data.width=104", "data.text_encoder=hash", "data.text_tokens=16",
                "objective.window=6", f"few_step.denoising_steps=[{','.join(map(str, steps))}]"]
        cfg = C.load(ROOT / "configs" / "toy.yaml", over)
        spec = sampling_spec(cfg)
        key = f"wan1.3b_{len(steps)}step"
        for dtype in (torch.bfloat16, torch.float32):
            try:
                torch.manual_seed(0)
                model = build_denoiser(cfg.model, dev).to(dtype).eval()
                enc = build_text_encoder("hash", cfg.model.text_dim, 16, 0)
                s = Session(model, spec, text_encoder=enc)
                torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
                r = timed_session(s, args.wan_frames, [2, 2, 0, 3, 1, 2], sync)
                r["dtype"] = str(dtype)
                r["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
                r["tokens_per_frame"] = 60 * 104 // 4
                r["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
                res[key] = r
                print(key, r, flush=True)
                break
            except Exception as e:  # noqa: BLE001 (recorded, then the fp32 fallback)
                res[f"{key}_{dtype}_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(key, dtype, "failed:", e, flush=True)
            finally:
                model = s = None
                torch.cuda.empty_cache() if dev == "cuda" else None
        save()
    print(json.dumps({k: v for k, v in res.items() if k != "train"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
