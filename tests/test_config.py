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


@pytest.mark.slow
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


def test_old_train_keys_for_runtime_settings_still_work():
    assert _train_keys(["train.device=cpu", "+train.threads=1", "train.lr=1", "train.force=true"]) == \
        ["runtime.device=cpu", "+runtime.threads=1", "train.lr=1", "runtime.force=true"]
