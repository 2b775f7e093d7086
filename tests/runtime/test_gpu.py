"""GPU paths: CUDA_VISIBLE_DEVICES per rank and NCCL collectives. Skipped without a CUDA GPU."""

from __future__ import annotations

import os

import torch

from rlinf import Worker

from ..conftest import needs_cuda


class GpuProbe(Worker):
    def visible(self) -> tuple[str, int]:
        return os.environ.get("CUDA_VISIBLE_DEVICES", ""), torch.cuda.device_count()

    def all_reduce(self) -> float:
        import torch.distributed as dist

        t = torch.ones(1, device=self.device) * (self.rank + 1)
        dist.all_reduce(t, group=self.dist_group())
        return float(t.item())

    def backend(self) -> str:
        import torch.distributed as dist

        return str(dist.get_backend(self.dist_group()))


@needs_cuda
def test_each_rank_sees_its_own_gpu(fresh_groups):
    cluster = fresh_groups
    gpus = [d.index for d in cluster.devices if d.kind == "cuda"]
    group = GpuProbe.launch(cluster, gpus[:1], name="gpu-probe")
    visible, count = group.call(GpuProbe.visible).wait()[0]
    assert visible == str(cluster.devices[gpus[0]].local_index) and count == 1


@needs_cuda
def test_nccl_all_reduce(fresh_groups):
    cluster = fresh_groups
    gpus = [d.index for d in cluster.devices if d.kind == "cuda"]
    if len(gpus) < 2:
        import pytest

        pytest.skip("needs two CUDA GPUs")
    group = GpuProbe.launch(cluster, gpus[:2], name="nccl")
    assert group.call(GpuProbe.backend).wait() == ["nccl", "nccl"]
    assert group.call(GpuProbe.all_reduce).wait() == [3.0, 3.0]
