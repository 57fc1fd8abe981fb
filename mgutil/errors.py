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


class LaunchError(MusicGenBatchError):
    """Raised when a worker instance cannot be planned, requested or reached."""


class SpotPriceTooLowError(LaunchError):
    """Raised before any request when the maximum spot price is below every zone's price."""


class QuotaError(LaunchError):
    """Raised when an EC2 quota (spot instance count or vCPUs) blocks the request."""


class SpotRequestError(LaunchError):
    """Raised when a spot request ends without a running instance, or times out."""


class WorkerRunningError(LaunchError):
    """Raised when a worker is already pending or running and ``force`` is not set."""


class BootstrapError(LaunchError):
    """Raised when the rendered UserData is invalid: too large, no ``#!``, or a credential."""


class ReadinessError(MusicGenBatchError):
    """Raised when one or more readiness checks failed; ``failures`` lists their rows."""

    def __init__(self, failures):
        self.failures = list(failures)
        lines = "\n".join(f"  - {row.check}: {row.found}. Fix: {row.fix}" for row in self.failures)
        super().__init__(f"{len(self.failures)} readiness check(s) failed:\n{lines}")


class ClaimLostError(StorageError):
    """Raised when a worker renews a claim that another worker has taken over or removed."""
