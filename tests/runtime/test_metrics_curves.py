import json

from rlinf.metrics import MetricsWriter, plot_curves


def test_writer_leaves_a_curve_png_with_the_logged_series(tmp_path):
    with MetricsWriter(tmp_path, total_steps=3, show_progress=False, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.log(step, {"reward/mean": 0.1 * step, "reward/accuracy": 0.2 * step, "actor/loss": 1.0})
        log.log(3, {"eval/accuracy": 0.5}, advance=False)
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3]


def test_no_curve_without_reward_or_accuracy(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "actor/loss": 0.3}) + "\n")
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
