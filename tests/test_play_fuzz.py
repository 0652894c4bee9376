"""framecast play against an attacker and a careless user: who may connect (same origin, the Host header, the
optional token), messages no page sends (nested, huge, binary, malformed, bad seeds, reset spam), 400 abrupt
disconnects on a real uvicorn server with no traceback in its log and flat memory, and the option checks of
load_world / create_app / serve. The model is the MiniGrid student's architecture with random weights
(tests/conftest.py), streamed as fast as it goes (fps 0)."""

import asyncio
import collections
import gc
import json
import logging
import math
import socket
import struct
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="framecast play needs the [play] extra: pip install -e '.[play]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the [dev] extra)")
websockets = pytest.importorskip("websockets", reason="framecast play needs the [play] extra")

from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from framecast.errors import ConfigError  # noqa: E402
from framecast.play import create_app, load_world, rss_mb, serve  # noqa: E402
from framecast.play import security  # noqa: E402
from framecast.play.drive import Server  # noqa: E402
from framecast.play.world import check_options  # noqa: E402

from .test_play import next_error, next_frame  # noqa: E402

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def world(one_thread, make_student_world):
    return make_student_world(max_sessions=8)


def refused_ws(client, url="/ws", **kw) -> int:
    """The close code of a WebSocket handshake the server refuses before accepting it."""
    with pytest.raises(WebSocketDisconnect) as e, client.websocket_connect(url, **kw) as ws:
        ws.receive_text()
    return e.value.code


def hello(client, url="/ws", **kw) -> dict:  # the first message of an accepted WebSocket
    with client.websocket_connect(url, **kw) as ws:
        return json.loads(ws.receive_text())


# -- who may connect --------------------------------------------------------------------------------------------

def test_cross_origin_websocket_is_refused_and_same_origin_accepted(world):
    with TestClient(create_app(world)) as client:  # the TestClient's server is testserver:80
        for origin in (EVIL, "http://evil.example:80", "null", "http://testserver.evil.example", "https://testserver",
                       "http://testserver:8080", "file://", "http://[::1"):
            assert refused_ws(client, headers={"origin": origin}) == security.CLOSE_POLICY, origin
        for origin in ("http://testserver", "http://TestServer:80", "http://localhost", "http://127.0.0.1",
                       "http://[::1]"):
            assert hello(client, headers={"origin": origin})["type"] == "hello", origin
        assert hello(client)["type"] == "hello"  # no Origin: not a browser (browsers always send one)
        assert client.get("/info", headers={"origin": EVIL}).status_code == 403
    with TestClient(create_app(world, allow_origins=["http://play.example:8000"])) as client:
        assert hello(client, headers={"origin": "http://play.example:8000"})["type"] == "hello"
        assert hello(client, headers={"host": "play.example:8000"})["type"] == "hello"  # its host is allowed too
        assert refused_ws(client, headers={"origin": EVIL}) == security.CLOSE_POLICY


def test_foreign_host_is_refused(world):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    with TestClient(create_app(world)) as client:
        for host in ("evil.example", "evil.example:80", "testserver:8000", "localhost:81", "", "testserver:99999"):
            for path in ("/", "/info", "/docs"):
                r = client.get(path, headers={"host": host})
                assert r.status_code == 403 and "host" in r.json()["error"], (host, path)
            assert refused_ws(client, headers={"host": host}) == security.CLOSE_POLICY, host
        for host in ("testserver", "localhost", "127.0.0.1:80", "[::1]"):
            assert client.get("/info", headers={"host": host}).status_code == 200, host
        page = client.get("/")
        assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
        assert client.get("/openapi.json").status_code == 404  # no API docs to browse


def test_token_is_required_when_set(world):
    with TestClient(create_app(world, token="s3cret/+")) as client:
        for path in ("/", "/info", "/info?token=wrong", "/info?token="):
            assert client.get(path).status_code == 403, path
        assert client.get("/info?token=s3cret%2F%2B").status_code == 200
        assert client.get("/info", headers={"authorization": "Bearer s3cret/+"}).status_code == 200
        assert "?token=" in client.get("/?token=s3cret%2F%2B").text  # the page passes its token on
        for url in ("/ws", "/ws?token=nope", "/ws?token=s3cret"):
            assert refused_ws(client, url) == security.CLOSE_POLICY, url
        assert hello(client, "/ws?token=s3cret%2F%2B")["type"] == "hello"


