"""identity.py: what makes two runs the same run, and the names of their folders."""

from __future__ import annotations

import os

from conftest import compose_cfg
from rethink_tl import identity as ID


def test_identity_leaves_out_the_runtime_and_canonicalises():
    base = ID.identity(compose_cfg(["model=dens_f"]))
    assert [k for k in base if k.startswith("runtime.")] == ["runtime.amp"]  # mixed precision changes results
    assert ID.identity(compose_cfg(["model=dens_f", "runtime.device=cpu", "runtime.threads=1", "runtime.stop_after=3",
                                    "runtime.compile=true", "runtime.progress=false", "runtime.eval_batch_size=8",
                                    "data.fraction=1"])) == base
    assert ID.identity(compose_cfg(["model=dens_f", "runtime.amp=bf16"])) != base
    assert ID.identity(compose_cfg(["model=densenet121"]))["model.name"] == "dens_f"
    for override in ("train.lr=1e-3", "train.batch_size=32", "data.image_size=64", "train.rotate_degrees=0",
                     "data.num_samples=100", "init=random"):
        assert ID.identity(compose_cfg(["model=dens_f", override])) != base, override
    # The seed is part of the identity, not of the setting.
    s0, s1 = (ID.identity(compose_cfg([f"train.seed={s}"])) for s in (0, 1))
    assert s0 != s1 and ID.setting_id(s0) == ID.setting_id(s1)


def test_relative_paths_are_made_absolute_in_the_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ident = ID.identity(compose_cfg(["data=csv", "data.csv=images.csv"]))
    assert ident["data.csv"] == str(tmp_path / "images.csv")


def test_run_directories_name_the_setting():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        a = compose(config_name="config", overrides=["data.fraction=1"], return_hydra_config=True)
        b = compose(config_name="config", overrides=["data.fraction=1.0", "train.lr=1e-3"], return_hydra_config=True)
    sid = ID.setting_id(a)
    assert a.hydra.run.dir == f"runs/synthetic/dens_t1/pretrained/f1/s0-{sid}"
    assert b.hydra.run.dir.startswith("runs/synthetic/dens_t1/pretrained/f1/s0-") and b.hydra.run.dir != a.hydra.run.dir


def test_differences_list_each_changed_key():
    assert ID.differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == ["b: 2 -> 3", "c: (absent) -> null"]


def test_setting_id_is_stable_across_machines_and_key_order():
    a = {"train.lr": 1e-3, "model.name": "dens_t1", "train.seed": 0}
    b = {"model.name": "dens_t1", "train.seed": 5, "train.lr": 1e-3}
    assert ID.setting_id(a) == ID.setting_id(b) == ID.digest({"model.name": "dens_t1", "train.lr": 1e-3})
    assert len(ID.setting_id(a)) == 8 and ID.setting_id(a) != ID.setting_id({**a, "train.lr": 1e-2})


def test_process_rank_reads_torchrun_then_slurm(monkeypatch):
    for key in ("RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert ID.process_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert ID.process_rank() == 0  # one task: SLURM's id says nothing about data parallelism
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert ID.process_rank() == 3
    monkeypatch.setenv("RANK", "1")
    assert ID.process_rank() == 1
    assert ID._resolver_rank0_file("x.log") == os.devnull and ID._resolver_rank0("a") is None
