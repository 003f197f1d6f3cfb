"""Errors a user can act on: the lowest layer, imported by every other one, importing nothing.

Every layer raises a `UserError` (or one of its subclasses) for a mistake the user can fix: a bad
config, a missing or mismatched file, a full disk. The commands (`var-train`, `var-prep`) turn it
into one line `error: ...` and exit code 2 (`--debug` or VAR_TRAIN_DEBUG=1 shows the traceback);
anything else is a bug and keeps its traceback. The subclasses also derive from the builtin type a
caller would have caught before (ValueError, FileNotFoundError, OSError), so library callers that
catch those keep working.
"""

from __future__ import annotations

EXIT_CODE_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A recipe or override that cannot be used (unknown key, wrong type, value out of range)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (VAE, shards, checkpoint)."""


class MismatchError(UserError, ValueError):
    """Files that do not belong together: shards from another VAE, a checkpoint of another model."""


class CorruptFileError(UserError, ValueError):
    """A file whose size or checksum differs from what was recorded when it was written."""


class UnsafeFileError(UserError, ValueError):
    """A file that would run code when loaded (a pickle asking for a callable it has no need of)."""


class DiskFullError(UserError, OSError):
    """No space left while writing; temporary files were removed, nothing complete was touched."""


class StageFailedError(UserError):
    """A stage of a multi-stage command (the demos' tokenizer or torchrun training) stopped: it has
    printed its own error, traceback or "interrupted" line, so the command adds one line, not
    another traceback, and exits with the stage's code (1 by default, not 2: the cause may be a bug)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
