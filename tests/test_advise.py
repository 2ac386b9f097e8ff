"""rtl advise: successive halving over candidates x inits x seeds, each run an ordinary rtl train run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg, fails_in_one_line
from rethink_tl import advise as A
from rethink_tl.errors import UserError
from rethink_tl.identity import setting_id

DATA = ["data.image_size=32", "data.num_samples=400", "data.prevalence=0.3", "data.test_prevalence=0.3",
        "train.epochs=4", "train.batch_size=16", "train.lr=1e-3", "runtime.progress=false", "runtime.device=cpu",
        "runtime.threads=1"]
# cbr_tiny needs 91 px images: at 32 px both of its candidates fail when their runs start, the others go on.
ADVISE = ["advise.models=[cbr_tiny,lite0_t2,lite0_t3]", "advise.seeds=2", "advise.eta=2", "advise.resamples=200",
          *DATA]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_rungs_and_how_many_go_on():
    assert A.rungs(10, 3, 27, None) == [1, 3, 9, 27]  # 10 candidates: 3 halvings by 3
    assert A.rungs(8, 3, 200, None) == [23, 69, 200]  # the DenseNet ladder x 2 inits, the paper's 200 epochs
    assert A.rungs(6, 2, 4, None) == [1, 2, 4]
    assert A.rungs(10, 3, 27, 3) == [3, 9, 27]
    assert A.rungs(4, 3, 5, 5) == [5]  # one rung: the grid
    with pytest.raises(UserError, match="smaller than the first rung"):
        A.rungs(4, 3, 5, 6)
    assert [A.keep(n, 3) for n in (10, 4, 3, 2, 1)] == [3, 1, 1, 1, 1]


def test_candidates_of_a_backbone_are_its_cuts_and_the_whole_network():
    opts, rest = A.parse(["advise.backbone=tf_efficientnet_lite0", "data.image_size=64"])
    assert rest == ["data.image_size=64"]
    found = [(c.model_group, c.model_keys.get("cut"), c.init) for c in A.candidates(opts)]
    assert found == [("trunc", k, i) for k in range(5) for i in ("pretrained", "random")] + \
        [("timm", None, "pretrained"), ("timm", None, "random")]
    opts, _ = A.parse([])
    assert [(c.model_group, c.init) for c in A.candidates(opts)][::2] == [(m, "pretrained") for m in A.LADDER]


@pytest.mark.parametrize("args, message", [
    (["advise.models=[dens_t1]", "advise.inits=[pretrained]"], "at least two candidates"),
    (["advise.models=[dens_t9,dens_f]"], "unknown model 'dens_t9'"),
    (["advise.backbone=efficientnet_lite9"], "timm does not know the backbone"),
    (["advise.eta=1"], "advise.eta=1 is out of range"),
    (["train.epochs=3", "advise.min_epochs=4"], "smaller than the first rung"),
    (["data.prevalence=0.002", "data.num_samples=300"], "positive(s)"),
    (["advise.models=[timm,dens_f]"], "needs a backbone"),
    (["advise.backbone=tf_efficientnet_lite0", "advise.cuts=[2,9]"], "9 is not a cut"),
    (["model=dens_t1"], "sets model itself"),
    (["train.seed=3"], "sets train.seed itself"),
    (["data.fraction=0.1,0.5"], "runs its own sweeps"),
    (["advise.seeds=two"], "advise.seeds must be a whole number"),
    (["advise.colour=red"], "unknown key advise.colour"),
    (["data.image_size=-4"], "data.image_size=-4 is out of range"),
    (["advise.backbone=tf_efficientnet_lite0", "advise.cuts=[3,whole,full]"],
     "advise.cuts whole and advise.cuts full are one candidate"),
    (["advise.resamples=0"], "advise.resamples=0 is out of range: it must be >= 100"),
    (["advise.cuts=1,2", "advise.backbone=tf_efficientnet_lite0"], "a list is written in brackets, e.g. advise.cuts=[1,2]"),
    (["advise.models=[dens_t1,res_f,resnet50]"], "advise.models res_f and advise.models resnet50 are one candidate"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "adv"
    line = fails_in_one_line(capsys, ["advise", *args, f"hydra.sweep.dir={out}"])
    assert message in line
    assert not out.exists()


# --- end to end (slow): one advise, a rerun, and one killed with -9 half-way ------------------------------------

def advise_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "rethink_tl", "advise", *ADVISE, f"hydra.sweep.dir={out}"]


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    out = tmp_path_factory.mktemp("advise")
    done = subprocess.run(advise_cmd(out), capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def run_dirs(out: Path) -> dict[tuple[str, str, int], Path]:
    """(model tag, init, seed) -> run folder."""
    found = {}
    for ident in out.rglob("identity.json"):
        s = json.loads(ident.read_text())["settings"]
        found[s["model.tag"], s["init.name"], s["train.seed"]] = ident.parent
    return found


def best_until(path: Path, epoch: int) -> float:
    m = pd.read_csv(path / "metrics.csv")
    return float(m.loc[m["epoch"] <= epoch, "val_auprc"].max())


@pytest.mark.slow
def test_advice_follows_successive_halving_computed_by_hand(advised):
    out, stdout = advised
    table = pd.read_csv(out / "advice.csv")
    cands = table[table["role"] == "candidate"]
    assert len(cands) == 6 and table["recommended"].sum() == 1
    failed = cands[cands["status"] == "failed"]
    assert sorted(failed["model"]) == ["cbr_tiny", "cbr_tiny"]
    assert failed["reason"].str.contains("needs images of at least 91 px").all()
    dirs = run_dirs(out)
    alive = [(m, i) for m, i in zip(cands["model"], cands["init"]) if m != "cbr_tiny"]
    for rung in (1, 2):  # rungs 1, 2, 4 (6 candidates, eta 2); keep max(1, n // 2) by mean best val AUPRC so far
        score = {c: np.mean([best_until(dirs[(*c, s)], rung) for s in (0, 1)]) for c in alive}
        kept = sorted(alive, key=lambda c: -score[c])[:max(1, len(alive) // 2)]
        for c in alive:
            row = table[(table["model"] == c[0]) & (table["init"] == c[1]) & (table["role"] == "candidate")].iloc[0]
            assert row[f"val_auprc_e{rung}"] == pytest.approx(score[c], abs=1e-12)
            if c not in kept:
                assert row["status"].startswith(f"dropped after epoch {rung}") and row["rung_reached"] == rung
                if "reference" not in row["status"]:  # paused at its rung: last.pt kept, nothing scored
                    for s in (0, 1):
                        assert len(pd.read_csv(dirs[(*c, s)] / "metrics.csv")) == rung
                        assert (dirs[(*c, s)] / "last.pt").exists() and not (dirs[(*c, s)] / "results.csv").exists()
        alive = [c for c in alive if c in kept]
    (winner,) = alive
    best = table[table["recommended"]].iloc[0]
    assert (best["model"], best["init"]) == winner and best["rung_reached"] == 4
    for s in (0, 1):
        assert pd.read_csv(dirs[(*winner, s)] / "results.csv")["epochs_run"][0] == 4
    # The reference arms are trained to the end: the whole network with TL and the winner with the other init.
    other = "random" if winner[1] == "pretrained" else "pretrained"
    for arm in (("timm-tf_efficientnet_lite0", "pretrained"), (winner[0], other)):
        assert all((dirs[(*arm, s)] / "results.csv").exists() for s in (0, 1)), arm
    text = (out / "advice.md").read_text()
    assert text == stdout
    assert f"keep {winner[0]} with {A.INIT_WORDS[winner[1]]}" in text.splitlines()[2]
    assert (out / "advice.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_runs_are_rtl_train_runs_and_the_comparisons_are_rtl_reports(advised, tmp_path):
    from rethink_tl.evidence.report import ReportOptions, report

    out, _ = advised
    table = pd.read_csv(out / "advice.csv")
    best = table[table["recommended"]].iloc[0]
    cut = int(best["model"].rsplit("cut", 1)[1])
    plain = ["model=trunc", f"model.cut={cut}", f"init={best['init']}", "train.seed=1",
             *[a for a in DATA if not a.startswith("runtime.")]]
    sid = setting_id(compose_cfg(plain))
    (path,) = [p for (m, i, s), p in run_dirs(out).items() if (m, i, s) == (best["model"], best["init"], 1)]
    assert path.name == f"s1-{sid}"  # the folder rtl train makes for these settings
    done = subprocess.run([sys.executable, "-m", "rethink_tl", "train", *plain, "runtime.threads=1",
                           f"hydra.run.dir={path}"], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0 and "finished with the same settings, skipping" in done.stdout + done.stderr
    # The advice's difference with the whole network is rtl report's paired bootstrap, to the digit.
    report(out, ReportOptions(out=str(tmp_path), resamples=200))
    comp = pd.read_csv(tmp_path / "comparisons.csv")
    row = comp[(comp["metric"] == "auprc") & (comp["a_model"] == best["model"]) & (comp["a_init"] == "pretrained")
               & (comp["b_model"] == "timm-tf_efficientnet_lite0")]
    if best["init"] == "pretrained":
        line = (out / "advice.md").read_text().splitlines()[2]
        said = re.search(r"vs the whole network with TL ([+-][0-9.]+) \[([+-][0-9.]+), ([+-][0-9.]+)\]", line)
        assert said and len(row) == 1
        assert [float(x) for x in said.groups()] == pytest.approx(
            [row["difference"].iloc[0], row["ci_low"].iloc[0], row["ci_high"].iloc[0]], abs=6e-4)


@pytest.mark.slow
def test_image_passes_are_counted_from_the_runs(advised):
    out, _ = advised
    seen = sum(pd.read_csv(p)["images_seen"].sum() for p in out.rglob("metrics.csv"))
    per_epoch = max(pd.read_csv(p)["images_seen"].max() for p in out.rglob("metrics.csv"))
    text = (out / "advice.md").read_text()
    said = re.search(r"every run advise made\): ([0-9,]+); the full grid's \(4 candidates that did not fail x 2 seeds "
                     r"x 4 epochs\): ([0-9,]+)", text)
    assert said, text
    assert int(said.group(1).replace(",", "")) == seen
    assert int(said.group(2).replace(",", "")) == 4 * 2 * 4 * per_epoch


@pytest.mark.slow
def test_a_finished_advise_prints_its_advice_again_without_training(advised):
    out, stdout = advised
    before = {p.name for p in (out / ".rtl_jobs").iterdir()}
    again = subprocess.run(advise_cmd(out), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout == stdout
    # Nothing trains: the only jobs started are the failed candidate's, tried again (its cause may be gone).
    for folder in (out / ".rtl_jobs").iterdir():
        if folder.name not in before:
            for record in folder.glob("*.json"):
                r = json.loads(record.read_text())
                assert r["status"] == "failed" and "/cbr_tiny/" in r["run_dir"], r


@pytest.mark.slow
def test_kill_9_during_a_rung_then_the_same_command_gives_the_same_advice(advised, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(advise_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 600
    while not any(len(pd.read_csv(p)) >= 2 for p in out.rglob("metrics.csv") if p.stat().st_size):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # advise, its sweep and the run in it: all at once
    proc.wait()
    invocations = {p.name for p in (out / ".rtl_jobs").iterdir()}
    again = subprocess.run(advise_cmd(out), capture_output=True, text=True, env=ENV, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    # No run of the finished first rung was trained again: the rerun's sweeps never stop at epoch 1.
    for folder in (out / ".rtl_jobs").iterdir():
        if folder.name not in invocations:
            for record in folder.glob("*.json"):
                r = json.loads(record.read_text())
                assert "/cbr_tiny/" in r["run_dir"] or "runtime.stop_after=1" not in r["overrides"], r
    pd.testing.assert_frame_equal(pd.read_csv(out / "advice.csv"), pd.read_csv(advised[0] / "advice.csv"))
    assert (out / "advice.md").read_text().replace(str(out), "DIR") == \
        (advised[0] / "advice.md").read_text().replace(str(advised[0]), "DIR")


def copy_of(advised, tmp_path) -> Path:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(advised[0], out)
    return out


def winner_runs(out: Path) -> list[Path]:
    table = pd.read_csv(out / "advice.csv")
    w = table[table["recommended"]].iloc[0]
    return [p for (tag, init, _), p in sorted(run_dirs(out).items()) if (tag, init) == (w["model"], w["init"])]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["delete", "truncate", "garble"])
def test_a_finished_run_whose_metrics_are_damaged_stops_advise(advised, tmp_path, damage):
    """Ranked without its validation curve, the winner would drop to last and another be advised in silence."""
    out = copy_of(advised, tmp_path)
    before = (out / "advice.md").read_bytes()
    metrics = winner_runs(out)[0] / "metrics.csv"
    if damage == "delete":
        metrics.unlink()
    elif damage == "truncate":
        metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))  # the last epoch lost
    else:
        metrics.write_bytes(b"\x00\xff garbage\n")
    again = subprocess.run(advise_cmd(out), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 2, again.stderr[-2000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("rtl: error: advise cannot judge 1 run(s) whose files are damaged") and \
        str(metrics.parent) in last, last
    assert again.stdout == "" and (out / "advice.md").read_bytes() == before


@pytest.mark.slow
def test_a_damaged_checkpoint_stops_advise_it_does_not_fail_the_candidate(advised, tmp_path):
    out = copy_of(advised, tmp_path)
    before = (out / "advice.csv").read_bytes()
    run = winner_runs(out)[1]
    (run / "results.csv").unlink()  # the run must go on from its last.pt...
    (run / "last.pt").write_bytes(b"not a checkpoint")  # ...which is damaged
    again = subprocess.run(advise_cmd(out), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 2, again.stderr[-2000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("rtl: error: advise cannot judge 1 run(s) whose files are damaged") and \
        "last.pt is damaged" in last, last
    assert (out / "advice.csv").read_bytes() == before  # no advice without that candidate


@pytest.mark.slow
def test_a_term_signal_early_stops_advise_with_143_and_one_line(tmp_path):
    out = tmp_path / "termed"
    proc = subprocess.Popen(advise_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / A.STATE_DIR / "advise.lock").exists():  # composed and checked: now deciding what to train
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith("rtl: error: rtl advise was "), stderr[-1000:]
    assert not (out / "advice.md").exists()
