"""Pickling that keeps tensor and array memory out of the pickle stream.

``dumps`` returns a small header plus the raw buffers of every numpy array and CPU tensor inside
the object (pickle protocol 5, out of band), so a transport can send them as zero-copy frames.
"""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any

import numpy as np
import torch
from ray import cloudpickle

INLINE_BYTES = 1024  # buffers smaller than this stay inside the header


def _rebuild_tensor(buf: Any, dtype: str, shape: tuple[int, ...], requires_grad: bool) -> torch.Tensor:
    raw = np.frombuffer(buf, dtype=np.uint8)
    t = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)
    t = t.view(getattr(torch, dtype)).reshape(shape)
    if requires_grad:
        t.requires_grad_(True)
    return t


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.layout == torch.strided and not obj.is_quantized:
            t = obj.detach()
            if t.device.type != "cpu":
                t = t.cpu()  # consumers receive CPU tensors and move them where they compute
            t = t.resolve_conj().resolve_neg().contiguous()
            raw: Any = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
            dtype = str(t.dtype).removeprefix("torch.")
            return _rebuild_tensor, (pickle.PickleBuffer(raw), dtype, tuple(t.shape), obj.requires_grad)
        return super().reducer_override(obj)


class _Reusable:
    """One pickler per thread, reused: building a cloudpickle pickler costs more than pickling a small item."""

    def __init__(self) -> None:
        self.file = io.BytesIO()
        self.buffers: list[memoryview] = []
        self.pickler = _Pickler(self.file, protocol=5, buffer_callback=self._keep_out_of_band)
        self.busy = False

    def _keep_out_of_band(self, pb: pickle.PickleBuffer) -> bool:
        view = pb.raw()
        if view.nbytes < INLINE_BYTES:
            return True  # in band
        self.buffers.append(view)
        return False

    def dumps(self, obj: Any) -> tuple[bytes, list[memoryview]]:
        self.busy = True
        self.buffers = []
        try:
            self.pickler.dump(obj)
            return self.file.getvalue(), self.buffers
        finally:
            # forget this item: the memo holds its objects, the file its bytes
            self.pickler.clear_memo()
            self.pickler.globals_ref = {}
            self.file.seek(0)
            self.file.truncate()
            self.busy = False


_local = threading.local()


_ATOMS = frozenset({int, float, bool, str, bytes, type(None)})


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickles ``obj``; returns the header and the out-of-band buffers (views, not copies)."""
    if type(obj) in _ATOMS:  # nothing to keep out of band, nothing cloudpickle adds: the C pickler alone
        return pickle.dumps(obj, protocol=5), []
    reusable = _local.__dict__.get("pickler")
    if reusable is None:
        reusable = _local.pickler = _Reusable()
    if reusable.busy:  # pickling from inside a pickling (a __reduce__ that calls dumps)
        return _Reusable().dumps(obj)
    return reusable.dumps(obj)


def loads(header: bytes | memoryview, buffers: list[Any]) -> Any:
    """Inverse of :func:`dumps`; ``buffers`` may be any objects exposing the buffer protocol."""
    return pickle.loads(header, buffers=buffers)
