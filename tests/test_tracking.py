"""Experiment tracking (issue 23, item 1): TensorBoard's events read back with its EventAccumulator, and MLflow's
runs read back with mlflow.search_runs (a sqlite store, and a real `mlflow server` on localhost), equal
metrics.csv and results.csv; after kill -9 and a resume each epoch appears exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, compose_cfg, fails_in_one_line


pytestmark = pytest.mark.usefixtures("one_thread")


def event_accumulator():
    pytest.importorskip("tensorboard", reason="runtime.logger=tensorboard needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator()(str(run_dir / "tensorboard"))
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
    acc = event_accumulator()(str(tmp_path / "run" / "tensorboard"))
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


# --- MLflow ----------------------------------------------------------------------------------------------

def mlflow_runs(uri: str, experiment: str | None = None):
    """Every live tracked run in the store at ``uri`` (of ``experiment`` when given), as MLflow's search gives."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    names = [experiment] if experiment else None
    return mlflow.search_runs(experiment_names=names, search_all_experiments=names is None, output_format="list")


def assert_tracked_equals_files(uri: str, tracked, run_dir):
    """One tracked run's metrics, per epoch, equal metrics.csv; its test metrics equal results.csv; it is the run
    whose id last.pt keeps."""
    from mlflow.tracking import MlflowClient

    import torch

    client = MlflowClient(tracking_uri=uri)
    metrics = pd.read_csv(run_dir / "metrics.csv", float_precision="round_trip")
    for column in ("train_loss", "lr", "val_auprc", "val_auroc", "val_auroc_nodule", "val_auprc_opacity"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, column))
        assert [s for s, _ in history] == metrics["epoch"].tolist(), (column, history)  # each epoch once
        assert [v for _, v in history] == metrics[column].tolist()  # float64 in the store: equal, not close
    results = pd.read_csv(run_dir / "results.csv", float_precision="round_trip").iloc[0]
    tests = [k for k in results.index if k.startswith("test_") and isinstance(results[k], float)]
    assert {"test_auroc", "test_auprc", "test_auprc_nodule"} <= set(tests)
    for key in tests:
        assert tracked.data.metrics[key] == results[key], key
    assert tracked.data.tags["rtl.setting_id"] == results["setting_id"]
    assert tracked.data.tags["rtl.run_dir"] == str(run_dir.resolve())
    assert tracked.data.params["data.image_size"] == "32" and tracked.data.params["model.name"] == "trunc"
    assert tracked.info.status == "FINISHED"
    last = torch.load(run_dir / "last.pt", weights_only=False)
    assert last["tracking"]["mlflow_run_id"] == tracked.info.run_id


@pytest.mark.slow
def test_mlflow_run_equals_its_files(tmp_path):
    pytest.importorskip("mlflow")
    from rethink_tl.train import run

    run_dir = tmp_path / "run"
    run(compose_cfg([*TINY, "runtime.logger=mlflow"]), run_dir)
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    (tracked,) = mlflow_runs(uri, str(run_dir.resolve()))  # a single run: its folder is the experiment
    assert_tracked_equals_files(uri, tracked, run_dir)
    assert float(tracked.data.params["train.lr"]) == float(compose_cfg(TINY).train.lr)


@pytest.mark.slow
def test_mlflow_sweep_is_one_experiment(tmp_path, capsys):
    """rtl train -m: one experiment, one tracked run per setting, each equal to its files; the same command again
    (every run finished) adds nothing."""
    pytest.importorskip("mlflow")
    from rethink_tl.cli import main

    sweep = tmp_path / "sweep"
    argv = ["train", "-m", *TINY, "train.seed=0,1", "runtime.logger=mlflow", "runtime.threads=1",
            f"hydra.sweep.dir={sweep}"]
    for _ in range(2):
        main(argv)
    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    tracked = mlflow_runs(uri, str(sweep.resolve()))
    assert len(tracked) == 2
    by_folder = {Path(t.data.tags["rtl.run_dir"]): t for t in tracked}
    folders = sorted(p.parent for p in sweep.rglob("results.csv"))
    assert sorted(by_folder) == [f.resolve() for f in folders]
    for folder in folders:
        assert_tracked_equals_files(uri, by_folder[folder.resolve()], folder)
    assert {t.data.tags["rtl.seed"] for t in tracked} == {"0", "1"}
    assert by_folder[folders[0].resolve()].info.run_name == str(folders[0].relative_to(sweep))


@pytest.mark.slow
def test_mlflow_kill_9_then_resume_logs_each_epoch_once(tmp_path):
    """kill -9 twice, once before the first epoch ends (the tracked run it made is left behind), then resume: one
    tracked run, each epoch once, and it is the one last.pt names."""
    pytest.importorskip("mlflow")
    from test_resume import rows, start, wait_for_rows

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = ["runtime.logger=mlflow", f"runtime.mlflow_uri={uri}", "runtime.mlflow_experiment=kill"]
    proc = start(run_dir, extra=extra)
    deadline = time.time() + 300
    while not mlflow_runs_or_none(uri):  # the tracked run exists: epoch 1 is under way
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert rows(run_dir) == 0
    proc = start(run_dir, extra=extra)
    wait_for_rows(proc, run_dir, 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    proc = start(run_dir, extra=extra)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert rows(run_dir) == 5
    (tracked,) = mlflow_runs(uri, "kill")  # the orphan of the first start was deleted
    assert_tracked_equals_files(uri, tracked, run_dir)


def mlflow_runs_or_none(uri):
    import sqlite3

    db = uri[len("sqlite:///"):]
    if not os.path.exists(db):
        return []
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=0.1)) as con:
            return con.execute("select run_uuid from runs").fetchall()
    except sqlite3.Error:  # tables not made yet, or locked
        return []


