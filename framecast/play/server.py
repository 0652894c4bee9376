"""`framecast play`: a live world model in the browser, one streaming session per player (architecture.md §4).

    framecast play --ckpt runs/minigrid/dmd_2step --start data/minigrid_eval      # then open http://127.0.0.1:8000

A FastAPI app serves one static page and one WebSocket per player. Each WebSocket owns a `stream.Session`
(its own rolling KV cache and stream decoder; the weights are shared): the server steps it continuously under
the action of the key the player holds, so a key press changes the very next frame, and streams every frame
as it is made. Nothing here touches the model except through `Session` (reset / step / switch_prompt), and
nothing here decodes: the session returns pixel frames, which are only quantised to PNG.

Protocol (JSON text from the page, binary frames and JSON notices from the server):

    page   -> {"type": "action", "action": "left" | null, "seq": 7}   the held action (null: none held)
              {"type": "reset", "seed": 3}                          a new start (seed picks the start frame)
              {"type": "prompt", "text": "..."}                     text models: switch the prompt
    server -> {"type": "hello", "actions": [...], "keys": {...}, ...} once, after connecting
              binary: 4-byte big-endian header length | header JSON | PNG      one per generated frame
                      header = {"i": frame, "action": name, "seq": last action seq applied, "prompt": prompt
                                switches applied when its block was made, "gen_ms": ...,
                                "cached": frames in the KV cache, "rss_mb": server resident memory}
              {"type": "error", "error": "..."}                    a malformed message; it is ignored

No key held means the "stay" action where the model has one (docs/world_model.md: the null action means
"unknown action", so a world conditioned on it keeps moving), else the null action. The KV cache keeps at
most `window` frames (default: the checkpoint's window, else its training clip length), so memory is flat
for a session of any length. At most `max_sessions` players at once; the next one gets an error and a
close code 1013 (try again later). A disconnect cancels the session's loop and drops its cache.
"""

# no `from __future__ import annotations`: FastAPI reads the WebSocket annotation of the handler at runtime
import asyncio
import io
import json
import os
import struct
import time
from pathlib import Path

import torch

from ..errors import RequestError
from ..models.codecs import pixels_to_uint8
from .world import World, load_world  # noqa: F401  (World: the type players share)

STATIC = Path(__file__).parent / "static"
CLOSE_TRY_AGAIN = 1013  # RFC 6455: "try again later"
MAX_MESSAGE = 4096  # bytes; the page's messages are tiny, anything larger is malformed


def rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def encode_png(frame: torch.Tensor) -> bytes:
    """A decoded pixel frame [C, H, W] in [-1, 1] -> PNG bytes at native size (the page scales it up without
    smoothing). Only quantises: the session's codec decoder made the pixels."""
    from PIL import Image

    img = pixels_to_uint8(frame).cpu().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(img if img.shape[2] == 3 else img[..., 0]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def pack(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(h)) + h + payload


class _Player:
    """One connection: parses the page's messages into the held action; its loop makes and sends frames."""

    def __init__(self, world: World, ws, sid: int) -> None:
        self.world, self.ws, self.sid = world, ws, sid
        self.action: int | None = world.idle
        self.seq = 0
        self.prompt, self.prompt_seq = world.prompt, 0  # prompt_seq: prompt switches applied so far
        self.seed = sid
        self.session = world.session(seed=sid)
        self.lock = asyncio.Lock()   # one of step / reset / prompt at a time on this session
        self.send_lock = asyncio.Lock()
        self.frames = 0

    async def send_json(self, obj: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(obj))

    async def reset(self, seed: int) -> None:
        async with self.lock:
            self.seed = seed
            await asyncio.to_thread(self.session.reset, self.prompt, first_frame=self.world.start_frame(seed), seed=seed)
            self.frames = 0
        if self.world.start_frames is not None:  # show the start frame: the player sees where they stand
            await self._send_frame(self.world.start_frame(seed), gen_ms=0.0, action="start")

    async def handle(self, raw: str) -> None:
        """Apply one message from the page, or answer it with an error naming the problem."""
        try:
            if len(raw) > MAX_MESSAGE:
                raise ValueError(f"message of {len(raw)} bytes (limit {MAX_MESSAGE})")
            msg = json.loads(raw)
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ValueError('a message must be a JSON object with a "type"')
            kind = msg["type"]
            if kind == "action":
                self._hold(msg)
            elif kind == "reset":
                seed = msg.get("seed", self.seed + 1)
                if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                    raise ValueError(f'"seed" must be a non-negative integer, got {seed!r}')
                await self.reset(seed)
            elif kind == "prompt":
                text = msg.get("text")
                if not isinstance(text, str):
                    raise ValueError('"prompt" needs a string "text"')
                async with self.lock:  # between blocks: the next block is the first to see it
                    await asyncio.to_thread(self.session.switch_prompt, text)
                    self.prompt, self.prompt_seq = text, self.prompt_seq + 1
            else:
                raise ValueError(f"unknown message type {kind!r} (action, reset, prompt)")
        except (ValueError, RequestError) as e:  # json.JSONDecodeError is a ValueError; SessionError a RequestError
            await self.send_json({"type": "error", "error": str(e)})

    def _hold(self, msg: dict) -> None:
        """An "action" message: the action held from now on, and the seq the frames that answer it carry."""
        name = msg.get("action")
        if name is None:
            act = self.world.idle
        elif name in self.world.actions:
            act = self.world.actions.index(name)
        else:
            raise ValueError(f"unknown action {name!r}; this model plays {self.world.actions}")
        seq = msg.get("seq", self.seq + 1)
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError(f'"seq" must be an integer, got {seq!r}')
        self.action, self.seq = act, seq

    async def _send_frame(self, frame: torch.Tensor, *, gen_ms: float, action: str | None,
                          seq: int | None = None, prompt_seq: int | None = None) -> None:
        header = {"i": self.frames, "action": action, "seq": self.seq if seq is None else seq,
                  "prompt": self.prompt_seq if prompt_seq is None else prompt_seq,
                  "gen_ms": round(gen_ms, 2), "cached": self.session.cached_frames, "rss_mb": rss_mb()}
        data = pack(header, encode_png(frame))
        async with self.send_lock:
            await self.ws.send_bytes(data)

    async def run(self) -> None:
        """Make frames forever: step under the held action, send, keep to the fps cap."""
        period = 1.0 / self.world.fps if self.world.fps > 0 else 0.0
        while True:
            t0 = time.perf_counter()
            async with self.lock:
                act, seq, pseq = self.action, self.seq, self.prompt_seq
                out = await asyncio.to_thread(self.session.step, act)  # decoded pixels
                gen_ms = (time.perf_counter() - t0) * 1e3
                frames = out if out.dim() == 4 else out[None]  # chunk models return [f, C, H, W]
                for f in frames:
                    self.frames += 1
                    await self._send_frame(f, gen_ms=gen_ms / len(frames), seq=seq,  # seq: the action it answers
                                           action=self.world.actions[act] if act is not None else None,
                                           prompt_seq=pseq)  # the prompt switch it answers
            if self.world.max_frames and self.frames >= self.world.max_frames:
                await self.send_json({"type": "error", "error": f"session frame limit {self.world.max_frames} reached; "
                                      "send reset"})
                await self._wait_for_reset()
            wait = period - (time.perf_counter() - t0)
            await asyncio.sleep(max(wait, 0.0))  # also yields to the receiving side at full speed

    async def _wait_for_reset(self) -> None:
        while self.frames >= self.world.max_frames:
            await asyncio.sleep(0.05)


async def _play(world: World, ws, sid: int) -> None:
    """Serve one accepted WebSocket: hello, the start, the frame loop, the page's messages; clean up on exit."""
    from fastapi import WebSocketDisconnect

    world.active.add(sid)
    player, task = _Player(world, ws, sid), None
    try:
        await player.send_json(_hello(world) | {"session": sid})
        await player.reset(sid)
        task = asyncio.create_task(player.run())
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if msg.get("text") is not None:
                await player.handle(msg["text"])
            else:
                await player.send_json({"type": "error", "error": "binary messages are not understood; "
                                        "send JSON text"})
            if task.done():  # the loop died: surface its error instead of serving a frozen page
                task.result()
    except WebSocketDisconnect:
        pass
    finally:
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                pass
        player.session.cache = player.session.decoder = None  # drop the KV cache now, not with the last reference
        world.active.discard(sid)


def create_app(world: World):
    """The FastAPI app: GET / (the page), GET /info (JSON), WS /ws (one session per connection)."""
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import FileResponse, JSONResponse

    app = FastAPI(title="framecast play")
    app.state.world = world
    counter = {"next": 0}

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/info")
    def info():
        return JSONResponse(_hello(world) | {"active_sessions": len(world.active)})

    @app.websocket("/ws")
    async def play(ws: WebSocket):
        await ws.accept()
        if len(world.active) >= world.max_sessions:
            await ws.send_text(json.dumps({"type": "error", "error": f"the server is full ({world.max_sessions} "
                                           "sessions at most); try again later"}))
            await ws.close(code=CLOSE_TRY_AGAIN)
            return
        sid = counter["next"]
        counter["next"] += 1
        await _play(world, ws, sid)

    return app


def _hello(world: World) -> dict:
    spec = world.spec
    return {"type": "hello", "actions": world.actions, "keys": world.keys,
            "idle": None if world.idle is None else world.actions[world.idle], "fps_cap": world.fps,
            "frame_shape": list(spec.pixel_shape), "window": world.window,
            "block_size": spec.block_size, "steps": spec.steps,
            "text": spec.text_encoder != "hash" or not world.actions, "prompt": world.prompt,
            "max_sessions": world.max_sessions}


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 0, **kw) -> None:
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    world = load_world(ckpt, **kw)
    print(f"framecast play: {ckpt} ({len(world.actions)} actions, window {world.window}, fps cap "
          f"{world.fps or 'none'}) on http://{host}:{port}")
    uvicorn.run(create_app(world), host=host, port=port, log_level="warning", ws_max_size=MAX_MESSAGE * 4)
