"""``rtl evaluate``: external validation, a finished run's best checkpoint scored on another dataset.

    rtl evaluate runs/covid/dens_t1/pretrained/f1/s0-1a2b3c4d data=csv data.csv=/data/other_hospital.csv \
        --map opacity=Opacity

The overrides choose the external data (the ``data`` group only). Its images are decoded as the run decoded
its own: the run's image size always; its resize, 16-bit rescale and channels unless the overrides set them
(a run with ``data.channels=auto`` passes on what auto resolved to for its training images, see predict.py).
Every image of the external dataset is scored (``--split all``: it is unseen), or its test split only.

Labels are matched by name, ``--map MODEL_LABEL=DATA_LABEL`` pairing differently named ones. The results go
to ``RUN_DIR/external/<name>/``: results.csv (one row, metrics under the model's label names),
predictions.csv.gz (split ``external``) and external.json (what was evaluated, and how). external.json marks
the folder as results of the run rather than a run of its own (``results.run_dirs``), so ``rtl report`` does
not take it for one. RUN_DIR may be a sweep folder: every finished run below it is evaluated, the external
data built once per distinct data config.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from .. import __version__, atomic_io, runfiles as rf
from ..config import validate
from ..data import build_data, dataset, dataset_labels, same_images, trained_channels
from ..errors import UserError
from ..evidence.predictions import SplitPredictions, write as write_predictions
from ..evidence.results import run_dirs
from ..identity import differences
from ..metrics import SingleClassWarning, score
from .finished import finished_below, infer, load_run
from .predict import pick_device

EXTERNAL_DIR = rf.EXTERNAL_DIR
SPLIT_NAME = "external"  # the split name in predictions.csv.gz


# --- the external data -------------------------------------------------------------------------------

def parse_overrides(overrides: list[str]) -> set[str]:
    """The keys the overrides set; UserError for anything but one value of a ``data`` key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if o.package is not None or not (key == "data" or key.startswith("data.")):
            raise UserError(f"{o.input_line}: rtl evaluate takes overrides of the data group only (data=..., "
                            "data.KEY=...): the model, its training and its image size are the run's")
        if o.is_sweep_override():
            raise UserError(f"{o.input_line}: one value per key (evaluate each dataset with its own --name)")
        keys.add(key)
    return keys


def compose_data(overrides: list[str]) -> DictConfig:
    """The ``data`` config the overrides give, checked as rtl train checks it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg.data


def data_for_run(data: DictConfig, given: set[str], run_data: DictConfig,
                 channels_of: dict[str, Optional[int]]) -> tuple[DictConfig, list[str]]:
    """The external data config for one run: the run's image size, the whole dataset, and the run's decoding
    where the overrides do not set it. Returns it with notes for the user."""
    size = int(run_data.image_size)
    if "data.image_size" in given and int(data.image_size) != size:
        raise UserError(f"data.image_size={data.image_size}, but the run was trained at {size} px: a model is "
                        "evaluated at the size it was trained at; leave data.image_size out")
    if "data.fraction" in given and float(data.fraction) != 1.0:
        raise UserError(f"data.fraction={data.fraction}: an external dataset is scored whole (choose its images "
                        "with --split, or with the dataset's own settings)")
    d = copy.deepcopy(data)
    d.image_size = size
    d.fraction = 1.0
    notes = []
    for key in ("resize", "rescale16", "dicom_window", "dicom_frame"):
        if key in d and key in run_data and f"data.{key}" not in given:
            d[key] = run_data[key]
    if "channels" in d and "data.channels" not in given:
        memo = json.dumps(OmegaConf.to_container(run_data, resolve=True), sort_keys=True, default=str)
        if memo not in channels_of:
            channels_of[memo] = trained_channels(run_data)
        trained = channels_of[memo]
        if trained is None:
            notes.append("the run trained with data.channels=auto and its training images cannot be read to tell "
                         f"whether it saw grey or colour: the external images are decoded with data.channels="
                         f"{d.channels}; set data.channels=1 or 3 to decode them as the run did")
        else:
            d.channels = str(trained)
    return d, notes


def check_other_data(run_data: DictConfig, data: DictConfig) -> None:
    """Refuse to call a run's own dataset external (the synthetic data with the run's seed, the run's CSV)."""
    if same_images(run_data, data):
        entry = dataset(data)
        same = ", ".join(f"data.{k}={data.get(k)}" for k in entry.source_keys)
        raise UserError(f"data={data.kind} with {same} is the dataset the run was trained and tested on, so its "
                        "scores would not be external: name other data (e.g. data=csv data.csv=OTHER.csv, or "
                        "other settings of the same kind)")


