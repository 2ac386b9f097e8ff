"""rtl pretrain: the pipeline, the recipe, resume after SIGKILL, skip, install, DDP == one process, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from rethink_tl.bench.folders import make_imagefolder
from rethink_tl.data.imagefolder import EpochBatches, FolderImages, index_folder
from rethink_tl.errors import UserError
from rethink_tl.models import build_model
from rethink_tl.pretrain import make_schedule, param_groups
from rethink_tl.weights import apply_init, read_weights_file

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
RTL = shutil.which("rtl") or str(BIN / "rtl")
# cbr_small's smallest input is 121 px; 138/121 is the recipe's 256/224.
# Crops of at least 35% of the image: a few epochs of small patterns learn faster than with the recipe's 8%.
SMALL = ["model=cbr_small", "data.image_size=121", "data.val_resize=138", "data.min_scale=0.35",
         "recipe.batch_size=16", "recipe.warmup_epochs=1", "runtime.workers=1", "runtime.device=cpu",
         "runtime.progress=false", "runtime.threads=2"]
TIMING = ["seconds", "img_per_s"]


def rtl(*args, cwd, weights, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RTL_WEIGHTS": str(weights)}
    return subprocess.run([RTL, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def wcli(rtl_here):
    """``rtl weights ...`` in this process with ``RTL_WEIGHTS=weights``: a CompletedProcess-like result."""
    def call(weights, *args):
        return rtl_here(*args, env={"RTL_WEIGHTS": weights})

    return call


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtl: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """8 pattern classes, 24 train and 6 val images each, four sizes, JPEG and PNG."""
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder") / "patterns", train_per_class=24,
                            val_per_class=6)


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """One whole pretraining (5 epochs), installed into a weights folder of its own."""
    base = tmp_path_factory.mktemp("pretrained")
    weights = base / "weights"
    out = base / "run"
    proc = rtl("pretrain", *SMALL, "recipe.epochs=5", f"data.root={folder}", f"hydra.run.dir={out}", cwd=base,
               weights=weights)
    assert proc.returncode == 0, proc.stderr
    return out, weights, proc


# --- the pipeline -------------------------------------------------------------------------------------

def test_index_reads_the_imagenet_layout(folder):
    index = index_folder(folder)
    assert len(index.classes) == 8 and index.classes[0] == "00_stripes_h"
    assert len(index.train) == 8 * 24 and len(index.val) == 8 * 6
    assert {Path(p).suffix for p, _ in index.train} == {".JPEG", ".png"}
    assert sorted({c for _, c in index.val}) == list(range(8))
    assert index.fingerprint() == index_folder(folder).fingerprint()


def test_an_item_is_a_function_of_seed_epoch_and_image(folder):
    index = index_folder(folder)
    ds = FolderImages(index.train, 64, train=True, seed=3)
    a, label = ds[(2, 5)]
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8 and label == index.train[5][1]
    before = torch.get_rng_state()
    assert torch.equal(ds[(2, 5)][0], a)  # same key, same crop: whichever worker or process asks
    assert torch.equal(torch.get_rng_state(), before)  # and the process's generator is left alone
    assert not torch.equal(ds[(3, 5)][0], a)  # another epoch, another crop
    val = FolderImages(index.val, 64, train=False, val_resize=73)
    assert torch.equal(val[0][0], val[0][0]) and val[0][0].shape == (3, 64, 64)


def test_two_processes_and_two_forward_passes_train_on_the_same_batches(folder):
    index = index_folder(folder)
    ds = FolderImages(index.train, 32, train=True)
    one = EpochBatches(ds, 8, rank=0, processes=1, accumulate=2, seed=1)
    ranks = [EpochBatches(ds, 8, rank=r, processes=2, accumulate=1, seed=1) for r in (0, 1)]
    for b in (one, *ranks):
        b.set(epoch=4, step=0)
    passes = list(one)
    per_rank = [list(r) for r in ranks]
    assert one.steps_per_epoch() == 192 // 16 == ranks[0].steps_per_epoch()
    assert passes[0::2] == per_rank[0] and passes[1::2] == per_rank[1]
    seen = [i for batch in passes for _, i in batch]
    assert len(seen) == len(set(seen)) == 192  # every image once (192 = 12 global batches of 16)
    one.set(epoch=4, step=5)  # a resumed epoch continues where it stopped
    assert list(one) == passes[10:]


def test_weight_decay_spares_norms_and_biases():
    model = build_model({"name": "cbr_small"}, num_labels=8)
    decay, plain = param_groups(model, 1e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 1e-4 and plain["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        [f"trunk.conv{i}.weight" for i in range(1, 5)] + ["head.weight"])
    assert all(names[id(p)].endswith(("bias", "bn1.weight", "bn2.weight", "bn3.weight", "bn4.weight"))
               for p in plain["params"])


def test_schedule_warms_up_linearly_then_decays_as_a_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = make_schedule(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    import math

    assert lrs[4:] == pytest.approx([0.2 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


# --- a whole pretraining ------------------------------------------------------------------------------

@pytest.mark.slow
def test_pretraining_learns_writes_and_installs(finished):
    out, weights, proc = finished
    hist = pd.read_csv(out / "pretrain.csv")
    assert list(hist.columns) == ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images",
                                  "seconds", "img_per_s"]
    assert hist.epoch.tolist() == [1, 2, 3, 4, 5] and (hist.images == 192).all()
    # 8 classes: chance is 0.125. This setting reached 0.31 to 0.52 in 5 measured runs (this data and two other
    # generated sets x recipe seeds 0 and 1); the threshold is below all of them, twice chance.
    assert hist.val_top1.iloc[-1] >= 0.25, hist
    assert hist.val_loss.iloc[-1] < hist.val_loss.iloc[0]
    assert hist.train_loss.iloc[-1] < hist.train_loss.iloc[0]
    meta = json.loads((out / "weights.json").read_text())
    assert meta["num_classes"] == 8 and meta["epochs"] == 5 and meta["slot"] == "cbr_small"
    assert meta["val_top1"] == pytest.approx(hist.val_top1.iloc[-1])
    assert meta["global_batch"] == 16 and meta["lr"] == pytest.approx(0.1 * 16 / 256)
    assert meta["recipe"]["momentum"] == 0.9 and meta["recipe"]["label_smoothing"] == 0.1
    import hashlib

    assert meta["sha256"] == hashlib.sha256((out / "weights.pth").read_bytes()).hexdigest()
    # strict-loadable into the zoo model it came from
    model = build_model({"name": "cbr_small"}, num_labels=8)
    model.load_state_dict(torch.load(out / "weights.pth", weights_only=True), strict=True)
    installed = weights / "cbr_small"
    assert (installed / "weights.pth").read_bytes() == (out / "weights.pth").read_bytes()
    assert json.loads((installed / "weights.json").read_text())["sha256"] == meta["sha256"]
    listing = rtl("weights", "list", cwd=out, weights=weights)
    assert listing.returncode == 0 and "cbr_small" in listing.stdout and meta["sha256"][:12] in listing.stdout


@pytest.mark.slow
def test_a_finished_pretraining_is_skipped(finished, folder):
    out, weights, _ = finished
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    proc = rtl("pretrain", *SMALL, "recipe.epochs=5", f"data.root={folder}", f"hydra.run.dir={out}", cwd=out,
               weights=weights)
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stdout + proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name in before}
    assert {k: v for k, v in after.items() if not k.endswith(".log")} == \
        {k: v for k, v in before.items() if not k.endswith(".log")}


@pytest.mark.slow
def test_other_settings_in_the_same_folder_are_refused(finished, folder):
    out, weights, _ = finished
    proc = rtl("pretrain", *SMALL, "recipe.epochs=6", f"data.root={folder}", f"hydra.run.dir={out}", cwd=out,
               weights=weights)
    one_line_error(proc, "recipe.epochs: 5 -> 6")


def _start(cmd, cwd, env):
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_rows(out: Path, rows: int, proc) -> None:
    deadline = time.time() + 300
    while not (out / "pretrain.csv").exists() or len(pd.read_csv(out / "pretrain.csv")) < rows:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_and_sigkill_mid_epoch_then_reruns_give_the_same_run(finished, folder, tmp_path):
    """SIGTERM in epoch 2 saves the step; SIGKILL in epoch 4 loses the epoch; each rerun resumes, and the run
    ends with the uninterrupted run's pretrain.csv (timing aside) and a byte-identical weights.pth."""
    reference, _, _ = finished
    out = tmp_path / "stopped"
    env = {**os.environ, "RTL_WEIGHTS": str(tmp_path / "w")}
    cmd = [RTL, "pretrain", *SMALL, "recipe.epochs=5", f"data.root={folder}", f"hydra.run.dir={out}"]
    proc = _start(cmd, tmp_path, env)
    _wait_for_rows(out, 1, proc)
    time.sleep(1.5)  # a few steps into epoch 2 (an epoch is 12 steps, about 3 s)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    step = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert step["epoch"] == 2 and 0 < step["step"] < 12, step
    proc = _start(cmd, tmp_path, env)
    _wait_for_rows(out, 3, proc)
    time.sleep(1.5)  # into epoch 4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(pd.read_csv(out / "pretrain.csv")) == 3 and not (out / "weights.pth").exists()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "at epoch 4 step 0" in again.stdout + again.stderr
    ours, ref = pd.read_csv(out / "pretrain.csv"), pd.read_csv(reference / "pretrain.csv")
    pd.testing.assert_frame_equal(ours.drop(columns=TIMING), ref.drop(columns=TIMING))
    assert (out / "weights.pth").read_bytes() == (reference / "weights.pth").read_bytes()


