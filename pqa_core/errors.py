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
