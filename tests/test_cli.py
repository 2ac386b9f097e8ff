"""The installed ``rtl`` command, run as a user would: in a subprocess, from an unrelated folder."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import TINY, TINY_DATA

RTL = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")


def rtl(*args, cwd, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([RTL, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.mark.slow
def test_prints_composed_config_from_any_folder(tmp_path):
    proc = rtl("train", "--cfg", "job", "model=dens_t1", "init=pretrained", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: dens_t1" in proc.stdout and "name: pretrained" in proc.stdout and "lr: 1.0e-05" in proc.stdout


@pytest.mark.slow
def test_train_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = rtl("train", *TINY, "train.epochs=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.csv", "results.csv", "best.pt", "last.pt", "identity.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert len(list(out.glob(".hydra/*/config.yaml"))) == 1  # Hydra's record of this invocation
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    # Nothing is written outside the run directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # Running the same command again finds the finished run and does not train it twice.
    before = (out / "results.csv").read_text()
    proc = rtl("train", *TINY, "train.epochs=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0 and (out / "results.csv").read_text() == before


@pytest.mark.slow
def test_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *TINY, "train.epochs=1", "train.seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = rtl("report", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 1 and summary.n[0] == 2
    runs = [pd.read_csv(p) for p in sorted(sweep.rglob("results.csv"))]
    assert summary.test_auprc_mean[0] == pytest.approx((runs[0].test_auprc[0] + runs[1].test_auprc[0]) / 2)
    assert "| synthetic |" in proc.stdout


@pytest.mark.slow
def test_unknown_model(tmp_path):
    proc = rtl("train", "model=dens_t9", cwd=tmp_path)
    assert_user_error(proc, "dens_t9")
    assert "dens_t1" in proc.stderr  # the choices are listed


@pytest.mark.slow
def test_unknown_dataset(tmp_path):
    assert_user_error(rtl("train", "data=imagenet", cwd=tmp_path), "imagenet")


@pytest.mark.slow
def test_image_too_small_for_the_model(tmp_path, rtl_here):
    proc = rtl_here("train", *TINY_DATA, "model=cbr_large_t", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_user_error(proc, "cbr_large_t", "217")


@pytest.mark.slow
def test_missing_weights_offline(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    proc = rtl("train", *TINY_DATA, "model=dens_t1", "init=pretrained", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path,
               env=env)
    assert_user_error(proc, "densenet121-a639ec97.pth", "init.weights")
    assert not (tmp_path / "r" / "results.csv").exists()


@pytest.mark.slow
def test_weights_of_the_wrong_shape(tmp_path, rtl_here):
    import torchvision

    bad = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    proc = rtl_here("train", *TINY_DATA, "model=res_t1", "init=pretrained", f"init.weights={bad}",
                    f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_user_error(proc, "resnet18.pth")


@pytest.mark.slow
def test_unknown_command(tmp_path):
    assert_user_error(rtl("fly", cwd=tmp_path), "unknown command 'fly'")


@pytest.mark.slow
def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = rtl("train", *TINY, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert_user_error(proc, "cannot write", "hydra.run.dir")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_a_failing_setting_does_not_cancel_the_rest_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    # cbr_small refuses 32 px images; trunc runs. The sweep finishes trunc, then reports the failure.
    proc = rtl("train", "-m", *TINY_DATA, "model=cbr_small,trunc", "train.epochs=1", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert_user_error(proc, "1 of 2 run(s) of the sweep did not finish", "at least 121 px")
    assert proc.returncode == 2
    assert len(list(sweep.rglob("results.csv"))) == 1
    (error,) = sweep.rglob("error.txt")
    assert "cbr_small" in error.parent.as_posix() and "121 px" in error.read_text()


# --- defects a tester found (issue 19), each one line and exit 2 (or its own documented status) ---------------

def test_version_and_help_name_every_command(capsys):
    from rethink_tl import __version__
    from rethink_tl.cli import COMMANDS, main

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"rtl {__version__}"
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"rtl {name} " in out for name in COMMANDS)


def test_unknown_model_in_weights_check_is_an_error(capsys):
    from conftest import fails_in_one_line

    line = fails_in_one_line(capsys, ["weights", "check", "cbr_small,nosuchmodel"])
    assert "unknown model 'nosuchmodel'" in line and "cbr_small" in line


def test_weights_check_knows_the_named_truncations(capsys):
    from rethink_tl.cli import main

    main(["weights", "check", "lite0_t2,cbr_small"])  # conf/model/lite0_t2.yaml: trunc, lite0, cut 2
    err = capsys.readouterr().err
    assert "TL runs of trunc-tf_efficientnet_lite0-cut2, cbr_small skipped: no weights installed" in err, err


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    from conftest import fails_in_one_line

    out = tmp_path / "run"
    line = fails_in_one_line(capsys, ["train", *TINY, "train.lr=-1", f"hydra.run.dir={out}"])
    assert "train.lr=-1.0 is out of range" in line
    assert not out.exists()
    # A folder that was there before keeps what it had.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails_in_one_line(capsys, ["train", *TINY, "train.lr=-1", f"hydra.run.dir={out}"])
    assert (out / "notes.txt").read_text() == "mine"


def test_a_value_split_by_the_shell_or_holding_hydra_syntax_gets_the_quoting_hint(tmp_path, capsys):
    from conftest import fails_in_one_line

    run = f"hydra.run.dir={tmp_path / 'run'}"
    # rtl train data.csv=/data/my images.csv: the shell splits the value at its space
    line = fails_in_one_line(capsys, ["train", "model=trunc", "data=csv", "data.csv=/data/my", "images.csv", run])
    assert "'images.csv' is not an override (KEY=VALUE): a value with a space must be quoted" in line
    line = fails_in_one_line(capsys, ["train", "model=trunc", "data=csv", "data.csv=/data/my (1).csv", run])
    assert "must be quoted for Hydra inside the shell's quotes" in line
    assert not (tmp_path / "run").exists()


def test_pretrain_takes_train_key_names_and_names_the_recipe_keys(tmp_path, capsys):
    from conftest import fails_in_one_line
    from rethink_tl.cli import _pretrain_keys

    assert _pretrain_keys(["train.epochs=6", "train.batch_size=32", "train.seed=0", "train.device=cpu"]) == [
        "recipe.epochs=6", "recipe.batch_size=32", "recipe.seed=0", "runtime.device=cpu"]
    assert "recipe.lr_per_256" in fails_in_one_line(capsys, ["pretrain", "train.lr=0.1"])
    assert "recipe.{epochs, batch_size" in fails_in_one_line(capsys, ["pretrain", "train.patience=3"])


def test_pretrain_on_a_file_says_it_is_a_file(tmp_path, capsys):
    from conftest import fails_in_one_line

    f = tmp_path / "hostname"
    f.write_text("x")
    line = fails_in_one_line(capsys, ["pretrain", f"data.root={f}", "runtime.device=cpu",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert f"data.root={f} is a file, not a folder" in line


def test_pretrain_validation_resize_follows_the_image_size():
    from conftest import compose_cfg  # noqa: F401
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        default = compose(config_name="pretrain")
        small = compose(config_name="pretrain", overrides=["data.image_size=32"])
        given = compose(config_name="pretrain", overrides=["data.image_size=32", "data.val_resize=48"])
    assert (default.data.image_size, default.data.val_resize) == (224, 256)  # the recipe's 224 / 256
    assert small.data.val_resize == 37  # round(32 * 256 / 224): the same share of the image as at 224
    assert given.data.val_resize == 48


def test_report_of_a_tree_with_unfinished_runs_exits_3_after_writing_the_tables(tmp_path, capsys):
    from conftest import train_tiny
    from rethink_tl.cli import EXIT_INCOMPLETE, main

    sweep = tmp_path / "sweep"
    train_tiny(sweep / "s0", "train.epochs=1")
    train_tiny(sweep / "s1", "train.epochs=1", "train.seed=1")
    (sweep / "s1" / "results.csv").unlink()  # stopped before its end: metrics.csv and last.pt stay
    with pytest.raises(SystemExit) as exc:
        main(["report", str(sweep), "--resamples", "0"])
    assert exc.value.code == EXIT_INCOMPLETE == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not every run below" in err[0] and "1 unfinished run(s) (s1)" in err[0]
    assert len(pd.read_csv(sweep / "summary.csv")) == 1


def test_an_unwritable_out_names_out_not_hydra(tmp_path, monkeypatch):
    import tempfile

    import numpy as np
    from PIL import Image

    from conftest import train_tiny
    from rethink_tl.errors import UserError
    from rethink_tl.inference.explain import explain
    from rethink_tl.inference.predict import predict_to_file

    train_tiny(tmp_path / "run", "train.epochs=1")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(images / "a.png")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    for write in (lambda: predict_to_file(str(tmp_path / "run"), str(images), str(tmp_path / "p.csv")),
                  lambda: explain(tmp_path / "run", n=1, out=tmp_path / "maps")):
        with pytest.raises(UserError) as err:
            write()
        assert "choose a writable output folder (--out)" in str(err.value) and "hydra" not in str(err.value)
