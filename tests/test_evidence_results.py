"""results.py: the column names, and reading a run directory that may be finished, failed, running or damaged."""

from __future__ import annotations

import json

import pytest

from rethink_tl.errors import UserError
from rethink_tl.evidence.results import BrokenRun, label_names, read_run, run_dirs
from test_evidence_report import macro, write_run


def test_label_names_from_results_and_summary_columns():
    row = ["dataset", "test_auroc", "test_auprc", "val_auroc_opacity", "test_auroc_opacity",
           "test_auroc_pleural_effusion", "test_auprc_opacity", "test_auprc_pleural_effusion"]
    assert label_names(row) == ["opacity", "pleural_effusion"]
    summary = ["n", "test_auroc_mean", "test_auroc_std", "test_auroc_opacity_mean", "test_auroc_opacity_std"]
    assert label_names(summary, "_mean") == ["opacity"]


def test_a_finished_run_reads_typed(tmp_path):
    run = write_run(tmp_path, model="res_f", init="random", fraction=0.1, seed=2, experiment="fig3",
                    values=macro(0.75))
    got = read_run(run)
    assert got.status == "finished" and got.experiment == "fig3"
    assert got.where == ("synthetic", "res_f", "random", 0.1)
    assert got.row["seed"] == 2 and isinstance(got.row["seed"], int) and got.row["test_auroc"] == 0.75
    assert got.row["test_auprc_nodule"] == pytest.approx(0.25)
    assert got.settings["train.epochs"] == 3 and got.row["setting_id"] == got.setting_id
    assert run_dirs(tmp_path) == [run]


def test_failed_and_unfinished_runs(tmp_path):
    failed = write_run(tmp_path, finished=False)
    (failed / "error.txt").write_text("cbr_small needs images of at least 217 px\nmore detail\n")
    got = read_run(failed)
    assert (got.status, got.error) == ("failed", "cbr_small needs images of at least 217 px")
    stopped = read_run(write_run(tmp_path, seed=1, finished=False))
    assert stopped.status == "unfinished" and stopped.where == ("synthetic", "dens_f", "pretrained", 1.0)


def rewrite_results(text):
    def damage(run):
        (run / "results.csv").write_text(text)
    return damage


def results_row(**change):
    def damage(run):
        lines = (run / "results.csv").read_text().splitlines()
        head, row = lines[0].split(","), lines[1].split(",")
        for key, value in change.items():
            row[head.index(key)] = value
        (run / "results.csv").write_text(",".join(head) + "\n" + ",".join(row) + "\n")
    return damage


def two_rows(run):
    lines = (run / "results.csv").read_text().splitlines()
    (run / "results.csv").write_text("\n".join([*lines, lines[1]]) + "\n")


def other_identity(run):
    stored = json.loads((run / "identity.json").read_text())
    stored["setting_id"] = "deadbeef"
    (run / "identity.json").write_text(json.dumps(stored))


@pytest.mark.parametrize("damage, reason", [
    (rewrite_results(""), "results.csv is empty"),
    (rewrite_results('a,"b\n1,2'), "results.csv is not a readable CSV table"),
    (rewrite_results("epoch,loss\n1,0.5\n"), "results.csv lacks the column(s) dataset, model"),
    (lambda run: (run / "results.csv").write_text((run / "results.csv").read_text().splitlines()[0] + "\n"),
     "results.csv has 0 rows; a run writes exactly one"),
    (two_rows, "results.csv has 2 rows"),
    (results_row(test_auroc="0.8x"), "results.csv: test_auroc='0.8x' is not a number"),
    (results_row(val_auprc_nodule="high"), "results.csv: val_auprc_nodule='high' is not a number"),
    (results_row(seed="1.5"), "seed=1.5 is not a whole number"),
    (results_row(model="res_f"), "results.csv says model=res_f but identity.json model.tag=dens_f"),
    (other_identity, "setting_id"),
    (lambda run: (run / "identity.json").write_text("[1, 2]"), "identity.json has no 'settings' mapping"),
    (lambda run: (run / "config.yaml").write_text("model: [unclosed\n"), "config.yaml cannot be read"),
])
def test_broken_runs_say_why(tmp_path, damage, reason):
    run = write_run(tmp_path, values=macro(0.8))
    damage(run)
    with pytest.raises(BrokenRun) as caught:
        read_run(run)
    assert reason in caught.value.reason and isinstance(caught.value, UserError)
    assert caught.value.path == run


def test_an_empty_metric_is_undefined_not_broken(tmp_path):
    run = write_run(tmp_path, values=macro(0.8))
    results_row(test_auroc_nodule="")(run)
    got = read_run(run)
    assert got.row["test_auroc_nodule"] != got.row["test_auroc_nodule"]  # NaN: one class only in the test split


def test_a_broken_run_keeps_what_can_be_known_of_its_setting(tmp_path):
    run = write_run(tmp_path, model="res_f", fraction=0.05, values=macro(0.8))
    (run / "results.csv").write_text("")
    with pytest.raises(BrokenRun) as caught:
        read_run(run)
    assert caught.value.where == ("synthetic", "res_f", "pretrained", 0.05)


def test_a_setting_id_that_looks_like_a_number_stays_text(tmp_path):
    run = write_run(tmp_path, values=macro(0.8))
    results_row(setting_id="0001e123")(run)
    stored = json.loads((run / "identity.json").read_text())
    (run / "identity.json").write_text(json.dumps({**stored, "setting_id": "0001e123"}))
    assert read_run(run).row["setting_id"] == "0001e123"