def plain(data: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(data, resolve=True)  # type: ignore[return-value]


# --- labels ------------------------------------------------------------------------------------------

def parse_map(items: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        model, sep, data = item.partition("=")
        model, data = model.strip(), data.strip()
        if not sep or not model or not data:
            raise UserError(f"--map {item}: write --map MODEL_LABEL=DATA_LABEL, e.g. --map opacity=Opacity")
        if model in mapping and mapping[model] != data:
            raise UserError(f"--map maps {model} twice ({mapping[model]}, {data})")
        mapping[model] = data
    return mapping


@dataclass
class LabelMatch:
    model: list[str]  # the model's labels that are scored, in the model's order
    data: list[str]  # the data label each is scored against
    missing: list[str]  # model labels the data lacks
    unused: list[str]  # data labels no model label is scored against

    def describe(self, dataset: str) -> str:
        pairs = ", ".join(m if m == d else f"{m}={d}" for m, d in zip(self.model, self.data))
        text = f"labels scored: {pairs}"
        if self.missing:
            text += f"; not in {dataset}: {', '.join(self.missing)}; skipped"
        if self.unused:
            text += f"; {dataset} labels the model lacks: {', '.join(self.unused)} (not scored)"
        return text


def match_labels(model_labels: list[str], data_labels: list[str], mapping: dict[str, str],
                 dataset: str) -> LabelMatch:
    for m, d in mapping.items():
        if m not in model_labels:
            raise UserError(f"--map {m}={d}: the model has no label {m!r} (its labels: {', '.join(model_labels)})")
        if d not in data_labels:
            raise UserError(f"--map {m}={d}: {dataset} has no label {d!r} (its labels: {', '.join(data_labels)})")
    pairs = [(m, mapping.get(m, m)) for m in model_labels]
    scored = [(m, d) for m, d in pairs if d in data_labels]
    if not scored:
        raise UserError(f"no label of the model ({', '.join(model_labels)}) is among the labels of {dataset} "
                        f"({', '.join(data_labels)}): pair them with --map MODEL_LABEL=DATA_LABEL, e.g. "
                        f"--map {model_labels[0]}={data_labels[0]}")
    used = {d for _, d in scored}
    return LabelMatch([m for m, _ in scored], [d for _, d in scored], [m for m, d in pairs if d not in data_labels],
                      [d for d in data_labels if d not in used])


# --- where the results go ----------------------------------------------------------------------------

def check_name(name: str) -> str:
    if not name.strip() or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise UserError(f"--name {name!r} cannot name a folder of RUN_DIR/external/: use letters, digits, '_', '-' "
                        "and '.' (no '/', no '..')")
    return name


def _flat(node: Any, prefix: str = "data") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def check_replace(out_dir: Path, data: dict[str, Any], split: str, force: bool,
                  label_map: dict[str, str] | None = None) -> None:
    """Evaluating again with the same data replaces the results; other data under the same name needs --force."""
    if force or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    again = "choose another --name, or pass --force to replace it"
    try:
        stored = json.loads((out_dir / rf.EXTERNAL_MARK).read_text())
    except (OSError, ValueError):
        raise UserError(f"{out_dir} holds files but no readable {rf.EXTERNAL_MARK}: {again}") from None
    diff = differences(_flat(stored.get("data")), _flat(data))
    if stored.get("split") != split:
        diff.append(f"--split: {stored.get('split')} -> {split}")
    if label_map is not None and stored.get("label_map") != label_map:
        diff.append(f"labels scored: {stored.get('label_map')} -> {label_map}")
    if diff:
        shown = "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
        raise UserError(f"{out_dir} holds an evaluation on other data ({shown}): {again}")


# --- scoring -----------------------------------------------------------------------------------------

def scored_parts(bundle, split: str) -> list:
    """The splits whose images are scored: all three (``all``: an external set is unseen) or the test split."""
    return [bundle.test] if split == "test" else list(bundle.splits().values())


@dataclass
class Planned:
    """One run's evaluation, checked before any image is decoded."""

    path: Path
    data: DictConfig  # the external data config for this run
    key: str  # that config as JSON: runs with equal keys share one built dataset
    data_labels: list[str]
    match: LabelMatch
    notes: list[str]


def evaluate_run(run, bundle, plan: Planned, *, name: str, split: str, device: torch.device,
                 argv: list[str]) -> tuple[dict[str, Any], Path, list[str]]:
    """Score one run on the external data, write RUN_DIR/external/<name>/; (results row, folder, notes)."""
    if bundle.label_names != plan.data_labels:
        raise RuntimeError(f"dataset gave labels {bundle.label_names}, its config promised {plan.data_labels}")
    parts = scored_parts(bundle, split)
    m_idx = [run.labels.index(m) for m in plan.match.model]
    d_idx = [bundle.label_names.index(d) for d in plan.match.data]
    model = run.model.to(device)
    # Split by split: concatenating the images first would hold a second copy of the dataset in memory.
    probs = np.concatenate([infer(model, p.images) for p in parts])[:, m_idx]
    labels = np.concatenate([p.labels.numpy() for p in parts])[:, d_idx]
    mask = np.concatenate([p.mask.numpy() for p in parts])[:, d_idx]
    ids = [i for p in parts for i in p.ids]
    patients = [x for p in parts for x in p.patients] if all(p.patients is not None for p in parts) else None
    names = [set(p.groups or {}) for p in parts]
    groups = {g: [x for p in parts for x in p.groups[g]] for g in sorted(set.intersection(*names))} if names else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingleClassWarning)  # said below, once, in the run's line
        scores = score(labels, probs, plan.match.model, mask=mask, split=SPLIT_NAME)
    if all(np.isnan(v) for v in scores.per_label["auroc"].values()):
        raise UserError(f"no label scored on {name} has both positive and negative images "
                        f"({', '.join(f'{m}={d}' for m, d in zip(plan.match.model, plan.match.data))}): there is "
                        "nothing to validate; check --map and the dataset's labels")
    notes = list(plan.notes)
    for j, label in enumerate(plan.match.model):
        y = labels[mask[:, j], j]
        pos = int(y.sum())
        if pos == 0 or pos == len(y):
            notes.append(f"label {label} has {pos} positive(s) among the {len(y)} scored images of {name}: its "
                         "AUROC/AUPRC are NaN and left out of the macro mean")
    fingerprint = bundle.fingerprint()
    if fingerprint == str(run.row.get("data_fingerprint")):
        notes.append(f"{name} is the data this run was trained on (same data fingerprint {fingerprint}): "
                     "these scores are not external")
    row: dict[str, Any] = {k: run.row.get(k) for k in ("model", "init", "strategy", "fraction", "seed",
                                                       "setting_id", "params")}
    row = {"dataset": name, **row, "trained_on": run.row["dataset"], "split": split, "n_test": len(ids)}
    row.update(scores.flat("test"))
    row.update({
        "labels_missing": ";".join(plan.match.missing),
        "label_map": ";".join(f"{m}={d}" for m, d in zip(plan.match.model, plan.match.data)),
        "data_fingerprint": fingerprint, "best_epoch": run.best_epoch, "source_run": str(run.path),
        # When the source run finished: rtl report leaves these results out if the run has been trained again.
        "source_finished": run.row.get("finished"),
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rethink_tl": __version__,
    })
    record = {
        "source_run": str(Path(run.path).resolve()), "run": run.name, "setting_id": run.row.get("setting_id"),
        "best_epoch": run.best_epoch, "data": plain(plan.data), "split": split,
        "label_map": dict(zip(plan.match.model, plan.match.data)), "labels_missing": plan.match.missing,
        "data_labels_unused": plan.match.unused, "n_images": len(ids), "data_fingerprint": fingerprint,
        "evaluated": row["evaluated"], "rethink_tl": __version__, "command": ["rtl", "evaluate", *argv],
    }
    out = Path(run.path) / EXTERNAL_DIR / name
    # The mark first: a folder holding a results.csv without it would look like a run to rtl report; an old
    # results.csv goes before anything else is replaced, so results.csv is never older than its neighbours.
    (out / rf.RESULTS).unlink(missing_ok=True)
    atomic_io.write_json(record, out / rf.EXTERNAL_MARK)
    kept = SplitPredictions(ids, patients, labels, mask, probs.astype(np.float32), groups or None)
    write_predictions(out / rf.PREDICTIONS, {SPLIT_NAME: kept}, plan.match.model)
    atomic_io.write_csv(pd.DataFrame([row]), out / rf.RESULTS)
    return row, out, notes


def runs_below(root: str) -> list[Path]:
    """The finished runs to evaluate; the reason when there are none (an unfinished run, an empty folder)."""
    path = Path(root)
    runs = finished_below(path)
    if runs:
        return runs
    if any((path / f).exists() for f in (rf.RESULTS, rf.IDENTITY, rf.BEST, rf.CONFIG)):
        load_run(path)  # raises what is wrong with this run
    raise UserError(f"no finished rtl train run ({rf.RESULTS} and {rf.BEST}) at or below {root}")


def plan_evaluations(paths: list[Path], base: DictConfig, given: set[str], mapping: dict[str, str], name: str,
                     split: str, force: bool) -> list[Planned]:
    """Every run's evaluation, checked before any is made: a bad --map or a name taken by other data stops a
    sweep before its first image is decoded."""
    plans: list[Planned] = []
    channels_of: dict[str, Optional[int]] = {}
    labels_of: dict[str, list[str]] = {}  # the external labels per data config, read from its tables only
    for path in paths:
        run = load_run(path, model=False)  # each model is loaded when its turn comes: a sweep holds one at a time
        data, notes = data_for_run(base, given, run.cfg.data, channels_of)
        check_other_data(run.cfg.data, data)
        key = json.dumps(plain(data), sort_keys=True, default=str)
        if key not in labels_of:
            labels_of[key] = dataset_labels(data)
        match = match_labels(run.labels, labels_of[key], mapping, name)
        check_replace(path / EXTERNAL_DIR / name, plain(data), split, force, dict(zip(match.model, match.data)))
        plans.append(Planned(path, data, key, labels_of[key], match, notes))
    return plans


def evaluate_runs(run_dir: str, overrides: list[str], *, label_map: list[str], name: Optional[str] = None,
                  split: str = "all", force: bool = False, device: str = "auto", argv: list[str]) -> None:
    """``rtl evaluate``: every finished run at or below ``run_dir`` scored on the data ``overrides`` give;
    ``argv`` is the command line, recorded in each external.json."""
    if name is not None:
        check_name(name)
    mapping = parse_map(label_map)
    given = parse_overrides(overrides)
    where = pick_device(device)
    paths = runs_below(run_dir)
    if not overrides:
        raise UserError("rtl evaluate needs the external data: give data overrides, e.g. rtl evaluate RUN_DIR data=csv "
                        "data.csv=/data/other_hospital.csv")
    base = compose_data(overrides)
    name = check_name(name if name is not None else str(base.name))
    plans = plan_evaluations(paths, base, given, mapping, name, split, force)
    skipped = [p for p in run_dirs(Path(run_dir)) if (p / rf.RESULTS).is_file() and p not in paths]
    if skipped:
        print(f"skipped {len(skipped)} finished run(s) without {rf.BEST}: {', '.join(map(str, skipped[:3]))}"
              + (", ..." if len(skipped) > 3 else ""), file=sys.stderr)
    said: set[str] = set()
    for key in dict.fromkeys(p.key for p in plans):  # one dataset at a time, freed when done
        group = [p for p in plans if p.key == key]
        bundle = build_data(group[0].data)
        for plan in group:
            row, out, notes = evaluate_run(load_run(plan.path), bundle, plan, name=name, split=split, device=where,
                                           argv=argv)
            for line in [plan.match.describe(name), *notes]:
                if line not in said:
                    said.add(line)
                    print(line)
            print(f"{plan.path}: {name} ({split}, {row['n_test']} images) AUROC {row['test_auroc']:.4f} "
                  f"AUPRC {row['test_auprc']:.4f} -> {out}")
        del bundle
    if len(plans) > 1:
        print(f"{len(plans)} runs evaluated on {name}: results in <run>/{EXTERNAL_DIR}/{name}/")
