import pandas as pd
import pytest

from test_cli import rtl


def test_bench_reports_the_three_loops(tmp_path):
    out = tmp_path / "bench"
    proc = rtl("bench", "model=trunc", "model.cut=1", "data.image_size=32", "train.batch_size=8", "bench.steps=2",
               "bench.warmup=1", "bench.eval_images=16", "bench.naive_workers=0", "bench.score_n=2000",
               f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "bench.csv").iloc[0]
    for col in ("a_bare_ips", "b_loop_ips", "c_naive_ips", "eval_ips", "peak_memory_gb", "score_seconds"):
        assert row[col] > 0, col
    assert row.b_over_a == pytest.approx(row.b_loop_ips / row.a_bare_ips, rel=0.01)
    assert row.b_over_c == pytest.approx(row.b_loop_ips / row.c_naive_ips, rel=0.01)
    assert row.precision == "fp32" and row.image_size == 32 and row.batch_size == 8
    assert "(b) rtl train loop" in proc.stdout and "b/a =" in proc.stdout


def test_bench_refuses_a_size_too_small(tmp_path):
    proc = rtl("bench", "model=cbr_small", "data.image_size=64", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert proc.returncode == 2 and "at least 121 px" in proc.stderr and "Traceback" not in proc.stderr
