"""Experiment tracking (issue 23, item 1, TensorBoard): the events read back with TensorBoard's EventAccumulator
equal metrics.csv and results.csv, and after kill -9 and a resume each epoch appears exactly once."""

from __future__ import annotations

import signal

import pandas as pd
import pytest

from conftest import TINY, compose_cfg, fails_in_one_line

pytest.importorskip("tensorboard", reason="runtime.logger=tensorboard needs the tensorboard extra")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_events_equal_metrics(run_dir):
    metrics = pd.read_csv(run_dir / "metrics.csv")
    got = scalars(run_dir)
    for column, tag in (("train_loss", "train/loss"), ("lr", "train/lr"), ("val_auprc", "val/auprc"),
                        ("val_auroc_nodule", "val/auroc_nodule")):
        assert [s for s, _ in got[tag]] == metrics["epoch"].tolist(), (tag, got[tag])  # each epoch once, in order
        assert [v for _, v in got[tag]] == pytest.approx(metrics[column].tolist(), rel=1e-6)  # float32 in events
    return got


@pytest.mark.slow
def test_events_equal_metrics_and_results(tmp_path):
    from rethink_tl.train import run

    row = run(compose_cfg([*TINY, "runtime.logger=tensorboard"]), tmp_path / "run")
    got = assert_events_equal_metrics(tmp_path / "run")
    assert got["test/auprc"][0][1] == pytest.approx(row["test_auprc"], rel=1e-6)
    assert got["test/auroc"][0][1] == pytest.approx(row["test_auroc"], rel=1e-6)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert row["setting_id"] in acc.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_kill_9_then_resume_logs_each_epoch_once(tmp_path):
    from test_resume import rows, start, wait_for_rows

    run_dir = tmp_path / "run"
    for target in (1, 3):
        proc = start(run_dir, extra=["runtime.logger=tensorboard"])
        wait_for_rows(proc, run_dir, target)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    proc = start(run_dir, extra=["runtime.logger=tensorboard"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert rows(run_dir) == 5
    assert_events_equal_metrics(run_dir)


def test_an_unknown_logger_is_one_line(capsys, tmp_path):
    err = fails_in_one_line(capsys, ["train", *TINY, "runtime.logger=wandb", f"hydra.run.dir={tmp_path}"])
    assert "runtime.logger" in err and "tensorboard" in err


def test_the_logger_is_not_part_of_the_run():
    from rethink_tl.identity import identity

    assert identity(compose_cfg(TINY)) == identity(compose_cfg([*TINY, "runtime.logger=tensorboard"]))
