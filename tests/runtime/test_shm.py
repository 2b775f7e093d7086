"""The shared-memory pool: page-aligned first-fit allocation, coalescing, zero-copy attach, release."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from rlinf import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


def test_allocation_reuse_and_coalescing():
    page = shm.PAGE
    pool = shm.SharedPool(8 * page)
    try:
        a = pool.alloc(1)  # rounds up to one page
        b = pool.alloc(3 * page)
        c = pool.alloc(2 * page + 1)  # three pages
        assert (a, b, c) == (0, page, 4 * page)
        assert pool.alloc(2 * page) is None  # one page left
        pool.release(b, 3 * page)
        assert pool.alloc(2 * page) == page  # first fit reuses the hole
        pool.release(page, 2 * page)
        pool.release(a, 1)
        pool.release(c, 2 * page + 1)
        assert pool.used == 0 and pool._free == [(0, 8 * page)]  # all merged back into one extent
    finally:
        pool.unlink()


def test_attach_maps_without_copy_and_reports_when_freed():
    pool = shm.SharedPool(4 * shm.PAGE)
    try:
        data = [memoryview(np.arange(10, dtype=np.float32)), memoryview(np.full(3, 7, dtype=np.int64))]
        total = sum(d.nbytes for d in data)
        off = pool.alloc(total)
        assert off is not None
        offsets = pool.write(off, data)
        freed = []
        bufs = shm.attach(pool.path, off, total, offsets, [d.nbytes for d in data], lambda: freed.append(1))
        floats = np.frombuffer(bufs[0], dtype=np.float32)
        assert floats.tolist() == list(range(10)) and np.frombuffer(bufs[1], np.int64).tolist() == [7, 7, 7]
        pool.view[off] = 0xFF  # the consumer sees the producer's memory: no copy was made
        assert bufs[0][0] == 0xFF
        del bufs
        gc.collect()
        assert freed == []  # `floats` still uses the mapping
        del floats
        gc.collect()
        assert freed == [1]
    finally:
        pool.unlink()
