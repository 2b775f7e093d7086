"""The cluster-wide device lock: components that share devices take turns.

A rank asks for the locks of its devices before it computes. When it gets them, every other
component still resident on those devices is asked to ``offload()`` first; the rank then
``onload()``s itself if it was offloaded. A component that releases the lock stays resident
until someone else needs its devices, so a component that runs twice in a row pays nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any


class DeviceLockService:
    """Runs as one async Ray actor per cluster; keys are ``Device.key`` strings."""

    def __init__(self) -> None:
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._resident: defaultdict[str, dict[str, Any]] = defaultdict(dict)  # key -> holder -> host
        self._holder: dict[str, str] = {}
        self._registered: defaultdict[str, dict[str, Any]] = defaultdict(dict)  # key -> holder -> host

    async def ping(self) -> bool:
        return True

    async def register(self, keys: list[str], holder: str, host: Any) -> None:
        """Records ``holder`` as resident on ``keys`` (a freshly launched rank holds its state).

        Ranks alone on their devices skip this service entirely; once a second component
        registers on a device, every rank there is told to go through the lock from then on.
        """
        for k in keys:
            self._resident[k][holder] = host
            self._registered[k][holder] = host
        sharing = {h: handle for k in keys if len(self._registered[k]) > 1 for h, handle in self._registered[k].items()}
        await asyncio.gather(*(handle.mark_shared.remote() for handle in sharing.values()))

    async def forget(self, holder: str) -> None:
        """Drops a rank that has exited."""
        for table in (*self._resident.values(), *self._registered.values()):
            table.pop(holder, None)

    async def acquire(self, keys: list[str], holder: str, host: Any) -> dict[str, float]:
        """Waits for every key (in sorted order, so overlapping requests cannot deadlock), then
        offloads the other residents. Returns seconds spent waiting and offloading others."""
        start = time.perf_counter()
        for k in sorted(keys):
            await self._locks[k].acquire()
            self._holder[k] = holder
        waited = time.perf_counter() - start
        others: dict[str, Any] = {}
        for k in keys:
            for h, handle in self._resident[k].items():
                if h != holder:
                    others[h] = handle
        if others:
            await asyncio.gather(*(handle.offload_for_handover.remote() for handle in others.values()))
            for residents in self._resident.values():
                for h in others:
                    residents.pop(h, None)
        for k in keys:
            self._resident[k][holder] = host
        return {"wait_s": waited, "offload_others_s": time.perf_counter() - start - waited}

    async def release(self, keys: list[str], holder: str) -> None:
        for k in keys:
            if self._holder.get(k) == holder and self._locks[k].locked():
                del self._holder[k]
                self._locks[k].release()

    async def holders(self) -> dict[str, str]:
        return dict(self._holder)