def test_the_page_passes_its_token_on_in_a_real_browser(one_thread, make_student_world):
    from framecast.play.drive import drive, find_chromium

    pytest.importorskip("playwright", reason="the browser check needs python playwright (the [browser] extra)")
    if find_chromium() is None:
        pytest.skip("no chromium on PATH (apt-get install chromium, or set FRAMECAST_CHROMIUM)")
    with Server(make_student_world(max_sessions=1), token="t0k/en") as server:
        assert "?token=t0k%2Fen" in server.url
        r = drive(server.url, frames=5, timeout_s=60)
    assert r["frames"] >= 5 and not r["errors"]


def raw_handshake(port: int, host: str, origin: str | None = None) -> str:
    """The status line the real server answers a WebSocket handshake with."""
    lines = ["GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"Origin: {origin}"] if origin else []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return s.recv(4096).split(b"\r\n")[0].decode()


def test_real_server_refuses_foreign_origin_and_host_before_accepting(world):
    import http.client

    with Server(world) as server:
        port = server.port
        for host, origin, want in ((f"127.0.0.1:{port}", EVIL, " 403 "), (f"evil.example:{port}", None, " 403 "),
                                   (f"localhost:{port}", f"http://localhost:{port}", " 101 ")):
            assert want in raw_handshake(port, host, origin) + " ", (host, origin)
        for host, want in ((f"evil.example:{port}", 403), (f"127.0.0.1:{port}", 200), ("127.0.0.1:1", 403)):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/info", headers={"Host": host})
            assert c.getresponse().status == want, host
            c.close()
        assert asyncio.run(oversized(server.url.replace("http://", "ws://") + "ws")) == 1009


async def oversized(url: str) -> int:
    """Over the size limit an error reply; over the transport's limit (4x) the close code 1009 (too big)."""
    async with connect(url, proxy=None, compression=None) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        await ws.send("x" * (2 * security.MAX_MESSAGE))
        while not isinstance(m := await ws.recv(), str):
            pass
        assert "limit 4096" in json.loads(m)["error"]
        await ws.send("x" * (8 * security.MAX_MESSAGE))
        try:
            while True:
                await ws.recv()
        except websockets.exceptions.ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else -1


# -- messages no page sends ------------------------------------------------------------------------------------

def test_nesting_depth_is_refused_before_json_parses_it(world, monkeypatch):
    assert security.json_depth('{"a": [1, {"b": "[[[[{{"}]}') == 3  # brackets in strings do not nest
    assert security.json_depth("[" * 10_000) == security.MAX_DEPTH + 1  # counting stops past the limit
    with TestClient(create_app(world)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        for msg in ("[" * 4000, "[" * 2000 + "]" * 2000, '{"type": "action", "x": ' + '{"a":' * 600 + "1"):
            ws.send_text(msg)  # json.loads raised RecursionError on these and dropped the connection
            assert "nests deeper than 32" in next_error(ws)
        monkeypatch.setattr(security, "MAX_MESSAGE", 50_000)  # depth 10_000 under the size limit
        ws.send_text("[" * 10_000 + "]" * 10_000)
        assert "nests deeper" in next_error(ws)
        ws.send_text(json.dumps({"type": "action", "action": "left", "seq": 3, "deep": [[[1]]]}))
        while (h := next_frame(ws)[0])["seq"] != 3:  # the session kept streaming and took the next message
            pass
        assert h["action"] == "left"


BAD = [  # (message, what the error says)
    ("x" * 100_000, "limit 4096"), ("", "not JSON"), ("{", "not JSON"), ("\x00", "not JSON"), ("null", "JSON object"),
    ('"reset"', "JSON object"), ("1e999", "JSON object"), ('{"type": 5}', '"type"'), ('{"type": "fly"}', "'fly'"),
    ('{"type": "' + "z" * 3000 + '"}', "unknown message type"), ('{"type": "action", "action": [1]}', "unknown action"),
    ('{"type": "action", "action": "left", "seq": 1e300}', '"seq"'), ('{"type": "action", "seq": 9' + "9" * 20 + "}",
                                                                       '"seq"'),
    ('{"type": "prompt", "text": 7}', '"text"'), ('{"type": "reset", "seed": -1}', '"seed"'),
    ('{"type": "reset", "seed": 18446744073709551616}', '"seed"'), ('{"type": "reset", "seed": "x"}', '"seed"'),
    ('{"type": "reset", "seed": true}', '"seed"'), ('{"type": "reset", "seed": 1.5}', '"seed"'),
    ('{"type": "reset", "seed": null}', '"seed"'), ('{"type": "action", "seq": ' + "1" * 4000 + "}", '"seq"'),
]


def test_malformed_huge_binary_and_bad_seeds_get_error_replies(world):
    with TestClient(create_app(world)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        for msg, want in BAD:
            ws.send_text(msg)
            err = next_error(ws)
            assert want in err and len(err) < 400, (msg[:60], err)
            if '"seed"' in want:  # one clear reply naming the seed and the allowed range
                assert "[0, 2**64 - 1]" in err and "Overflow" not in err, err
        ws.send_bytes(b"\xff" * 70_000)
        assert "binary messages" in next_error(ws)
        ws.send_text(json.dumps({"type": "reset", "seed": 2**64 - 1}))  # the largest seed is fine
        while next_frame(ws)[0]["action"] != "start":
            pass
        assert next_frame(ws)[0]["i"] == 1


def test_reset_spam_is_served_in_order_and_the_stream_goes_on(world):
    with TestClient(create_app(world)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        t0 = time.perf_counter()
        for seed in range(100):
            ws.send_text(json.dumps({"type": "reset", "seed": seed}))
        starts = 0
        while starts < 101:  # the first start frame, then one per reset
            starts += next_frame(ws)[0]["action"] == "start"
        h, _ = next_frame(ws)
        assert h["action"] == "stay" and h["i"] == 1
        assert time.perf_counter() - t0 < 30


# -- abrupt disconnects on a real server --------------------------------------------------------------------------

class Records(logging.Handler):
    def __init__(self) -> None:  # every record, with its traceback if it has one
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def abrupt(url: str, i: int) -> str:
    """One player who leaves without a close frame, at one of six moments; "served" if it got the hello."""
    try:
        ws = await connect(url, proxy=None, ping_interval=None, compression=None, open_timeout=20)
    except (OSError, websockets.exceptions.InvalidHandshake, asyncio.TimeoutError):
        return "refused"
    got = "open"
    try:
        if i % 6 >= 1:
            got = "served" if json.loads(await ws.recv())["type"] == "hello" else "full"
        if i % 6 == 2:
            await ws.recv()  # the start frame
        if i % 6 == 3:  # mid-reset: the reset is on its way or running when the socket goes
            await ws.send(json.dumps({"type": "reset", "seed": i}))
        if i % 6 == 4:
            for s in range(3):
                await ws.send(json.dumps({"type": "reset", "seed": s}))
            await ws.recv()
        if i % 6 == 5:  # mid-step: frames are being sent
            await ws.send(json.dumps({"type": "action", "action": "left", "seq": 1}))
            for _ in range(3):
                await ws.recv()
    except websockets.exceptions.ConnectionClosed:
        pass
    sock = ws.transport.get_extra_info("socket")
    if i % 2 and sock is not None and sock.fileno() >= 0:  # half reset the TCP connection (RST), half drop it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()
    return got


async def disconnects(world, url: str, start: int, n: int, parallel: int = 4) -> list[str]:
    """`n` abrupt players, `parallel` at a time, each waiting for a free slot: a session lives until its model
    call in flight is done, so players who leave at once would otherwise mostly find the server full."""
    gate = asyncio.Semaphore(parallel)

    async def one(i):
        async with gate:
            while len(world.active) > world.max_sessions - parallel - 1:
                await asyncio.sleep(0.005)
            return await abrupt(url, i)

    return await asyncio.gather(*(one(i) for i in range(start, start + n)))


async def first_message(url: str) -> dict:
    async with connect(url, proxy=None) as ws:
        return json.loads(await ws.recv())


def drained(world, timeout: float = 20.0) -> bool:
    t_end = time.time() + timeout  # the last sessions finish their model call, then are released
    while world.active and time.time() < t_end:
        time.sleep(0.02)
    gc.collect()
    return not world.active


def test_400_abrupt_disconnects_log_no_traceback_and_memory_stays_flat(one_thread, make_student_world,
                                                                       monkeypatch, capfd):
    world = make_student_world(max_sessions=8)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda a: thread_errors.append(repr(a.exc_value)))
    records = Records()
    with Server(world) as server:  # uvicorn configured its loggers: listen to them, and to asyncio's
        loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "asyncio")]
        for lg in loggers:
            lg.addHandler(records)
        try:
            url = server.url.replace("http://", "ws://") + "ws"
            first = asyncio.run(disconnects(world, url, 0, 50))
            assert drained(world)
            rss_50 = rss_mb()
            rest = asyncio.run(disconnects(world, url, 50, 350))
            assert drained(world)
            rss_400 = rss_mb()
            assert asyncio.run(first_message(url))["type"] == "hello"  # and the server still serves
        finally:
            for lg in loggers:
                lg.removeHandler(records)
    outcomes = first + rest
    log = "\n".join(records.lines) + capfd.readouterr().err
    tracebacks = log.count("Traceback") + log.count("Exception in ASGI") + len(thread_errors)
    served = outcomes.count("served")
    print(f"\n400 abrupt disconnects: {collections.Counter(outcomes)}; tracebacks {tracebacks}; "
          f"RSS {rss_50:.1f} MiB after 50, {rss_400:.1f} MiB after 400")
    assert tracebacks == 0, log[-3000:]
    assert "never retrieved" not in log and "Task was destroyed" not in log, log[-3000:]
    assert served >= 300, collections.Counter(outcomes)
    assert rss_400 - rss_50 < 20, (rss_50, rss_400)  # sessions are dropped: nothing piles up per connection


# -- options -----------------------------------------------------------------------------------------------------

OPTIONS = [  # (option, bad value, what the error names as allowed)
    ("window", 0, ">= 1"), ("window", -1, ">= 1"), ("window", 2.5, "integer"), ("window", True, "integer"),
    ("max_sessions", 0, ">= 1"), ("max_sessions", -1, ">= 1"), ("max_frames", -1, ">= 0"),
    ("fps", -1.0, ">= 0"), ("fps", math.nan, "finite"), ("fps", math.inf, "finite"), ("fps", "30", "number"),
]


@pytest.mark.parametrize("name,value,allowed", OPTIONS)
def test_world_options_are_checked(name, value, allowed, make_student_world, tmp_path):
    with pytest.raises(ConfigError, match=name) as e:
        make_student_world(**{name: value})
    assert allowed in str(e.value) and f"--{name.replace('_', '-')}" in str(e.value)
    with pytest.raises(ConfigError, match=name):  # before the model loads: no checkpoint is read
        load_world(tmp_path / "no-such-checkpoint", **{name: value})
    with pytest.raises(ConfigError, match=name):
        serve(str(tmp_path / "no-such-checkpoint"), **{name: value})


def test_window_below_the_block_size_a_mutated_world_and_app_options_are_refused(make_student_world, world):
    with pytest.raises(ConfigError, match=r"window .*block size \(3\)"):
        check_options(window=2, block_size=3)
    check_options(window=3, block_size=3, fps=0, max_sessions=1, max_frames=0)
    w = make_student_world()
    w.window = 0
    for bad, kw in ((w, {}), (world, {"token": ""}), (world, {"allow_origins": ["ftp://x"]}),
                    (world, {"allow_origins": ["http://x:70000"]})):
        with pytest.raises(ConfigError, match="window|token|allow_origins"):
            create_app(bad, **kw)


@pytest.mark.parametrize("kw,name", [
    ({"port": 99999}, "port"), ({"port": 0}, "port"), ({"port": -1}, "port"), ({"port": "80"}, "port"),
    ({"host": ""}, "host"), ({"threads": -1}, "threads"), ({"token": ""}, "token"), ({"token": "a b"}, "token"),
    ({"allow_origins": ["evil.example"]}, "allow_origins"), ({"allow_origins": [7]}, "allow_origins"),
])
def test_serve_options_are_checked_before_the_model_loads(kw, name, tmp_path):
    with pytest.raises(ConfigError, match=name) as e:
        serve(str(tmp_path / "no-such-checkpoint"), **kw)
    if name == "port":
        assert "1..65535" in str(e.value)
