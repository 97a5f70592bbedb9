"""The three error tiers, in one place.

    BatchInferError
     ├── ConfigError        bad flags, unknown model or layer, missing weights: fail at once, never retried
     │    └── JobExists     a job id that is already taken
     ├── SourceError        a source (folder, manifest) cannot be read at submit time
     ├── BrokerError        the broker or state store cannot be reached
     ├── ShardError         a whole shard failed (sink or storage down): retried, then reported
     ├── ShardStopped       an attempt stopped between batches (cancelled, worker stopping, lease lost)
     └── DecodeError        one image cannot be used: becomes an output row with `error`, never stops a shard
"""


class BatchInferError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(BatchInferError, ValueError):
    """The job's configuration is invalid; retrying cannot help."""


class SourceError(BatchInferError):
    """A source given to the producer does not exist or cannot be read."""


class BrokerError(BatchInferError):
    """The broker or the Redis state store cannot be reached."""


class ShardError(BatchInferError):
    """A whole shard failed for a reason that may be transient."""


class ShardStopped(BatchInferError):
    """An attempt stopped before its end on purpose; ``reason`` says why (see ``workers.lease``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobExists(ConfigError):
    """``--job-id`` names a job that already exists."""


class DecodeError(BatchInferError):
    """One image could not be read or decoded; recorded as that image's row."""
