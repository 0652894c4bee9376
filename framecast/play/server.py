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
close code 1013 (try again later). A disconnect, however abrupt and whenever it comes (a reset, a step, a
send, a receive), ends the connection quietly: the session's loop is cancelled, its in-flight model call
finishes, and its cache is dropped. Who may connect (same origin, an optional token) and which messages are
refused before they are parsed is security.py.
"""

# no `from __future__ import annotations`: FastAPI reads the WebSocket annotation of the handler at runtime
import asyncio
import io
import json
import os
import struct
import time
from pathlib import Path
from urllib.parse import quote

import torch

from ..errors import ConfigError, RequestError
from ..models.codecs import pixels_to_uint8
from .security import MAX_MESSAGE, SEED_MAX, SEQ_MAX, Guard, check_int, check_seed, parse_message
from .world import World, load_world

try:  # what a vanished peer raises: a send or receive after it left (starlette), the transport (uvicorn)
    from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected
    GONE: tuple = (WebSocketDisconnect, WebSocketDisconnected, OSError)
except ImportError:  # the [play] extra is absent: nothing here runs without it
    GONE = (OSError,)

STATIC = Path(__file__).parent / "static"
CLOSE_TRY_AGAIN = 1013  # RFC 6455: "try again later"
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


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
        self.busy: asyncio.Future | None = None  # the model call in its thread (one at a time: under `lock`)

    async def in_thread(self, fn, *args, **kw):
        """`fn` in a worker thread. Cancelling the caller does not orphan the thread: `busy` is still there, and
        the session is released only once it is done (`_release_when_done`)."""
        self.busy = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
        return await asyncio.shield(self.busy)

    async def send_json(self, obj: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(obj))

    async def reset(self, seed: int) -> None:
        async with self.lock:
            self.seed = seed
            await self.in_thread(self.session.reset, self.prompt, first_frame=self.world.start_frame(seed), seed=seed)
            self.frames = 0
        if self.world.start_frames is not None:  # show the start frame: the player sees where they stand
            await self._send_frame(self.world.start_frame(seed), gen_ms=0.0, action="start")

    async def handle(self, raw: str) -> None:
        """Apply one message from the page, or answer it with an error naming the problem."""
        try:
            msg = parse_message(raw)  # size and nesting depth before json.loads (security.py)
            kind = msg["type"]
            if kind == "action":
                self._hold(msg)
            elif kind == "reset":
                await self.reset(check_seed(msg.get("seed", (self.seed + 1) % (SEED_MAX + 1))))
            elif kind == "prompt":
                text = msg.get("text")
                if not isinstance(text, str):
                    raise RequestError('"prompt" needs a string "text"')
                async with self.lock:  # between blocks: the next block is the first to see it
                    await self.in_thread(self.session.switch_prompt, text)
                    self.prompt, self.prompt_seq = text, self.prompt_seq + 1
            else:
                raise RequestError(f"unknown message type {kind[:40]!r} (action, reset, prompt)")
        except (RequestError, ValueError) as e:  # SessionError is a RequestError
            await self.send_json({"type": "error", "error": str(e)})

    def _hold(self, msg: dict) -> None:
        """An "action" message: the action held from now on, and the seq the frames that answer it carry."""
        name = msg.get("action")
        if name is None:
            act = self.world.idle
        elif isinstance(name, str) and name in self.world.actions:
            act = self.world.actions.index(name)
        else:
            shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:40] + "..."
            raise RequestError(f"unknown action {shown}; this model plays {self.world.actions}")
        seq = check_int("seq", msg.get("seq", self.seq + 1), -SEQ_MAX, SEQ_MAX,
                        "an integer in [-(2**53 - 1), 2**53 - 1]")
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
                out = await self.in_thread(self.session.step, act)  # decoded pixels
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

    async def inbox(self) -> None:
        """Apply the page's messages until it disconnects."""
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await self.handle(msg["text"])
            else:
                await self.send_json({"type": "error", "error": "binary messages are not understood; send JSON text"})


