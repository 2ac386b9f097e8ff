"""Shared fixtures: tiny, fast configurations composed from the real Hydra configs."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

# Tests compare values read back from rtl's CSV files with values computed in memory, exactly. pandas 2's default
# float parser can be one ulp off the number written (pandas 3's is not); rtl's own reads ask for round_trip, and
# so do the tests' reads.
_read_csv = pd.read_csv


def _read_csv_exactly(*args, **kwargs):
    kwargs.setdefault("float_precision", "round_trip")
    return _read_csv(*args, **kwargs)


pd.read_csv = _read_csv_exactly

# Tests never reach the network: an empty torch/HF cache per session unless a test sets its own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def own_weights_home(tmp_path_factory, monkeypatch):
    """Weights installed by rtl pretrain go to a folder of each test's own (and its subprocesses'), never the
    user's ~/.cache/rethink_tl/weights: an installed cbr_small would change what init=pretrained loads."""
    monkeypatch.setenv("RTL_WEIGHTS", str(tmp_path_factory.mktemp("weights")))


@pytest.fixture(autouse=True)
def logging_as_it_was():
    """A command run in-process (cli.main) lets Hydra configure logging with handlers on this test's captured
    streams; later tests would log into closed files. Each test leaves the root logger as it found it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


# Data and training settings small enough for a 2-core CPU; TINY adds a small model.
TINY_DATA = [
    "data.image_size=32",
    "data.num_samples=240",
    "data.prevalence=0.3",
    "data.test_prevalence=0.3",
    "train.epochs=3",
    "train.batch_size=16",
    "train.lr=1e-3",
    "runtime.progress=false",
    "runtime.device=cpu",
    "init=random",
]
TINY = ["model=trunc", "model.cut=1", *TINY_DATA]


def compose_cfg(overrides=()):
    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny forwards: they gain nothing from threads, and on a busy 2-core
    box OpenMP spinning makes them crawl. Modules opt in with pytestmark = usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg():
    def make(*extra):
        return compose_cfg(TINY + list(extra))

    return make


def train_tiny(out_dir, *extra):
    """One finished tiny run in ``out_dir`` (about 1 s on a 2-core CPU): results.csv, best.pt and
    predictions.csv.gz, as rtl train writes them. Returns its results row."""
    from rethink_tl.train import run

    return run(compose_cfg(TINY + list(extra)), out_dir)


def _main_here(capsys, args) -> tuple[int, str, str]:
    """``rtl ARGS`` through ``cli.main`` in this process: (exit status, stdout, stderr)."""
    from rethink_tl.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def rtl_here(monkeypatch, capsys):
    """``rtl ARGS`` run in this process, from ``cwd`` with ``env`` added: a CompletedProcess-like result. It
    saves an interpreter start-up (torch, timm: several seconds on a 2-core CPU) per call; a test of the console
    script itself (its start-up, what reaches the terminal, signals) runs it as a subprocess instead."""
    import subprocess

    def call(*args, cwd=None, env=None):
        with monkeypatch.context() as m:
            if cwd is not None:
                m.chdir(cwd)
            for key, value in (env or {}).items():
                m.setenv(key, str(value))
            return subprocess.CompletedProcess(args, *_main_here(capsys, args))

    return call


def fails_in_one_line(capsys, argv) -> str:
    """Run ``rtl ARGV`` in-process; it must exit 2 with exactly one ``rtl: error:`` line on stderr (returned)."""
    code, _, err = _main_here(capsys, argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtl: error: "), lines
    return lines[0]


# The files that take longest on a 2-core CPU (pytest --durations, December 2026), longest first. `make test` runs
# the suite on 2 workers a file at a time (--dist loadfile), handing the next file to whichever worker is free:
# starting the long files first keeps one of them from being the last file left while the other worker idles.
LONGEST_FIRST = ("test_sweep.py", "test_advise.py", "test_pretrain.py", "test_resume.py", "test_sweeps.py",
                 "test_trust.py", "test_slurm.py", "test_tracking.py", "test_data_synthetic.py", "test_train.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
