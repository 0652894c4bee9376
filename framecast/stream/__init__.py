"""Streaming sessions over causal models (architecture.md §4); the implementation is in `session.py`."""

from .session import Session, SessionError

__all__ = ["Session", "SessionError"]