@pytest.mark.slow
def test_mlflow_force_replaces_the_tracked_run(tmp_path):
    pytest.importorskip("mlflow")
    from rethink_tl.train import run

    run_dir = tmp_path / "run"
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    run(compose_cfg([*TINY, "runtime.logger=mlflow"]), run_dir)
    (first,) = mlflow_runs(uri)
    run(compose_cfg([*TINY, "runtime.logger=mlflow", "runtime.force=true", "train.epochs=2"]), run_dir)
    (second,) = mlflow_runs(uri)
    assert second.info.run_id != first.info.run_id
    assert_tracked_equals_files(uri, second, run_dir)  # two epochs, not the first run's three and these two


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on localhost (its own sqlite store), stopped by its pid at the end."""
    pytest.importorskip("mlflow")
    where = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{where / 'server.db'}",
                             "--default-artifact-root", str(where / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(where / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(where / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_mlflow_against_a_real_server(tmp_path, mlflow_server):
    """The same sweep logged to a tracking server over HTTP: mlflow.search_runs there equals the runs' files."""
    from rethink_tl.cli import main

    sweep = tmp_path / "sweep"
    main(["train", "-m", *TINY, "train.seed=0,1", "runtime.logger=mlflow", f"runtime.mlflow_uri={mlflow_server}",
          "runtime.mlflow_experiment=team", "runtime.threads=1", f"hydra.sweep.dir={sweep}"])
    tracked = mlflow_runs(mlflow_server, "team")
    assert len(tracked) == 2
    assert not (sweep / "mlflow.db").exists()
    for t in tracked:
        assert_tracked_equals_files(mlflow_server, t, Path(t.data.tags["rtl.run_dir"]))


def test_mlflow_server_that_does_not_answer_is_one_line(capsys, tmp_path):
    pytest.importorskip("mlflow")
    t0 = time.time()
    err = fails_in_one_line(capsys, ["train", *TINY, "runtime.logger=mlflow",
                                     f"runtime.mlflow_uri=http://127.0.0.1:{free_port()}",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert "runtime.logger=mlflow could not" in err and "runtime.mlflow_uri" in err
    assert time.time() - t0 < 60
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_mlflow_store_in_a_missing_folder_is_one_line(capsys, tmp_path):
    pytest.importorskip("mlflow")
    err = fails_in_one_line(capsys, ["train", *TINY, "runtime.logger=mlflow",
                                     f"runtime.mlflow_uri=sqlite:///{tmp_path / 'nope' / 'x.db'}",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert "does not exist" in err and "nope" in err


def test_a_new_mlflow_store_leaves_logging_as_it_was(tmp_path):
    """MLflow's migrations run logging.config.fileConfig (closing the root handlers, disabling every logger): the
    tracker puts logging back, so rtl's lines still reach the console and cli.log."""
    pytest.importorskip("mlflow")
    import logging

    from rethink_tl.tracking import tracker

    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        before = list(root.handlers)
        logging.getLogger("rethink_tl.train")  # exists before the store is made
        track = tracker(compose_cfg([*TINY, "runtime.logger=mlflow"]), tmp_path, "abcd1234")
        assert (tmp_path / "mlflow.db").is_file() and track.experiment_id
        assert root.handlers == before
        assert not logging.getLogger("rethink_tl.train").disabled
        assert not logging.getLogger("rethink_tl").disabled
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize("uri, says", [
    ("foo://x", "could not open the store at foo://x"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("DAMAGED", "could not open the store"),
])
def test_an_mlflow_store_that_cannot_be_used_is_one_line(capsys, tmp_path, uri, says):
    pytest.importorskip("mlflow")
    if uri == "DAMAGED":
        (tmp_path / "bad.db").write_text("this is not a database\n" * 100)
        uri = f"sqlite:///{tmp_path / 'bad.db'}"
    err = fails_in_one_line(capsys, ["train", *TINY, "runtime.logger=mlflow", f"runtime.mlflow_uri={uri}",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert says in err
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("key", ["runtime.mlflow_uri=http://127.0.0.1:5999", "runtime.mlflow_experiment=team"])
def test_mlflow_keys_without_the_mlflow_logger_are_one_line(capsys, tmp_path, key):
    err = fails_in_one_line(capsys, ["train", *TINY, key, "runtime.logger=tensorboard",
                                     f"hydra.run.dir={tmp_path / 'run'}"])
    assert key.split("=")[0] in err and "runtime.logger=mlflow" in err


def test_a_sweep_folder_a_sqlite_uri_cannot_hold_is_one_line(capsys, tmp_path):
    pytest.importorskip("mlflow")
    err = fails_in_one_line(capsys, ["train", *TINY, "runtime.logger=mlflow", f"hydra.run.dir={tmp_path / 'a?b'}"])
    assert "'?'" in err and "runtime.mlflow_uri" in err
