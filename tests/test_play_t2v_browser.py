"""framecast play for text-to-video in a real browser: the page shows a prompt box, frames stream as they are
decoded, and a prompt typed into the page changes the stream from the next block on (and not before).

The server's sessions are recorded, then replayed here with the same seed: the stream the page received is
the one that switches at the block the server reports, it equals the never-switched stream before that block
and differs from it after. Skipped, with the reason, where chromium or playwright is absent."""

import pytest
import torch

pytest.importorskip("fastapi", reason="framecast play needs the [play] extra: pip install -e '.[play]'")
pytest.importorskip("playwright", reason="the browser test needs python playwright (the [browser] extra)")

from framecast.play import load_world  # noqa: E402
from framecast.play.drive import Server, drive, find_chromium  # noqa: E402
from framecast.stream import Session  # noqa: E402

from .t2v_models import t2v_checkpoints  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium, or set "
                                "FRAMECAST_CHROMIUM); .ci/run installs it")
FIRST, SECOND = "a red circle moving right slow", "a blue square moving up fast"


class Recording(Session):
    """A session that keeps every block it makes and the prompt in effect when it was made."""

    log: list = []

    def step(self, action=None, noise=None):
        out = super().step(action, noise)
        Recording.log.append((self.prompt, out.clone()))
        return out


@pytest.mark.parametrize("kind", t2v_checkpoints.kinds)
def test_prompt_typed_in_the_page_switches_the_stream_from_the_next_block(kind, one_thread, tmp_path, monkeypatch):
    model, base, size = t2v_checkpoints(kind, tmp_path)
    world = load_world(model, base=base, size=size, prompt=FIRST, fps=15.0, max_sessions=1, window=4)  # paced
    Recording.log = []
    monkeypatch.setattr(type(world), "session", lambda self, seed: Recording(
        self.model, self.spec, text_encoder=self.text_encoder, codec=self.codec, window=self.window, seed=seed))
    with Server(world) as server:
        r = drive(server.url, frames=30, chromium=CHROMIUM, script=[("", 1)], prompts=[(5, SECOND)])
    assert r["frames"] >= 30 and not r["errors"] and r["first_frame_ms"] is not None
    seqs = r["prompts"]
    assert seqs[0] == 0 and seqs[-1] == 1 and seqs == sorted(seqs)  # the page saw the switch, once, in order
    prompts = [p for p, _ in Recording.log]
    switch = prompts.index(SECOND)  # the first block made after the page sent the prompt
    assert switch >= 1 and set(prompts[:switch]) == {FIRST} and set(prompts[switch:]) == {SECOND}
    blocks = [b for _, b in Recording.log]
    again, never = (Session(world.model, world.spec, text_encoder=world.text_encoder, codec=world.codec,
                            window=world.window, seed=0) for _ in range(2))
    again.reset(FIRST)
    never.reset(FIRST)
    for i, got in enumerate(blocks):
        if i == switch:
            again.switch_prompt(SECOND)
        a, n = again.step(), never.step()
        torch.testing.assert_close(got, a, rtol=0, atol=1e-6)  # the page's stream is the switched one
        if i < switch:
            assert torch.equal(a, n)  # before the switch: the very same frames
        else:
            assert (a - n).abs().max() > 100 * 1e-6, i  # from the next block on: another stream (100x the replay
            # tolerance; the tiny random Wan's text pathway is weak, the framecast model's differs by ~0.1)