# --- the weights, used by rtl train -------------------------------------------------------------------

def test_init_pretrained_finds_the_installed_weights(finished, monkeypatch):
    out, weights, _ = finished
    monkeypatch.setenv("RTL_WEIGHTS", str(weights))
    model = build_model({"name": "cbr_small"}, num_labels=3)
    report = apply_init(model, {"name": "pretrained"})
    source = read_weights_file(out / "weights.pth")
    trunk = model.trunk.state_dict()
    assert len(report.loaded) == len(trunk) == len([k for k in source if k.startswith("trunk.")])
    for key, value in trunk.items():
        assert torch.equal(value, source[f"trunk.{key}"]), key
    assert report.source == str(weights / "cbr_small" / "weights.pth")
    assert report.sha256 == json.loads((out / "weights.json").read_text())["sha256"]
    assert report.new == ["head"] and report.strategy == "TL"


@pytest.mark.slow
def test_rtl_train_uses_the_installed_weights_and_records_their_sha256(finished, tmp_path):
    out, weights, _ = finished
    sha = json.loads((out / "weights.json").read_text())["sha256"]
    run = tmp_path / "train"
    proc = rtl("train", "model=cbr_small", "init=pretrained", "data.image_size=121", "data.num_samples=90",
               "data.prevalence=0.3", "data.test_prevalence=0.3", "train.epochs=1", "train.batch_size=16",
               "runtime.device=cpu", "runtime.progress=false", f"hydra.run.dir={run}", cwd=tmp_path, weights=weights)
    assert proc.returncode == 0, proc.stderr
    used = str(weights / "cbr_small" / "weights.pth")
    log = proc.stdout + proc.stderr
    assert f"from {used} (sha256 {sha[:12]})" in log and "val top-1" in log
    row = pd.read_csv(run / "results.csv").iloc[0]
    assert row.weights == used and row.weights_sha256 == sha and row.strategy == "TL"


