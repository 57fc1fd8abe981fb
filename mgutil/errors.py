"""Exceptions raised by mgutil.

Every error a user can fix derives from :class:`MusicGenBatchError`, and its message
names the value at fault and the next step.
"""


class MusicGenBatchError(Exception):
    """Base class of every error that mgutil raises on purpose."""


class ConfigError(MusicGenBatchError):
    """Raised when a setting from the environment, ``.env`` or a parameter is invalid."""


class JobFileError(MusicGenBatchError):
    """Raised when a job file has invalid lines; ``errors`` lists every one of them."""

    def __init__(self, path, errors):
        self.path = path
        self.errors = list(errors)
        lines = "\n".join(f"  {error}" for error in self.errors)
        super().__init__(f"{path}: {len(self.errors)} invalid line(s):\n{lines}")


class StorageError(MusicGenBatchError):
    """Raised when the output location cannot be read or written."""


class StoragePermissionError(StorageError):
    """Raised when S3 denies access (403) to the output location."""


class GenerationError(MusicGenBatchError):
    """Raised when the model fails to produce usable audio for one job."""


class ReadinessError(MusicGenBatchError):
    """Raised when one or more readiness checks failed; ``failures`` lists their rows."""

    def __init__(self, failures):
        self.failures = list(failures)
        lines = "\n".join(f"  - {row.check}: {row.found}. Fix: {row.fix}" for row in self.failures)
        super().__init__(f"{len(self.failures)} readiness check(s) failed:\n{lines}")
