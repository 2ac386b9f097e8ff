"""The designs of the paper's experiments: which models x inits x fractions a figure draws.

A design is read from ``conf/experiment/<figure>.yaml`` (its ``hydra.sweeper.params``), so the sweep that
makes a figure's runs and the report that draws it agree by construction.
"""

from __future__ import annotations

import importlib.resources
import itertools
from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from ..errors import UserError


@dataclass
class Design:
    """The sweep axes of a paper experiment (conf/experiment/<figure>.yaml, hydra.sweeper.params)."""

    figure: str
    models: list[str]  # model tags, as results.csv names them, in the experiment's order
    inits: list[str]
    fractions: list[float]

    def contains(self, model, init, fraction) -> bool:
        return (model in self.models and init in self.inits and fraction is not None
                and bool(np.isclose(self.fractions, float(fraction)).any()))

    def cells(self) -> list[tuple[str, str, float]]:
        return list(itertools.product(self.models, self.inits, self.fractions))


def _conf_dir():
    return importlib.resources.files("rethink_tl.conf")


def experiments() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _conf_dir().joinpath("experiment").iterdir()
                  if p.name.endswith(".yaml"))


def sweep_values(key: str, value) -> list[str]:
    """The values of one sweeper param as Hydra's sweeper would expand them (lists, ranges, choice)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def _model_tag(name: str) -> str:
    """The tag results.csv records for ``model=name`` (aliases such as densenet121 record dens_f)."""
    path = _conf_dir().joinpath("model", f"{name}.yaml")
    if not path.is_file():
        return name
    cfg = OmegaConf.create(path.read_text())
    return str(cfg.get("tag", name))


def design(figure: str) -> Design:
    path = _conf_dir().joinpath("experiment", f"{figure}.yaml")
    if not path.is_file():
        raise UserError(f"no experiment {figure!r}: choose one of {', '.join(experiments())}")
    params = OmegaConf.select(OmegaConf.create(path.read_text()), "hydra.sweeper.params") or {}
    missing = [k for k in ("model", "init", "data.fraction") if k not in params]
    if missing:
        raise RuntimeError(f"{path} names no sweep values for {', '.join(missing)} under hydra.sweeper.params")
    return Design(figure, [_model_tag(m) for m in sweep_values("model", params["model"])],
                  sweep_values("init", params["init"]),
                  [float(f) for f in sweep_values("data.fraction", params["data.fraction"])])