async def _play(world: World, ws, sid: int) -> None:
    """Serve one accepted WebSocket: hello, the start, then the frame loop and the page's messages side by side
    until either ends (a disconnect ends them quietly; a bug in either is raised, and logged by the server)."""
    world.active.add(sid)
    player, tasks = _Player(world, ws, sid), []
    try:
        await player.send_json(_hello(world) | {"session": sid})
        await player.reset(sid)
        tasks = [asyncio.create_task(player.run()), asyncio.create_task(player.inbox())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except GONE:
        pass
    finally:
        for t in tasks:
            t.cancel()
        _release_when_done([*tasks, player.busy], player, sid)  # no await: holds even if this task is cancelled
        bug = await _stop(tasks)
    if bug is not None:
        raise bug


def _release_when_done(futures: list, player: _Player, sid: int) -> None:
    """Once the loops and the model call in flight are done (their exceptions read, so none is logged as never
    retrieved), drop the session's KV cache now rather than with its last reference, and free its slot."""
    pending = {f for f in futures if f is not None and not f.done()}

    def release() -> None:
        player.session.cache = player.session.decoder = None
        player.world.active.discard(sid)

    def done(f) -> None:
        if not f.cancelled():
            f.exception()  # read: the task's own awaiter (_stop) may have been cancelled away
        pending.discard(f)
        if not pending:
            release()

    if not pending:
        release()
    for f in list(pending):
        f.add_done_callback(done)


async def _stop(tasks: list) -> BaseException | None:
    """Await the cancelled `tasks`; the first exception that is not a disconnect or the cancel (a bug)."""
    bug = None
    for t in tasks:
        try:
            await t
        except (asyncio.CancelledError, *GONE):
            pass
        except Exception as e:  # noqa: BLE001  returned, to be raised once the session is released
            bug = bug or e
    return bug


def create_app(world: World, *, allow_origins=(), token: str | None = None):
    """The FastAPI app: GET / (the page), GET /info (JSON), WS /ws (one session per connection), behind the
    Host / Origin / token check of security.Guard. `allow_origins`: origins besides this server's own
    ("http://host:port", or "*": any origin and Host); `token`: a string every request must carry."""
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import FileResponse, JSONResponse

    world.check()
    Guard(None, allow_origins, token)  # refuse bad options now, not at the first request
    app = FastAPI(title="framecast play", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, allow_origins=allow_origins, token=token)
    app.state.world = world
    counter = {"next": 0}

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/info")
    def info():
        return JSONResponse(_hello(world) | {"active_sessions": len(world.active)})

    @app.websocket("/ws")
    async def play(ws: WebSocket):
        try:
            await ws.accept()
            if len(world.active) >= world.max_sessions:
                await ws.send_text(json.dumps({"type": "error", "error": f"the server is full ({world.max_sessions} "
                                               "sessions at most); try again later"}))
                await ws.close(code=CLOSE_TRY_AGAIN)
                return
        except GONE:  # gone before the hello
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


def check_serve_options(host, port, threads) -> None:
    """ConfigErrors naming `serve`'s own options (architecture.md §5)."""
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"host (--host) must be a host name or address to bind, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"port (--port) must be an integer in 1..65535, got {port!r}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"threads (--threads) must be an integer >= 0 (0: torch's default), got {threads!r}")


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 0, allow_origins=(),
          token: str | None = None, **kw) -> None:
    """Serve `ckpt` on host:port (loopback by default) until interrupted; `kw` goes to load_world, and
    `allow_origins` / `token` to create_app. Every option is checked before the model loads."""
    import uvicorn

    check_serve_options(host, port, threads)
    Guard(None, allow_origins, token)
    if threads:
        torch.set_num_threads(threads)
    world = load_world(ckpt, **kw)
    app = create_app(world, allow_origins=allow_origins, token=token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host  # a Host it answers
    url = f"http://{shown}:{port}/" + (f"?token={quote(token, safe='')}" if token else "")
    print(f"framecast play: {ckpt} ({len(world.actions)} actions, window {world.window}, fps cap "
          f"{world.fps or 'none'}) on {url}")
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print("framecast play: warning: serving beyond this machine without a token: anyone who can reach the "
              "port can play (pass a token)")
    uvicorn.run(app, host=host, port=port, log_level="warning", ws_max_size=MAX_MESSAGE * 4)
