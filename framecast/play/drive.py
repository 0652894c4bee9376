"""Drive the play page in headless Chromium and measure it end to end (the browser test and
benchmarks/play_browser.py share this).

Chromium is Debian's (`apt-get install chromium`), driven through Python playwright with `executable_path`;
`playwright install` downloads browsers and is never used (docs/world_model.md). The numbers
are what the page itself saw: frames per second between frame arrivals, first-frame latency from page load,
key-to-frame latency from the key event to the first frame that answers it, and the server's resident memory
reported in each frame's header.
"""

import os
import shutil
import socket
import statistics
import threading
import time

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    """$FRAMECAST_CHROMIUM, else chromium on PATH (Debian's package), else None."""
    env = os.environ.get("FRAMECAST_CHROMIUM")
    if env:
        return env if os.path.exists(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Server:
    """uvicorn serving `create_app(world, **app_kw)` (app_kw: allow_origins, token) on a free local port (or
    `port`) in a background thread; `url` is the page's, with the token if there is one."""

    def __init__(self, world, port: int = 0, **app_kw) -> None:
        from urllib.parse import quote

        import uvicorn

        from .server import MAX_MESSAGE, create_app

        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        token = app_kw.get("token")
        self.url = f"http://127.0.0.1:{port}/" + (f"?token={quote(token, safe='')}" if token else "")
        config = uvicorn.Config(create_app(world, **app_kw), host="127.0.0.1", port=port, log_level="warning",
                                ws_max_size=MAX_MESSAGE * 4)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the play server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def drive(url: str, *, frames: int = 200, script: list[tuple[str, int]] | None = None, chromium: str | None = None,
          screenshot: str | None = None, timeout_s: float = 300.0, record_every: int = 0,
          prompts: list[tuple[int, str]] | None = None) -> dict:
    """Open the page, wait for `frames` generated frames while playing `script` [(key, frames to hold), ...] in a
    loop (key "" = hold nothing), and return what the page measured. With `record_every` > 0 the canvas is
    read back every that many frames into `report["canvas"]` (a list of [PNG data URL, the frame's action]) for
    a gif. `prompts` [(after this many frames, text), ...] types each prompt into the page's prompt box and
    sends it (text-to-video models); the report's "prompts" is the prompt switch each frame answered."""
    from playwright.sync_api import sync_playwright

    exe = chromium or find_chromium()
    if exe is None:
        raise RuntimeError("no chromium found: apt-get install chromium, or set FRAMECAST_CHROMIUM")
    script = script or [("", 10)]
    t_end = time.time() + timeout_s
    canvas = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("window.framecast && window.framecast.generated >= 1",
                                   timeout=max(1.0, t_end - time.time()) * 1e3)
            i = 0
            todo = sorted(prompts or [])
            while True:
                n = page.evaluate("window.framecast.generated")
                while todo and n >= todo[0][0]:  # type the next prompt into the page and send it
                    page.fill("#prompt", todo.pop(0)[1])
                    page.click("#send-prompt")
                if n >= frames:
                    break
                key, hold = script[i % len(script)]
                i += 1
                if key:
                    page.keyboard.down(key)
                target = min(frames, n + hold)
                while True:  # hold the key for `hold` frames, reading the canvas back on the way if asked
                    nxt = target if not record_every else min(target, (n // record_every + 1) * record_every)
                    page.wait_for_function(f"window.framecast.generated >= {nxt}",
                                           timeout=max(1.0, t_end - time.time()) * 1e3)
                    if record_every:
                        canvas.append(page.evaluate("[document.getElementById('screen').toDataURL('image/png'), "
                                                    "window.framecast.header.action]"))  # [png data URL, action]
                    n = nxt
                    if n >= target:
                        break
                if key:
                    page.keyboard.up(key)
            S = page.evaluate("window.framecast")
            if screenshot:
                page.screenshot(path=screenshot)
        finally:
            browser.close()
    return summarise(S, canvas)


def summarise(S: dict, canvas: list | None = None) -> dict:
    times, rss = S["times"], [r for r in S["rss"] if r is not None]
    span = (times[-1] - times[0]) / 1e3 if len(times) > 1 else float("nan")
    lat = S["latencies"]
    tenth = max(1, len(rss) // 10)
    return {
        "frames": S["generated"],
        "fps": (len(times) - 1) / span if span == span and span > 0 else float("nan"),
        "first_frame_ms": S["firstFrameMs"],
        "key_latency_ms_median": statistics.median(lat) if lat else None,
        "key_latency_ms_max": max(lat) if lat else None,
        "key_changes": len(lat),
        "rss_mb_first_tenth": statistics.mean(rss[:tenth]) if rss else None,
        "rss_mb_last_tenth": statistics.mean(rss[-tenth:]) if rss else None,
        "rss_mb_max": max(rss) if rss else None,
        "actions": sorted({a for a in S["actions"] if a is not None}),
        "prompts": S.get("prompts", []),
        "errors": S["errors"],
        "cached_max": S["header"]["cached"] if S["header"] else None,
        "canvas": canvas or [],
    }
