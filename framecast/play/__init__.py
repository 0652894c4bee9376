"""`framecast play`: a live world model in the browser (architecture.md §4); the server is `server.py`, the
headless-browser driver of its test and benchmark `drive.py`."""

from .server import (CLOSE_TRY_AGAIN, MAX_MESSAGE, STATIC, World, create_app, encode_png, load_world, pack, rss_mb,
                     serve)

__all__ = ["CLOSE_TRY_AGAIN", "MAX_MESSAGE", "STATIC", "World", "create_app", "encode_png", "load_world", "pack",
           "rss_mb", "serve"]
