"""Run metrics: one JSON line per step, TensorBoard scalars when tensorboard is installed, a progress bar."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any


def merge_rank_metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combines per-rank metric dicts: ``time/*`` take the maximum (the slowest rank), counts
    (``*/groups``, ``*/tokens``, ``*/samples``, ``*_samples``, ``*/verifier_errors``) are summed,
    everything else is averaged over the ranks that report it."""
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    for result in results:
        for key, value in result.items():
            v = float(value)
            if key not in out:
                out[key], seen[key] = v, 1
            elif key.startswith("time/"):
                out[key] = max(out[key], v)
            elif _is_count(key):
                out[key] += v
            else:
                out[key] += v
                seen[key] += 1
    for key, n in seen.items():
        if not key.startswith("time/") and not _is_count(key):
            out[key] /= n
    return out


def _is_count(key: str) -> bool:
    tail = key.rsplit("/", 1)[-1]
    return tail in ("groups", "tokens", "samples", "verifier_errors", "failed_samples")


class MetricsWriter:
    """Writes ``metrics.jsonl`` (and TensorBoard events) into a run directory; shows a progress bar.

    Args:
        run_dir: the run directory.
        total_steps: for the progress bar.
        show_progress: draw a tqdm bar on stderr.
        tensorboard: write TensorBoard events if the ``tensorboard`` package is installed.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, show_progress: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (self.run_dir / "metrics.jsonl").open("a")
        self._tb: Any = None
        self.note = ""
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            else:
                self.note = "tensorboard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)."
        self._bar: Any = None
        if show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="steps", unit="step", dynamic_ncols=True)
        self._start = time.time()

    def log(self, step: int, metrics: Mapping[str, float], *, advance: bool = True) -> None:
        """Appends one record; ``advance`` moves the progress bar by one step."""
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        record = {"step": step, "wall_s": round(time.time() - self._start, 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._bar is not None:
            shown = {k.split("/", 1)[-1]: f"{clean[k]:.3g}" for k in _BAR_KEYS if k in clean}
            self._bar.set_postfix(shown, refresh=False)
            if advance:
                self._bar.update(1)

    def write(self, text: str) -> None:
        """Prints a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._file.close()
        plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_BAR_KEYS = ("reward/mean", "reward/accuracy", "actor/loss", "time/step")
_CURVE_KEYS = ("reward/mean", "reward/accuracy", "eval/accuracy", "env/return", "env/success")


def plot_curves(metrics_file: str | Path, out: str | Path, keys: Sequence[str] = _CURVE_KEYS) -> Path | None:
    """Draws each of ``keys`` found in a ``metrics.jsonl`` against the step into one PNG.

    Training-batch reward and accuracy are lines; held-out accuracy, measured only now and then, is
    markers. Returns the PNG's path, or None when the file holds none of the keys.
    """
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        steps, values = zip(*sorted(points), strict=True)
        held_out = key.startswith("eval/")
        ax.plot(steps, values, label=key, marker="o" if held_out else None, linestyle="--" if held_out else "-")
    ax.set_xlabel("step")
    ax.set_title(Path(metrics_file).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
