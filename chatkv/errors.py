"""The few error types chatkv raises; the CLI and the TUI translate them at the edges.

Each message says what went wrong and what to do about it, in one line.
"""

from __future__ import annotations


class ChatKVError(Exception):
    """Base class: a problem the user can fix. Exit code 1 in the CLI."""

    exit_code = 1


class ConfigError(ChatKVError):
    """An invalid configuration value (file, environment variable or flag)."""


class ModelError(ChatKVError):
    """The model could not be found, loaded or run as asked."""


class NotFoundError(ChatKVError):
    """A conversation or message id that does not exist."""


class InputError(ChatKVError):
    """Bad user input: an empty prompt, unreadable file, malformed line."""


class UsageError(ChatKVError):
    """Wrong command-line usage. Exit code 2."""

    exit_code = 2


class CacheError(ChatKVError):
    """A KV chunk that cannot be trusted. Never reaches the user as a failure:
    the caller prefills its tokens again.

    `damaged` says whether the chunk itself is bad (its content, header or index row:
    remove it) or only could not be read this time (a transient I/O error such as EIO,
    EMFILE or ENOMEM: keep it). `file_id` identifies the file that was judged, so that
    removing it never deletes a file a concurrent spill has since put in its place.
    """

    def __init__(self, message: str, *, damaged: bool = True, file_id: tuple | None = None):
        super().__init__(message)
        self.damaged = damaged
        self.file_id = file_id
