"""Cluster(address=...) joins a Ray cluster started separately (as on a GPU cluster)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    from rlinf import Cluster, Worker

    class Hello(Worker):
        def hi(self):
            return self.rank

    cluster = Cluster(address=sys.argv[1])
    assert not cluster.embedded and len(cluster.devices) >= 1, cluster
    group = Hello.launch(cluster, [0])
    print("ranks", group.call(Hello.hi).wait())
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_join_existing_ray_cluster(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = "6391"
    # --block keeps `ray start` in the foreground; stopping it stops only this cluster's processes
    # (a `ray stop` would also take down the test session's own embedded cluster).
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        script = tmp_path / "join.py"
        script.write_text(SCRIPT)
        for _ in range(30):
            out = subprocess.run(
                [sys.executable, str(script), f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=180
            )
            if "ranks [0]" in out.stdout or "Could not find any running Ray instance" not in out.stderr:
                break
            time.sleep(1)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "ranks [0]" in out.stdout
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
