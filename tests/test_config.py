"""The config schema: every file of every group composes and validates; defaults live in one place; the run
identity covers what changes results and nothing else."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re

import pytest
from omegaconf import OmegaConf

from rethink_tl import config as C
from rethink_tl import identity as ID
from rethink_tl.cli import _train_keys
from rethink_tl.errors import UserError
from conftest import compose_cfg

CONF = importlib.resources.files("rethink_tl.conf")


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group", ["model", "init", "data", "train", "runtime"])
def test_every_config_file_of_every_group_composes_and_validates(group):
    for option in options(group):
        cfg = compose_cfg([f"{group}={option}"])
        C.validate(cfg)
        schema = OmegaConf.get_type(cfg[group])
        assert dataclasses.is_dataclass(schema), f"{group}/{option}.yaml has no schema"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    C.validate(cfg)
    assert cfg.experiment == experiment


def test_bench_config_composes_and_validates():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        cfg = compose(config_name="bench")
    C.validate(cfg)
    assert cfg.bench.steps == C.BenchConfig.steps and cfg.init.name == "random"


def test_the_papers_protocol_is_the_default():
    cfg = compose_cfg()
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (1e-5, 64, 200)
    assert (cfg.train.lr_factor, cfg.data.image_size, cfg.train.pos_weight) == (0.5, 224, None)


def test_yaml_files_hold_no_second_default():
    """A value in a group's YAML file must differ from its schema's default (else it is a second copy)."""
    for group in ("model", "init", "data", "train", "runtime"):
        for option in options(group):
            raw = OmegaConf.create(CONF.joinpath(group, f"{option}.yaml").read_text())
            schema = OmegaConf.get_type(compose_cfg([f"{group}={option}"])[group])
            defaults = OmegaConf.to_container(OmegaConf.structured(schema), resolve=False, enum_to_str=True)
            for key in raw:
                if key != "defaults":
                    assert defaults[key] != raw[key], f"{group}/{option}.yaml repeats the default of {key}"


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=1", "train.batch_size=1 is out of range: it must be >= 2"),
    ("train.lr=0", "train.lr=0.0 is out of range: it must be > 0"),
    ("train.lr_factor=1", "train.lr_factor=1.0 is out of range: it must be > 0 and < 1"),
    ("data.fraction=0", "data.fraction=0.0 is out of range"),
    ("runtime.device=gpu", "runtime.device=gpu is not a device"),
    ("+data.colour=1", "unknown key data.colour"),
    ("+runtime.thread=2", "unknown key runtime.thread (did you mean runtime.threads?)"),
    ("train.min_lr=nan", "train.min_lr=nan is not a finite number"),
    ("+trian.lr=1", "unknown key trian"),
    ("data.kind=csv", "data.kind=csv cannot change what data=synthetic reads"),
])
def test_validate_names_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        C.validate(compose_cfg([override]))


def test_identity_leaves_out_the_runtime_and_canonicalises():
    base = ID.identity(compose_cfg(["model=dens_f"]))
    assert [k for k in base if k.startswith("runtime.")] == ["runtime.amp"]  # mixed precision changes results
    assert ID.identity(compose_cfg(["model=dens_f", "runtime.device=cpu", "runtime.threads=1", "runtime.compile=true",
                                   "runtime.progress=false", "runtime.eval_batch_size=8", "data.fraction=1"])) == base
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


def test_old_train_keys_for_runtime_settings_still_work():
    assert _train_keys(["train.device=cpu", "+train.threads=1", "train.lr=1", "train.force=true"]) == \
        ["runtime.device=cpu", "+runtime.threads=1", "train.lr=1", "runtime.force=true"]


def test_differences_list_each_changed_key():
    assert ID.differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == ["b: 2 -> 3", "c: (absent) -> null"]
