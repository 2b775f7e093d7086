"""Exceptions rlinf raises at the driver; each message names the value, the rule and a fix."""

from __future__ import annotations


class RlinfError(Exception):
    """Base class of rlinf's own errors."""


class ConfigError(RlinfError, ValueError):
    """A config value or key is invalid."""


class PlacementError(RlinfError, ValueError):
    """A placement cannot be realised on the cluster's devices."""


class WorkerError(RlinfError):
    """A worker method raised; carries the worker's rank, host and traceback.

    Args:
        worker: ``"ActorWorker"``-style group name.
        rank: the rank that raised.
        host: hostname and pid of the rank's process.
        method: the method that raised, or ``"__init__"``.
        error: ``"ValueError: ..."``, the exception's type and message.
        traceback: the formatted traceback from the worker process.
    """

    def __init__(self, worker: str, rank: int, host: str, method: str, error: str, traceback: str) -> None:
        self.worker, self.rank, self.host, self.method = worker, rank, host, method
        self.error, self.worker_traceback = error, traceback
        super().__init__(
            f"{worker} rank {rank} ({host}) raised in {method}: {error}\n"
            f"--- traceback from the worker ---\n{traceback.rstrip()}"
        )

    def __reduce__(self):  # keep the structured fields when pickled across processes
        return (
            type(self),
            (self.worker, self.rank, self.host, self.method, self.error, self.worker_traceback),
        )


class WorkerDiedError(RlinfError):
    """A worker process died (killed, out of memory, crashed in native code)."""

    def __init__(self, worker: str, rank: int, host: str, method: str, detail: str) -> None:
        self.worker, self.rank, self.host, self.method = worker, rank, host, method
        super().__init__(
            f"{worker} rank {rank} ({host}) died while running {method}: the process exited "
            f"unexpectedly (killed by a signal, out of memory, or a crash in native code). "
            f"Check the worker's log above and the machine's memory; relaunch the group to continue. "
            f"Ray reported: {detail}"
        )


class ChannelClosed(RlinfError):
    """The channel is closed: no more items will be accepted (put) or are left (get)."""
