"""`framecast play`: a live world model or text-to-video stream in the browser (architecture.md §4); the
shared model is `world.py`, the server `server.py`, the headless-browser driver of its tests and benchmark
`drive.py`."""

from .server import (
           CLOSE_TRY_AGAIN,
           MAX_MESSAGE,
           STATIC,
           create_app,
           encode_png,
           pack,
           rss_mb,
           serve,
)
from .world import World, load_world

__all__ = ["CLOSE_TRY_AGAIN", "MAX_MESSAGE", "STATIC", "World", "create_app", "encode_png", "load_world", "pack",
           "rss_mb", "serve"]
