"""User-facing errors: one clear line, a stable exit code, no traceback needed."""


class PqaError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits with ``exit_code``."""

    exit_code = 1


class UsageError(PqaError):
    """Bad command line, config key or plugin name/kwargs (exit code 2, like click)."""

    exit_code = 2


class DataError(PqaError):
    """Malformed input data; the message names file, line and field."""

    exit_code = 1


class CheckpointError(PqaError):
    """Missing, torn, corrupt or mismatched checkpoint."""

    exit_code = 1


class EnvironmentFailure(PqaError):
    """The machine refused: a read-only, missing or looping folder, a full disk (exit code 1)."""

    exit_code = 1

    @classmethod
    def from_os_error(cls, exc: OSError, what: str = "") -> "EnvironmentFailure":
        """``[what: ]path: reason`` in one line, from an OSError."""
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        return cls(": ".join(part for part in (what, where, reason) if part))


class NonFiniteError(PqaError):
    """A non-finite (NaN or infinite) loss or gradient in training: the run stops FAILED, with no final
    checkpoint, the step and the loss named (exit code 1)."""

    exit_code = 1
