import json

import pytest
import torch

from framecast.media import grid, plot_metrics, to_uint8, write_video


def test_write_gif_and_mp4(tmp_path):
    v = torch.rand(5, 3, 9, 7) * 2 - 1  # odd sizes: mp4 needs even, the writer pads
    for ext in ("gif", "mp4"):
        p = write_video(v, tmp_path / f"v.{ext}", fps=4, scale=2)
        assert p.stat().st_size > 100
    with pytest.raises(ValueError, match="unsupported video format"):
        write_video(v, tmp_path / "v.avi")


def test_grid_and_uint8():
    g = grid(torch.zeros(3, 2, 3, 4, 4) - 1, ncol=2)
    assert g.shape == (2, 3, 2 * 5 + 1, 2 * 5 + 1)
    u = to_uint8(torch.ones(1, 3, 2, 2), scale=3)
    assert u.shape == (1, 6, 6, 3) and int(u.max()) == 255


def test_plot_metrics(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps({"step": i, "model/loss": 1.0 / (i + 1)}) for i in range(5)))
    assert plot_metrics(p, tmp_path / "l.png").is_file()
