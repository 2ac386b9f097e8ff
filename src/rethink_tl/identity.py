"""What makes two runs "the same run", and the names of their folders.

:func:`identity` is every setting that can change a result, flat and resolved, with the runtime switches
(device, threads, progress bars; everything of ``runtime.*`` but the precision) left out. A run directory
is named after its hash (:func:`setting_id`, the seed excluded so that the seeds of one setting share it),
and a run resumes or is skipped only when its stored identity equals the requested one (rundir.py).

The resolvers registered here are what the run-directory patterns of ``conf/*.yaml`` call:
``${rtl.setting_id:}``, ``${rtl.num:...}``, ``${rtl.basename:...}`` and, for distributed runs, the
``rtl.rank0*`` pair that lets only the first process write Hydra's records.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Data keys that only say how the data is read, not which data: a cache and its threads.
NOT_IDENTITY = {"data.cache", "data.cache_dir", "data.workers", "data.download", "init.download",
                "data.group_columns"}  # kept beside the predictions only: the same training
# Paths name files: written relative, they mean another file from another folder.
PATHS = ("data.csv", "data.root", "data.npz", "init.weights")
GROUPS = ("model", "init", "data", "train", "recipe")  # those a config has: rtl pretrain has no init
# Runtime keys that change the numbers by more than run-to-run noise: mixed precision (bf16 has 8 bits of
# mantissa), so a bf16 run and an fp32 run are different runs. The other runtime keys are not.
RUNTIME_KEYS = ("amp",)
# Keys added to the schema after runs were made: at these defaults they decode every earlier data set as it was
# decoded, so they stay out of the identity there, and the runs made before them keep their setting ids.
# (init.source: unset, ImageNet weights as before; set, chest X-ray weights, a setting of its own.)
LATER_DEFAULTS = {"data.dicom_window": "auto", "data.dicom_frame": None, "init.source": None}


def _flat(prefix: str, node: Any, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = node


def flatten(container: dict) -> dict[str, Any]:
    """A nested plain config as ``{"train.lr": ..., ...}``."""
    out: dict[str, Any] = {}
    for k, v in container.items():
        _flat(str(k), v, out)
    return out


def identity(cfg: DictConfig) -> dict[str, Any]:
    """Every result-affecting setting of a run, flat (``{"train.lr": 1e-05, ...}``), JSON-ready.

    Values are resolved (interpolations filled in) and typed by the schema, so ``data.fraction=1`` and
    ``data.fraction=1.0`` are one setting. Model aliases (``model=densenet121``) set the name of the model
    they stand for in their YAML file, so an alias and its target are one model.
    """
    out: dict[str, Any] = {}
    for group in GROUPS:
        if group not in cfg:
            continue
        node = cfg[group]
        container = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if isinstance(node, DictConfig) \
            else node
        _flat(group, container, out)
    for key in RUNTIME_KEYS:
        if "runtime" in cfg:
            out[f"runtime.{key}"] = str(cfg.runtime[key])
    for key in PATHS:
        if out.get(key):
            out[key] = os.path.abspath(os.path.expanduser(str(out[key])))
    return {k: _plain(v) for k, v in sorted(out.items())
            if k not in NOT_IDENTITY and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple, ListConfig)) else v


def digest(settings: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """A short, stable hash of settings (minus ``skip``): equal settings, equal hash, on any machine."""
    kept = {k: v for k, v in settings.items() if k not in skip}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def setting_id(cfg_or_settings) -> str:
    """The hash of everything but the training seed: the seeds of one setting share it, in their directory
    names and in results.csv, and `rtl report` averages exactly the runs that share it."""
    settings = cfg_or_settings if isinstance(cfg_or_settings, dict) else identity(cfg_or_settings)
    return digest(settings, skip=("train.seed",))


_MISSING = object()


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else json.dumps(v, default=str)


def differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``key: stored -> requested`` for every setting that differs."""
    out = []
    for k in sorted(set(stored) | set(requested)):
        a, b = stored.get(k, LATER_DEFAULTS.get(k, _MISSING)), requested.get(k, LATER_DEFAULTS.get(k, _MISSING))
        if a != b:
            out.append(f"{k}: {_show(a)} -> {_show(b)}")
    return out


# --- processes --------------------------------------------------------------------------------------

def process_rank() -> int:
    """This process's rank in a distributed run: torchrun's RANK, or SLURM's task id when a job has several
    tasks (the SLURM launcher, one task per GPU); 0 otherwise. (Read from the environment alone, so that a
    run-directory pattern can use it before anything else is imported.)"""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_PROCID"):
        return int(os.environ["SLURM_PROCID"])
    return 0


# --- resolvers of the run-directory patterns -------------------------------------------------------------

def _resolver_setting_id(*, _root_: DictConfig) -> str:
    return setting_id(_root_)


def _resolver_num(value: Any) -> str:
    """Numbers in directory names: 1, 1.0 and 1e0 are all written 1."""
    return f"{float(value):g}"


def _resolver_basename(path: Any) -> str:
    """The dataset name of an ImageFolder root: its folder name (/data/imagenet/ -> imagenet)."""
    return os.path.basename(os.path.normpath(str(path))) if path else "imagefolder"


def _resolver_rank0(value: Any) -> Any:
    """``value`` in the first process, null in the others (Hydra then writes no record there)."""
    return value if process_rank() == 0 else None


def _resolver_rank0_file(path: Any) -> str:
    return str(path) if process_rank() == 0 else os.devnull


RESOLVERS = {"rtl.setting_id": _resolver_setting_id, "rtl.num": _resolver_num, "rtl.basename": _resolver_basename,
             "rtl.rank0": _resolver_rank0, "rtl.rank0_file": _resolver_rank0_file}


def register_resolvers() -> None:
    """Make the resolvers available to the config files (idempotent; conf/__init__.py calls it)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=False)


register_resolvers()


def own_unit_if_blank(patients) -> list:
    """Patient ids with each blank one (empty, NaN, None) made an id of its own: an image whose patient is not
    known is its own patient, never one giant patient of every such image."""
    out = [*patients]
    for i, p in enumerate(out):
        if p is None or (isinstance(p, float) and p != p) or not str(p).strip():
            out[i] = f"\0unknown patient, row {i}"  # \0: no id read from a file sorts or looks like it
    return out