@pytest.mark.slow
def test_a_finished_train_run_is_not_skipped_once_other_weights_are_installed(finished, tmp_path, wcli):
    out, weights, _ = finished
    home = tmp_path / "home"
    shutil.copytree(weights, home)
    args = ["train", "model=cbr_small", "init=pretrained", "data.image_size=121", "data.num_samples=90",
            "data.prevalence=0.3", "data.test_prevalence=0.3", "train.epochs=1", "train.batch_size=16",
            "runtime.device=cpu", "runtime.progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    assert rtl(*args, cwd=tmp_path, weights=home).returncode == 0
    assert rtl(*args, cwd=tmp_path, weights=home).returncode == 0  # same weights: skipped
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(out / "weights.pth", weights_only=True)
    state["trunk.conv1.weight"] *= 2
    torch.save(state, other / "weights.pth")
    import hashlib

    meta = json.loads((out / "weights.json").read_text())
    meta.update(sha256=hashlib.sha256((other / "weights.pth").read_bytes()).hexdigest(), run_dir=str(other))
    (other / "weights.json").write_text(json.dumps(meta))
    assert wcli(home, "weights", "install", other, "--replace").returncode == 0
    one_line_error(rtl(*args, cwd=tmp_path, weights=home), "installed since", "runtime.force=true")
    shutil.rmtree(home / "cbr_small")
    one_line_error(rtl(*args, cwd=tmp_path, weights=home), "but none are installed for cbr_small")


@pytest.mark.slow
def test_an_occupied_slot_is_replaced_only_on_request(finished, tmp_path, wcli):
    out, weights, _ = finished
    home = tmp_path / "home"
    shutil.copytree(weights, home)
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(out / "weights.pth", weights_only=True)
    state["head.bias"] += 1
    torch.save(state, other / "weights.pth")
    import hashlib

    meta = json.loads((out / "weights.json").read_text())
    meta.update(sha256=hashlib.sha256((other / "weights.pth").read_bytes()).hexdigest(), run_dir=str(other))
    (other / "weights.json").write_text(json.dumps(meta))
    proc = wcli(home, "weights", "install", other)
    one_line_error(proc, "already holds other cbr_small weights", "--replace")
    assert (home / "cbr_small" / "weights.pth").read_bytes() == (out / "weights.pth").read_bytes()
    proc = wcli(home, "weights", "install", other, "--replace")
    assert proc.returncode == 0, proc.stderr
    assert (home / "cbr_small" / "weights.pth").read_bytes() == (other / "weights.pth").read_bytes()
    proc = wcli(home, "weights", "remove", "cbr_small")
    assert proc.returncode == 0 and not (home / "cbr_small").exists()
    one_line_error(wcli(home, "weights", "remove", "cbr_small"), "no weights installed")


# --- many processes -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(folder, tmp_path):
    args = [*SMALL, "recipe.epochs=1", "recipe.warmup_epochs=0", "recipe.batch_size=8", "runtime.workers=0",
            "runtime.threads=1",
            f"data.root={folder}"]
    env = {**os.environ, "RTL_WEIGHTS": str(tmp_path / "w"), "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", RTL, "pretrain", *args,
                           f"hydra.run.dir={two}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    proc = subprocess.run([RTL, "pretrain", *args, "recipe.accumulate=2", f"hydra.run.dir={one}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    a, b = (torch.load(d / "weights.pth", weights_only=True) for d in (two, one))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    ma, mb = (json.loads((d / "weights.json").read_text()) for d in (two, one))
    assert ma["processes"] == 2 and mb["processes"] == 1 and ma["global_batch"] == mb["global_batch"] == 16
    ha, hb = (pd.read_csv(d / "pretrain.csv") for d in (two, one))
    pd.testing.assert_frame_equal(ha.drop(columns=TIMING), hb.drop(columns=TIMING), rtol=1e-5)
    # Only the first process wrote: one Hydra record, one log, no second set of files.
    assert len(list((two / ".hydra").iterdir())) == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(
        [".hydra", ".rtl.lock", "cli.log", "config.yaml", "identity.json", "last.pt", "pretrain.csv",
         "weights.json", "weights.pth"])


# --- bad inputs ---------------------------------------------------------------------------------------

def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("case", ["no_root", "missing", "no_train", "no_val", "classes_differ", "broken_image",
                                  "too_small", "val_resize", "warmup", "batch_type", "unknown_key", "too_few"])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(case, folder, tmp_path, rtl_here):
    root = tmp_path / "data"
    extra: list[str] = []
    expect: tuple[str, ...]
    if case == "no_root":
        root, expect = None, ("data.root is not set",)
    elif case == "missing":
        expect = ("no such folder",)
    elif case == "no_train":
        shutil.rmtree(_copy(folder, root) / "train")
        expect = ("has no train/ folder",)
    elif case == "no_val":
        shutil.rmtree(_copy(folder, root) / "val")
        expect = ("has no val/ folder",)
    elif case == "classes_differ":
        _copy(folder, root)
        (root / "val" / "07_dots").rename(root / "val" / "07_spots")
        expect = ("class folders", "only in train/ (07_dots)", "only in val/ (07_spots)")
    elif case == "broken_image":
        _copy(folder, root)
        bad = root / "train" / "03_checker" / "broken.JPEG"
        bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
        extra, expect = ["recipe.epochs=2"], (f"cannot read image {bad}",)
    elif case == "too_small":
        extra, expect = ["data.image_size=64", "data.val_resize=73"], ("at least 121 px",)
    elif case == "val_resize":
        extra, expect = ["data.val_resize=100"], ("data.val_resize=100 is smaller",)
    elif case == "warmup":
        extra, expect = ["recipe.epochs=2", "recipe.warmup_epochs=2"], ("recipe.warmup_epochs=2",)
    elif case == "batch_type":
        extra, expect = ["recipe.batch_size=abc"], ("recipe.batch_size",)
    elif case == "unknown_key":
        extra, expect = ["+recipe.lr=0.1"], ("unknown key recipe.lr",)
    else:
        extra, expect = ["recipe.batch_size=512"], ("fewer than one global batch",)
    if case not in ("no_train", "no_val", "classes_differ", "broken_image", "missing", "no_root"):
        root = folder
    args = [*SMALL, *extra, f"hydra.run.dir={tmp_path / 'run'}"] + ([f"data.root={root}"] if root else [])
    proc = rtl_here("pretrain", *args, cwd=tmp_path, env={"RTL_WEIGHTS": tmp_path / "w"})
    one_line_error(proc, *expect)
    assert not (tmp_path / "run" / "weights.pth").exists()
    assert not (tmp_path / "w").exists()


def test_cbr_train_without_any_weights_says_how_to_make_them(tmp_path):
    model = build_model({"name": "cbr_tiny"}, num_labels=2)
    with pytest.raises(UserError, match="rtl pretrain model=cbr_tiny"):
        apply_init(model, {"name": "pretrained"})


# --- found by trying to break it ----------------------------------------------------------------------

@pytest.mark.slow
def test_weights_remove_and_check_take_model_names_never_paths(finished, tmp_path, wcli):
    out, weights, _ = finished
    victim = tmp_path / "victim"
    shutil.copytree(out, victim)
    one_line_error(wcli(weights, "weights", "remove", victim), "is not a model name")
    one_line_error(wcli(weights, "weights", "remove", "../weights"), "is not a model name")
    assert (victim / "weights.pth").is_file() and (weights / "cbr_small" / "weights.pth").is_file()
    proc = wcli(weights, "weights", "check", "densenet121,cbr_small")
    assert proc.returncode == 0 and proc.stdout.strip() == "cbr_small" and "TL runs of dens_f skipped" in proc.stderr
    one_line_error(wcli(weights, "weights", "check", ","), "needs model names")


@pytest.mark.slow
def test_install_replace_mends_a_damaged_installed_file(finished, tmp_path, wcli):
    out, weights, _ = finished
    home = tmp_path / "home"
    shutil.copytree(weights, home)
    (home / "cbr_small" / "weights.pth").write_bytes((out / "weights.pth").read_bytes()[:1000])
    one_line_error(wcli(home, "weights", "install", out), "already holds other")
    assert wcli(home, "weights", "install", out, "--replace").returncode == 0
    assert (home / "cbr_small" / "weights.pth").read_bytes() == (out / "weights.pth").read_bytes()
    (home / "cbr_small" / "weights.json").write_text("{}")
    assert "damaged" in wcli(home, "weights", "list").stdout
    assert wcli(home, "weights", "install", out, "--replace").returncode == 0
    assert json.loads((home / "cbr_small" / "weights.json").read_text())["slot"] == "cbr_small"


@pytest.mark.slow
def test_links_to_folders_inside_a_class_are_refused(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    (root / "train" / "00_stripes_h" / "again").symlink_to(".")
    proc = rtl("pretrain", *SMALL, f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
               weights=tmp_path / "w")
    one_line_error(proc, "is a link to a folder inside a class folder")


@pytest.mark.slow
def test_a_finished_run_without_its_weights_file_is_not_skipped(finished, folder, tmp_path):
    out, _, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "weights.pth").unlink()
    proc = rtl("pretrain", *SMALL, "recipe.epochs=5", f"data.root={folder}", f"hydra.run.dir={copy}", cwd=tmp_path,
               weights=tmp_path / "w")
    one_line_error(proc, "weights.pth is missing", "runtime.force=true")


@pytest.mark.slow
def test_a_pretraining_never_shares_a_folder_with_a_train_run(folder, tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "results.csv").write_text("dataset\nx\n")
    proc = rtl("pretrain", *SMALL, "runtime.force=true", f"data.root={folder}", f"hydra.run.dir={run}",
               cwd=tmp_path, weights=tmp_path / "w")
    one_line_error(proc, "holds an rtl train run")


@pytest.mark.slow
def test_a_bad_training_image_keeps_the_steps_before_it(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    bad = sorted((root / "train" / "05_squares").iterdir())[0]
    good = bad.read_bytes()
    bad.write_bytes(b"garbage")
    args = [*SMALL, "recipe.epochs=2", "runtime.install=false", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"]
    one_line_error(rtl("pretrain", *args, cwd=tmp_path, weights=tmp_path / "w"), f"cannot read image {bad}")
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["progress"]
    assert saved["epoch"] == 1 and 0 <= saved["step"] < 12
    bad.write_bytes(good)
    proc = rtl("pretrain", *args, cwd=tmp_path, weights=tmp_path / "w")
    assert proc.returncode == 0 and f"at epoch 1 step {saved['step']}" in proc.stdout + proc.stderr
