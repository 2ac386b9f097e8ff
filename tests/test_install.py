"""The install fits other environments (issue 23, item 4): torch and torchvision as ranges, so installing rtl
into an environment that already has a supported torch keeps it; make pins this project's builds by constraints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def test_torch_is_a_range_that_holds_the_pinned_builds_and_filelock_is_declared():
    import torch
    import torchvision

    reqs = _requirements()
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name in ("torch", "torchvision"):
        spec = reqs[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned in pyproject.toml: {spec}"
        assert spec.contains(pins[name]), (name, spec, pins[name])
    assert torch.__version__.split("+")[0] == pins["torch"] and torchvision.__version__.split("+")[0] == pins["torchvision"]
    assert "filelock" in reqs  # imported by cli.py and advise.py


@pytest.mark.slow
def test_pip_install_keeps_the_torch_already_there(tmp_path):
    """pip's own resolver, asked to install this project into the test environment (torch 2.14.1 there), would
    install the project alone: no torch or torchvision replaced."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                           "--report", str(report), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert names == ["rethink-tl"], names
