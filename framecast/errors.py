"""User-error types: a problem with what the user gave (a config, a checkpoint, data, a request).

The CLI prints any `UserError` as one line and exits with code 2; every other exception is a bug and keeps
its traceback (architecture.md §5). Each subsystem raises the subclass that names its kind of input, and
messages name the key, file or field at fault.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input rather than by framecast."""


class ConfigError(UserError, ValueError):
    """A config key or value that cannot be used; the message names the key."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or of the wrong kind; the message names the file."""


class DataError(UserError, RuntimeError):
    """A dataset, recording or pair store that is missing, corrupt or does not fit the config."""


class RequestError(UserError, RuntimeError):
    """A request a live session or server cannot serve (bad action, wrong frame shape, step before reset)."""
