"""rundir.py: a run's folder is skipped, resumed or refused by its stored settings, and trained by one process."""

from __future__ import annotations

import json

import pytest

from rethink_tl import runfiles as rf
from rethink_tl.errors import NotYourRun, UserError
from rethink_tl.identity import setting_id
from rethink_tl.rundir import PRETRAIN, TRAIN, RunDir, check_resumable, resume_hint

SETTINGS = {"model.name": "dens_t1", "train.lr": 1e-3, "train.seed": 0}


def claimed(path, settings=SETTINGS, force=False, kind=TRAIN):
    from omegaconf import OmegaConf

    run = RunDir(path, settings, force, kind)
    run.acquire()
    run.claim(OmegaConf.create({"train": {"lr": 1e-3}}))
    return run


def test_new_resume_finished_by_the_files_there(tmp_path):
    run = claimed(tmp_path / "r")
    assert run.status() == "new"  # identity.json and config.yaml alone: nothing trained yet
    stored = json.loads((tmp_path / "r" / rf.IDENTITY).read_text())
    assert stored == {"setting_id": setting_id(SETTINGS), "settings": SETTINGS}
    (tmp_path / "r" / rf.LAST).write_bytes(b"x")
    assert run.status() == "resume"
    (tmp_path / "r" / rf.RESULTS).write_text("a\n1\n")
    assert run.status() == "finished"
    run.release()


def test_other_settings_are_refused_with_the_keys_that_differ(tmp_path):
    claimed(tmp_path / "r").release()
    (tmp_path / "r" / rf.LAST).write_bytes(b"x")
    other = RunDir(tmp_path / "r", {**SETTINGS, "train.lr": 1e-2}, False)
    with pytest.raises(NotYourRun, match=r"1 differ: train.lr: 0.001 -> 0.01"):
        other.status()
    assert RunDir(tmp_path / "r", {**SETTINGS, "train.lr": 1e-2}, True).status() == "new"  # force


def test_force_deletes_the_old_files_only_when_the_new_run_claims(tmp_path):
    claimed(tmp_path / "r").release()
    for name in (rf.LAST, rf.RESULTS, rf.METRICS):
        (tmp_path / "r" / name).write_text("old")
    forced = RunDir(tmp_path / "r", SETTINGS, True)
    forced.acquire()
    assert forced.status() == "new" and (tmp_path / "r" / rf.RESULTS).read_text() == "old"
    forced.claim({"x": 1})
    assert not any((tmp_path / "r" / name).exists() for name in (rf.LAST, rf.RESULTS, rf.METRICS))
    forced.release()


def test_one_process_at_a_time(tmp_path):
    first = RunDir(tmp_path / "r", SETTINGS, False)
    first.acquire()
    with pytest.raises(NotYourRun, match="another rtl process is training"):
        RunDir(tmp_path / "r", SETTINGS, False).acquire()
    first.release()
    second = RunDir(tmp_path / "r", SETTINGS, False)
    second.acquire()
    second.release()


def test_a_train_run_and_a_pretraining_never_share_a_folder(tmp_path):
    claimed(tmp_path / "t").release()
    (tmp_path / "t" / rf.RESULTS).write_text("a\n1\n")
    with pytest.raises(NotYourRun, match="holds an rtl train run"):
        RunDir(tmp_path / "t", SETTINGS, False, PRETRAIN).status()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / rf.WEIGHTS_META).write_text("{}")
    with pytest.raises(NotYourRun, match="holds an rtl pretrain run"):
        RunDir(tmp_path / "p", SETTINGS, False, TRAIN).status()


def test_damaged_or_missing_identity_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / rf.LAST).write_bytes(b"x")
    with pytest.raises(UserError, match="without a record of its settings"):
        RunDir(tmp_path / "r", SETTINGS, False).status()
    (tmp_path / "r" / rf.IDENTITY).write_text("{not json")
    with pytest.raises(NotYourRun, match="is damaged"):
        RunDir(tmp_path / "r", SETTINGS, False).status()


@pytest.mark.parametrize("state, message", [
    ({"model": 1}, "not a checkpoint of this kind of run"),
    ({"model": 1, "optimizer": 1, "data_fingerprint": "b", "precision": "fp32"}, "trained on other data"),
    ({"model": 1, "optimizer": 1, "data_fingerprint": "a", "precision": "bf16"}, "set runtime.amp=bf16 to resume"),
])
def test_a_checkpoint_resumes_only_on_the_same_data_and_precision(state, message, tmp_path):
    with pytest.raises(UserError, match=message):
        check_resumable(state, "a", "fp32", tmp_path / rf.LAST)
    check_resumable({"model": 1, "optimizer": 1, "data_fingerprint": "a", "precision": "fp32"}, "a", "fp32",
                    tmp_path / rf.LAST)


def test_resume_hint_drops_the_force():
    assert resume_hint(False) == "run the same command again to resume"
    assert "without runtime.force=true" in resume_hint(True)
