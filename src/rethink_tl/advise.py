"""``rtl advise``: does ImageNet init help on these images, and how much of the pretrained network to keep, for
a fraction of the grid's cost.

Every candidate (a model, or a timm backbone cut after a stage, or whole) with every init of ``advise.inits``
is trained with ``advise.seeds`` seeds by synchronous successive halving (Jamieson & Talwalkar 2016) on
validation macro AUPRC: rungs at r, r*eta, r*eta^2, ... epochs and ``train.epochs`` last; at each rung the best
1/eta of the candidates (at least one) by the mean over seeds of the best validation AUPRC so far go on, the
others stop there. Test metrics are never read to choose.

Why not Optuna's SuccessiveHalvingPruner: it prunes trials asynchronously, each against the trials that reached
a rung before it, so which candidates survive depends on the order they run in, and it draws its candidates from
a sampler. Here the candidates are a fixed set, all known before the first epoch, and the seeds of one candidate
must be judged together; a rung is a synchronous decision over all of them, which is a few lines of its own.

Every run is an ordinary ``rtl train`` run: the same directory, with the same settings (``train.epochs`` is
the full budget), as ``rtl train`` would make. A candidate stops at a rung with ``runtime.stop_after`` (not part
of a run's identity; last.pt is kept) and goes on by resuming. So ``rtl report``, the figure targets and
``rtl train`` itself reuse advise's runs, and advise reuses theirs. The rungs run as Hydra sweeps of
``rtl train -m`` with the user's launcher (joblib, SLURM). Nothing but the run directories holds state: a rerun
(after kill -9, or of a finished advise) reads each run's metrics.csv, trains only what a rung still lacks and
makes every decision again from the same numbers.

The winner's test AUPRC and its comparisons with the whole network (TL) and with the other init use
``rtl report``'s machinery (evidence.compare: paired bootstrap over the test patients or images, DeLong for
AUROC); advise trains those reference arms to the full budget too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from . import atomic_io, runfiles as rf
from .config import validate
from .errors import UserError
from .evidence.stats import MAX_RESAMPLES
from .identity import setting_id

# The paper's DenseNet ladder (Dens-T1/T2/T3 and the whole DenseNet121).
LADDER = ["dens_t1", "dens_t2", "dens_t3", "dens_f"]
INITS = ["pretrained", "random"]  # the default advise.inits; every winner is compared with both
WHOLE = "whole"
DEFAULT_DIR = "advise"
STATE_DIR = ".rtl_advise"  # under the advise folder: the generated candidate configs and the lock
GROUP = "advise_run"  # the config group of the generated options (one per candidate and seed)
ADVICE_MD, ADVICE_CSV, ADVICE_PNG = "advice.md", "advice.csv", "advice.png"
# Every init advise.inits may name (a conf/init option): xrv is torchxrayvision's chest X-ray DenseNet121 weights.
INIT_WORDS = {"pretrained": "ImageNet init", "random": "random init", "xrv": "chest X-ray init (torchxrayvision)"}
LOCK_WAIT = 300  # seconds to wait for a run's lock held by a sweep that is saving and stopping (a killed advise's)

USAGE = """usage: rtl advise [OVERRIDES]

Which candidate to keep, and whether ImageNet init helps, by successive halving on validation AUPRC. The
overrides are rtl train's (data.*, train.*, runtime.*, hydra/launcher=..., hydra.sweep.dir=DIR; default
advise/), plus:
  advise.models=[dens_t1,dens_t2,dens_t3,dens_f]   zoo models (default: the paper's DenseNet ladder), or
  advise.backbone=NAME advise.cuts=[1,2,whole]      a timm backbone cut after each stage (default: every stage
                                                    and the whole network)
  advise.inits=[pretrained,random]  (or with xrv: chest X-ray weights, DenseNet121 models only)
  advise.seeds=3  advise.eta=3  advise.min_epochs=N (the first rung; default
  train.epochs / eta^ceil(log_eta(candidates)), rounded up)  advise.resamples=2000 (bootstrap of the test comparisons)
Writes DIR/advice.md, advice.csv, advice.png; the runs are ordinary rtl train runs under DIR. Run the same
command again to continue after an interruption, or to print a finished advice again without training."""


# --- the options ----------------------------------------------------------------------------------------

@dataclass
class AdviseOptions:
    models: Optional[list[str]] = None
    backbone: Optional[str] = None
    cuts: Optional[list[Any]] = None
    inits: list[str] = field(default_factory=lambda: list(INITS))
    seeds: int = 3
    eta: int = 3
    min_epochs: Optional[int] = None
    resamples: int = 2000


# rtl train keys that advise sets itself, one value per candidate and seed.
OWNED = {"model": "advise.models or advise.backbone", "init": "advise.inits", "train.seed": "advise.seeds"}


def _as_list(key: str, value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int)):
        return [value]
    raise UserError(f"{key} must be a list, e.g. {key}=[a,b], got {value!r}")


def _as_int(key: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise UserError(f"{key}={value} is out of range: it must be >= {low}"
                        + (f" and <= {high:,}" if high is not None else ""))
    return value


def parse(argv: list[str]) -> tuple[AdviseOptions, list[str]]:
    """advise.* overrides -> AdviseOptions; the others stay rtl train overrides (refused where advise sets them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise UserError(f"rtl advise takes key=value overrides, not {flags[0]}: it runs its own sweeps (rtl advise "
                        "--help)")
    opts, rest = AdviseOptions(), []
    known = list(AdviseOptions.__dataclass_fields__)
    for o in OverridesParser.create().parse_overrides(argv):
        key = o.get_key_element().lstrip("+~")
        if not key.startswith("advise."):
            _check_train_override(o, key)
            rest.append(o.input_line)
            continue
        name = key.split(".", 1)[1]
        if name not in known:
            raise UserError(f"unknown key {key}; advise keys are: {', '.join('advise.' + k for k in known)}")
        if o.is_sweep_override():
            raise UserError(f"{o.input_line}: give one value (rtl advise runs its own sweeps); a list is written "
                            f"in brackets, e.g. {key}=[1,2]")
        value = o.value()
        if name in ("models", "cuts", "inits"):
            value = _as_list(key, value)
        elif name in ("seeds", "eta", "min_epochs", "resamples"):
            # The test comparisons are the advice's evidence: rtl report's bootstrap needs 100 resamples or more.
            low, high = {"seeds": (1, None), "eta": (2, None), "min_epochs": (1, None),
                         "resamples": (100, MAX_RESAMPLES)}[name]
            value = None if value is None and name == "min_epochs" else _as_int(key, value, low, high)
        elif value is not None and not isinstance(value, str):
            raise UserError(f"{key} must be a name, got {value!r}")
        setattr(opts, name, value)
    return opts, rest


def _check_train_override(o, key: str) -> None:
    if o.is_sweep_override():
        raise UserError(f"{o.input_line}: rtl advise runs its own sweeps; give one value per key (the candidates "
                        "are advise.models or advise.backbone with advise.cuts)")
    for owned, instead in OWNED.items():
        if key == owned or (owned in ("model", "init") and key.startswith(owned + ".") and key != "init.download"):
            raise UserError(f"{o.input_line}: rtl advise sets {owned} itself for every candidate: use {instead}")
    if key == "runtime.stop_after":
        raise UserError(f"{o.input_line}: rtl advise pauses its runs at each rung itself (advise.min_epochs, "
                        "advise.eta)")
    if key.startswith("hydra.searchpath"):
        raise UserError(f"{o.input_line}: rtl advise sets hydra.searchpath itself (its candidates' configs)")


# --- the candidates --------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One model (with the model keys that make it) and one init."""

    model_group: str  # conf/model/<model_group>.yaml
    model_keys: dict[str, Any]
    init: str
    tag: str = ""  # results.csv's model (model.tag), filled in when composed
    label: str = ""
    given: str = ""  # how the user named it: the advise.models name or the advise.cuts value

    def key(self) -> tuple[str, str]:
        return self.tag, self.init


def _model_files() -> list[str]:
    import importlib.resources

    folder = importlib.resources.files("rethink_tl").joinpath("conf", "model")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _architectures(opts: AdviseOptions) -> list[tuple[str, dict[str, Any], str]]:
    """(model config, model keys, the name the user gave) of every candidate architecture."""
    from .models import canonical_name

    if opts.backbone is not None and opts.models is not None:
        raise UserError("give advise.models (zoo models) or advise.backbone (a timm backbone with advise.cuts), "
                        "not both")
    if opts.backbone is None:
        if opts.cuts is not None:
            raise UserError("advise.cuts applies to advise.backbone=NAME only")
        models = list(LADDER if opts.models is None else opts.models)
        files = _model_files()
        for name in models:
            if name in ("timm", "trunc"):
                raise UserError(f"advise.models: {name} needs a backbone: use advise.backbone=NAME (with advise.cuts)")
            if name not in files:
                canonical_name(str(name))  # an unknown model: its close names
                raise UserError(f"advise.models: {name} has no config (conf/model/{name}.yaml); models: "
                                f"{', '.join(f for f in files if f not in ('timm', 'trunc'))}")
        _no_repeats("advise.models", models)
        return [(str(m), {}, f"advise.models {m}") for m in models]
    stages = _stages(str(opts.backbone))
    cuts = list(range(stages)) + [WHOLE] if opts.cuts is None else opts.cuts
    out = []
    for cut in cuts:
        if cut in (WHOLE, "full"):
            out.append(("timm", {"backbone": opts.backbone}, f"advise.cuts {cut}"))
        elif isinstance(cut, int) and not isinstance(cut, bool) and 0 <= cut < stages:
            out.append(("trunc", {"backbone": opts.backbone, "cut": cut}, f"advise.cuts {cut}"))
        else:
            raise UserError(f"advise.cuts: {cut!r} is not a cut of {opts.backbone}: use stage numbers 0..{stages - 1} "
                            f"and {WHOLE} (the whole network)")
    _no_repeats("advise.cuts", [str(c) for c in cuts])
    return out


def _no_repeats(key: str, values: list) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise UserError(f"{key} names {seen[0]} twice")


def _stages(backbone: str) -> int:
    """The feature stages of a timm backbone (UserError for an unknown one, with close names)."""
    from .models.truncated import timm_backbone

    trunk = timm_backbone(OmegaConf.create({"backbone": backbone}))
    info = getattr(trunk, "feature_info", None)
    if not hasattr(trunk, "prune_intermediate_layers") or not isinstance(info, list):
        raise UserError(f"timm backbone {backbone!r} cannot be cut at its stages; use advise.models instead")
    return len(info)


def candidates(opts: AdviseOptions) -> list[Candidate]:
    inits = [str(i) for i in opts.inits]
    for init in inits:
        if init not in INIT_WORDS:
            raise UserError(f"advise.inits: unknown init {init!r}; inits are: {', '.join(INIT_WORDS)}")
    _no_repeats("advise.inits", inits)
    out = [Candidate(group, keys, init, given=given) for group, keys, given in _architectures(opts) for init in inits]
    if len(out) < 2:
        raise UserError(f"rtl advise needs at least two candidates to choose from, got {len(out)}: give more "
                        "advise.models or advise.cuts, or both inits (advise.inits=[pretrained,random])")
    return out


# --- the rungs -------------------------------------------------------------------------------------------

def rungs(n: int, eta: int, epochs: int, min_epochs: Optional[int]) -> list[int]:
    """r, r*eta, r*eta^2, ... below ``epochs``, then ``epochs``. Default r: epochs / eta^ceil(log_eta n) rounded up,
    so that halving n candidates by eta at each rung leaves about one for the last."""
    if min_epochs is None:
        halvings = max(1, math.ceil(math.log(n) / math.log(eta) - 1e-9))
        min_epochs = max(1, -(-epochs // eta ** halvings))
    if min_epochs > epochs:
        raise UserError(f"train.epochs={epochs} is smaller than the first rung advise.min_epochs={min_epochs}: "
                        "lower advise.min_epochs or raise train.epochs")
    out, r = [], min_epochs
    while r < epochs:
        out.append(r)
        r *= eta
    return out + [epochs]


def keep(n: int, eta: int) -> int:
    return max(1, n // eta)


# --- composing the runs -------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    candidate: int  # index into the arms
    seed: int
    option: str  # the advise_run option that makes it
    path: Path  # its run directory
    setting_id: str


def _option_yaml(c: Candidate, seed: int) -> str:
    body = {"defaults": [{"override /model": c.model_group}, {"override /init": c.init}],
            **({"model": c.model_keys} if c.model_keys else {}), "train": {"seed": seed}}
    return ("# @package _global_\n# Written by rtl advise: one candidate and seed, as rtl train's overrides.\n"
            f"{json.dumps(body)}\n")  # JSON is YAML


class Plan:
    """The candidates (and reference arms) as rtl train configs: their run directories and settings."""

    def __init__(self, opts: AdviseOptions, rest: list[str], arms: list[Candidate]):
        self.opts, self.arms = opts, arms
        self.rest = [a for a in rest if not a.lstrip("+").startswith("hydra.sweep.dir=")]
        given = [a.split("=", 1)[1] for a in rest if a.lstrip("+").startswith("hydra.sweep.dir=")]
        self.dir = Path(given[-1] if given else DEFAULT_DIR).expanduser().absolute()
        self.conf = self.dir / STATE_DIR / "conf"  # where the sweeps (and a cluster's nodes) read the options
        self.runs: dict[tuple[int, int], RunSpec] = {}
        self.base: Optional[DictConfig] = None
        self.seeds = list(range(opts.seeds))

    def overrides(self, conf: Optional[Path] = None) -> list[str]:
        return [*self.rest, f"hydra.sweep.dir={self.dir}", f"hydra.searchpath=[file://{conf or self.conf}]"]

    def write_options(self, conf: Optional[Path] = None) -> None:
        for i, c in enumerate(self.arms):
            for seed in self.seeds:
                text = _option_yaml(c, seed).encode()
                path = (conf or self.conf) / GROUP / f"c{i}_s{seed}.yaml"
                if not path.exists() or path.read_bytes() != text:
                    atomic_io.write_bytes(path, text)

    def compose(self, first: int = 0) -> None:
        """Each arm from ``first`` on composed as its rtl train job would be: checked (validate) and placed. (In
        a folder of its own: a command refused here writes nothing to the advise folder.)"""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="rtl-advise-") as tmp:
            self._compose(first, Path(tmp))

    def _compose(self, first: int, conf: Path) -> None:
        from hydra import compose, initialize_config_module

        from .config import init_source
        from .evidence.compare import INIT_SHORT
        from .models import check_model_keys, check_source

        self.write_options(conf)
        with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
            for i in range(first, len(self.arms)):
                c = self.arms[i]
                for seed in self.seeds:
                    option = f"c{i}_s{seed}"
                    cfg = compose(config_name="config", overrides=[*self.overrides(conf), f"+{GROUP}={option}"],
                                  return_hydra_config=True)
                    sub = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                    with open_dict(cfg):
                        del cfg["hydra"]
                    validate(cfg)
                    check_model_keys(cfg.model)
                    check_source(cfg.model, init_source(cfg.init))  # chest X-ray weights on a ResNet: now, not later
                    c.tag = str(cfg.model.tag)
                    c.label = f"{c.tag} {INIT_SHORT.get(c.init, c.init)}"
                    self.runs[i, seed] = RunSpec(i, seed, option, self.dir / sub, setting_id(cfg))
                    if self.base is None:
                        self.base = cfg

    def arm(self, tag: str, init: str) -> Optional[int]:
        return next((i for i, c in enumerate(self.arms) if c.key() == (tag, init)), None)

    def compared_inits(self) -> list[str]:
        """The inits a winner is compared with: random always (does pretraining help?), and every init advise.inits
        names (ImageNet only when it is named: a user with chest X-ray weights alone needs no ImageNet file)."""
        named = list(map(str, self.opts.inits))
        return list(dict.fromkeys([*(i for i in INITS if i == "random" or i in named), *named]))

    def whole_init(self, init: str) -> str:
        """The init of the whole-network reference of a winner with ``init``: its own pretraining (the question is
        how deep to keep it), or for a random-init winner the first pretraining advise.inits names."""
        if init != "random":
            return init
        return next((i for i in map(str, self.opts.inits) if i != "random"), "pretrained")


def check_data(plan: Plan) -> None:
    """What rtl data checks, before anything trains: every label learnable in train and val (and scored in test)."""
    from .data import UnusableSplit, plan as data_plan

    cfg = plan.base
    per_seed = str(cfg.data.subset) == "per_seed"
    for seed in (plan.seeds if per_seed else plan.seeds[:1]):
        try:
            data_plan(cfg.data, train_seed=seed, check=True)
        except UnusableSplit as err:
            raise UserError(f"{err}{f' (train.seed={seed})' if per_seed else ''}") from None


# --- the state of one run ------------------------------------------------------------------------------------

@dataclass
class RunState:
    finished: bool
    epochs: int  # epochs recorded in metrics.csv (with last.pt)
    history: Optional[pd.DataFrame]
    error: str = ""  # the first line of error.txt: why the run failed
    damaged: bool = False  # it failed on a damaged file of its own (last.pt...), not on its settings
    unreadable: str = ""  # a finished run whose metrics.csv cannot say its validation AUPRC per epoch: why


def _history(path: Path) -> tuple[Optional[pd.DataFrame], str]:
    """metrics.csv, with epochs 1..n in order and a val_auprc column; (None, why) when it is not that."""
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        h = pd.read_csv(path, float_precision="round_trip")
    except (OSError, ValueError) as err:
        return None, f"{path.name} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if "val_auprc" not in h.columns or "epoch" not in h.columns:
        return None, f"{path.name} has no epoch / val_auprc columns"
    epochs = pd.to_numeric(h["epoch"], errors="coerce")
    if epochs.isna().any() or list(epochs.astype(int)) != list(range(1, len(h) + 1)):
        return None, f"{path.name} does not hold epochs 1..{len(h)} in order"
    return h, ""


def read_state(spec: RunSpec) -> RunState:
    p = spec.path
    error, damaged = "", False
    if (p / rf.ERROR).is_file():
        with contextlib.suppress(OSError):
            lines = (p / rf.ERROR).read_text(errors="replace").strip().splitlines() or ["(no reason given)"]
            error, damaged = lines[0], f"{rf.ERROR_KIND}{rf.KIND_DAMAGED}" in lines[1:]
    # A paused run's metrics.csv is rewritten from its last.pt when it goes on; a finished run's is what it is.
    history, why = _history(p / rf.METRICS)
    if (p / rf.IDENTITY).is_file():
        try:
            stored = json.loads((p / rf.IDENTITY).read_text()).get("setting_id")
        except (OSError, ValueError, AttributeError):
            stored = None
        if stored != spec.setting_id:
            raise UserError(f"{p} holds a run of other settings (setting id {stored}, advise expects "
                            f"{spec.setting_id}): move it away, or give advise another folder (hydra.sweep.dir=...)")
    finished = (p / rf.RESULTS).is_file()
    epochs = len(history) if history is not None and ((p / rf.LAST).is_file() or finished) else 0
    unreadable = ""
    if finished:
        if history is None:
            unreadable = why
        else:
            try:
                ran = int(pd.read_csv(p / rf.RESULTS)["epochs_run"].iloc[0])
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                ran = None
            if ran is not None and ran != len(history):
                unreadable = f"{rf.METRICS} holds {len(history)} epoch(s), {rf.RESULTS} says the run trained {ran}"
    return RunState(finished, epochs, history, error, damaged, unreadable)


def reached(state: RunState, rung: int, final: bool) -> bool:
    return state.finished if final else (state.finished or state.epochs >= rung)


def best_until(state: RunState, rung: int) -> float:
    """The run's best validation macro AUPRC in epochs 1..rung (what its best.pt would be at that epoch)."""
    h = state.history
    if h is None:
        return math.nan
    values = pd.to_numeric(h.loc[h["epoch"] <= rung, "val_auprc"], errors="coerce").dropna()
    return float(values.max()) if len(values) else math.nan


# --- training a rung -------------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the rung's sweep process: a SIGTERM when advise dies (kill -9), so that the sweep saves and stops rather
    than training on unseen while the rerun waits for its locks."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_for_locks(specs: list[RunSpec]) -> None:
    from filelock import FileLock, Timeout

    told = False
    for spec in specs:
        lock_path = spec.path / rf.LOCK
        if not lock_path.exists():
            continue
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not told:
                print(f"rtl advise: waiting (up to {LOCK_WAIT} s) for another process to leave {spec.path} (a sweep "
                      "of an advise that was stopped, saving its state)", file=sys.stderr, flush=True)
                told = True
            try:
                lock.acquire(timeout=LOCK_WAIT)
            except Timeout:
                raise UserError(f"another rtl process is training in {spec.path}: wait for it to finish, or stop it, "
                                "then run the same command again") from None
        lock.release()


def launch(plan: Plan, specs: list[RunSpec], stop_after: int) -> tuple[int, Optional[int]]:
    """One Hydra sweep of rtl train over ``specs`` with the user's launcher: its exit status, and the signal
    (INT, TERM) advise received while it ran, if any: advise stops after it then, whatever the sweep made of it."""
    cmd = [sys.executable, "-m", "rethink_tl", "train", "-m", *plan.overrides(),
           f"+{GROUP}={','.join(s.option for s in specs)}", f"runtime.stop_after={stop_after}"]
    # The sweep's log goes to stderr: advise's stdout is the advice alone.
    received: list[int] = []

    def forward(signum, frame):  # a scheduler's TERM to advise: the sweep saves and stops
        received.append(signum)
        with contextlib.suppress(OSError):
            child.send_signal(signum)

    def note(signum, frame):  # Ctrl-C reaches the sweep from the terminal by itself (its first stops every job,
        received.append(signum)  # saved); advise waits for it, then stops too

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, note), signal.SIGTERM: signal.signal(signal.SIGTERM, note)}
    try:
        child = subprocess.Popen(cmd, stdout=sys.stderr.fileno(),
                                 preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        signal.signal(signal.SIGTERM, forward)
        if signal.SIGTERM in received:  # it came before the sweep had started
            forward(signal.SIGTERM, None)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, (received[0] if received else None)


@dataclass
class Track:
    """What became of each arm: its val AUPRC per rung, where it was dropped, why it failed."""

    schedule: list[int]
    n_candidates: int  # arms 0..n-1 are the candidates; the others reference arms added for the comparisons
    dropped: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    finalists: list[int] = field(default_factory=list)
    references: list[int] = field(default_factory=list)
    launched: list[tuple[int, int]] = field(default_factory=list)  # (rung, runs) of each sweep this command ran


def train_rung(plan: Plan, track: Track, arms: list[int], rung: int, final: bool) -> None:
    """Bring every seed of ``arms`` to ``rung`` epochs (to the end when ``final``), training only what lacks it.
    A run that failed (its error.txt) fails its candidate; any other run left short stops advise."""
    from .preempt import Interrupted

    specs = [plan.runs[a, s] for a in arms for s in plan.seeds]
    todo = [s for s in specs if not reached(read_state(s), rung, final)]
    code = 0
    if todo:
        for s in todo:  # a failure of an earlier command: this one tries again and says what happens now
            (s.path / rf.ERROR).unlink(missing_ok=True)
        _wait_for_locks(todo)
        plan.write_options()
        what = "to the end" if final else f"to epoch {rung}"
        print(f"rtl advise: {len(todo)} run(s) of {len({s.candidate for s in todo})} candidate(s) {what} "
              f"({len(specs) - len(todo)} already there)", file=sys.stderr, flush=True)
        code, signum = launch(plan, todo, 0 if final else rung)
        track.launched.append((rung, len(todo)))
        if signum is not None or code in (-signal.SIGINT, -signal.SIGTERM):
            signum = signum if signum is not None else -code
            raise Interrupted(signum, f"rtl advise was interrupted at the rung of {rung} epochs (every run keeps "
                                      "what it trained): run the same command again to continue")
    short, broken, errors = [], [], {}
    for s in specs:
        state = read_state(s)
        if state.unreadable:
            broken.append(f"{s.path}: {state.unreadable}")
        elif reached(state, rung, final):
            continue
        elif state.damaged:
            broken.append(f"{s.path}: {state.error}")
        elif state.error:
            errors.setdefault(s.candidate, {})[s.seed] = state.error
        else:
            short.append(str(s.path))
    if broken:
        raise UserError(f"advise cannot judge {len(broken)} run(s) whose files are damaged (it decides from every "
                        f"seed's metrics.csv; a rung decided without one would not be the same advice): "
                        f"{'; '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}. Restore the file, or move "
                        "that run's folder away to train it again, then run the same command again")
    for a, by_seed in errors.items():
        reasons = set(by_seed.values())
        if len(by_seed) == len(plan.seeds) and len(reasons) == 1:
            track.failed[a] = reasons.pop()  # the candidate itself fails (its settings), whatever the seed
        else:  # some seeds failed, or for other reasons: not a property of the candidate
            seed, why = next(iter(by_seed.items()))
            raise UserError(f"{plan.runs[a, seed].path} failed ({why}) while "
                            f"{len(plan.seeds) - len(by_seed)} other seed(s) of {plan.arms[a].label} did not fail "
                            "that way: fix what it says, then run the same command again")
    if short and code in (130, 128 + signal.SIGTERM):
        raise Interrupted(signal.SIGINT if code == 130 else signal.SIGTERM,
                          f"rtl advise was interrupted at the rung of {rung} epochs ({len(short)} run(s) short of "
                          "it, saved): run the same command again to continue")
    if short:
        raise UserError(f"{len(short)} run(s) did not reach epoch {rung} and say no reason (the sweep's messages "
                        f"above do: killed, out of memory, a lock): {', '.join(short[:5])}"
                        f"{' ...' if len(short) > 5 else ''}; run the same command again to continue")


def rung_score(plan: Plan, arm: int, rung: int) -> float:
    """The mean over seeds of each run's best validation AUPRC in epochs 1..rung. A run that reached the rung
    without a value to judge it by stops advise: ranking it last would change the advice without a word."""
    values = []
    for s in plan.seeds:
        v = best_until(read_state(plan.runs[arm, s]), rung)
        if math.isnan(v):
            raise UserError(f"{plan.runs[arm, s].path}/{rf.METRICS} has no validation AUPRC up to epoch {rung}, so "
                            f"{plan.arms[arm].label} cannot be ranked: restore the file, or move that run's folder "
                            "away to train it again, then run the same command again")
        values.append(v)
    return float(sum(values) / len(values))


def halve(plan: Plan, schedule: list[int]) -> Track:
    """Successive halving over the candidates; then the finalists and the reference arms to the full budget."""
    track = Track(schedule, len(plan.arms))
    alive = list(range(len(plan.arms)))
    eta = plan.opts.eta
    for rung in schedule[:-1]:
        if len(alive) <= 1:
            break  # nothing left to choose between: the last one trains to the end below
        train_rung(plan, track, alive, rung, final=False)
        _check_inits(plan, track)
        alive = [a for a in alive if a not in track.failed]
        scored = sorted(alive, key=lambda a: (-_orderable(rung_score(plan, a, rung)), a))
        kept = set(scored[:keep(len(alive), eta)])
        for a in alive:
            if a not in kept:
                track.dropped[a] = rung
        alive = [a for a in alive if a in kept]
    if not alive:
        raise UserError("every candidate failed: " + "; ".join(f"{plan.arms[a].label}: {why}"
                                                                for a, why in track.failed.items()))
    refs = references(plan, alive)
    train_rung(plan, track, alive + [r for r in refs if r not in alive], schedule[-1], final=True)
    track.finalists = [a for a in alive if a not in track.failed]
    track.references = [r for r in refs if r not in alive]
    if not track.finalists:
        raise UserError("every finalist failed: " + "; ".join(f"{plan.arms[a].label}: {track.failed[a]}"
                                                               for a in alive))
    return track


def _check_inits(plan: Plan, track: Track) -> None:
    """Every candidate of one init failed (pretrained weights that cannot be found, say): advise cannot answer
    whether that init helps, so it stops rather than advise the other one by default."""
    for init in dict.fromkeys(c.init for c in plan.arms[:track.n_candidates]):
        arms = [a for a in range(track.n_candidates) if plan.arms[a].init == init]
        if len(arms) < track.n_candidates and all(a in track.failed for a in arms):
            raise UserError(f"every candidate with init={init} failed, so advise cannot say whether it helps: "
                            + "; ".join(f"{plan.arms[a].label}: {track.failed[a]}" for a in arms[:3])
                            + f"{' ...' if len(arms) > 3 else ''}. Fix that, or leave {init} out of advise.inits")


def _orderable(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def references(plan: Plan, finalists: list[int]) -> list[int]:
    """The arms the advice compares each finalist with: the same model with the other init, and its whole network
    with TL (evidence.compare.full_model); added (and composed) when they are not candidates."""
    from .evidence.compare import full_model

    first_new = len(plan.arms)
    wanted: list[Candidate] = []
    for f in finalists:
        c = plan.arms[f]
        for init in plan.compared_inits():
            if init != c.init:
                wanted.append(Candidate(c.model_group, dict(c.model_keys), init, c.tag))
        full = full_model(c.tag)
        if full is not None:
            group, keys = ("timm", {"backbone": full[len("timm-"):]}) if full.startswith("timm-") else (full, {})
            wanted.append(Candidate(group, keys, plan.whole_init(c.init), full))
    out = []
    for w in wanted:
        found = plan.arm(w.tag, w.init)
        if found is None:
            plan.arms.append(w)
            found = len(plan.arms) - 1
        if found not in out:
            out.append(found)
    if len(plan.arms) > first_new:
        plan.compose(first=first_new)
    return out


# --- the advice ------------------------------------------------------------------------------------------------

@dataclass
class Advice:
    text: str  # advice.md
    table: pd.DataFrame  # advice.csv
    winner: int
    spent: int  # image passes (training images processed) of every run advise made
    grid: int  # those of the full grid: every candidate x seed to train.epochs


def _passes(plan: Plan, arms: list[int]) -> tuple[int, int]:
    """(image passes of these arms' runs, the most images one epoch showed)."""
    total, per_epoch = 0, 0
    for a in arms:
        for s in plan.seeds:
            h = read_state(plan.runs[a, s]).history
            if h is not None and "images_seen" in h.columns:
                seen = pd.to_numeric(h["images_seen"], errors="coerce").fillna(0)
                total += int(seen.sum())
                per_epoch = max(per_epoch, int(seen.max()) if len(seen) else 0)
    return total, per_epoch


def _status(track: Track, a: int, winner: int) -> str:
    if a in track.failed:
        return "failed"
    if a == winner:
        return "recommended"
    if a in track.dropped:
        return f"dropped after epoch {track.dropped[a]}" + ("; trained to the end as a reference arm"
                                                          if a in track.references else "")
    return "finalist" if a in track.finalists else "reference arm, trained to the end"


def _evidence(plan: Plan, arms: list[int]):
    """rtl report's intervals and paired comparisons over the finished runs of ``arms``."""
    from .evidence.compare import evidence
    from .evidence.report import drop_duplicate_seeds, gather, summarise
    from .evidence.stats import SEED

    gathered = gather(plan.dir)
    wanted = {str(plan.runs[a, s].path.relative_to(plan.dir)) for a in arms for s in plan.seeds}
    runs = gathered.runs[gathered.runs["run_dir"].isin(wanted)] if len(gathered.runs) else gathered.runs
    runs, _ = drop_duplicate_seeds(runs)
    summary = summarise(runs, gathered.settings)
    return evidence(summary, runs, plan.dir, [], plan.opts.resamples, SEED)


def _row_of(summary: pd.DataFrame, c: Candidate) -> Optional[pd.Series]:
    rows = summary[(summary["model"] == c.tag) & (summary["init"] == c.init)]
    return rows.iloc[0] if len(rows) == 1 else None


def _diff(comparisons: pd.DataFrame, a: Candidate, b: Candidate) -> Optional[tuple[float, float, float, float]]:
    """(a - b, low, high, p) of test AUPRC from the comparisons table, whichever way round it was computed."""
    if not len(comparisons):
        return None
    auprc = comparisons[comparisons["metric"] == "auprc"]
    for x, y, sign in ((a, b, 1.0), (b, a, -1.0)):
        hit = auprc[(auprc["a_model"] == x.tag) & (auprc["a_init"] == x.init) & (auprc["b_model"] == y.tag)
                    & (auprc["b_init"] == y.init)]
        if len(hit):
            r = hit.iloc[0]
            lo, hi = sorted((sign * r["ci_low"], sign * r["ci_high"]))
            return sign * r["difference"], lo, hi, float(r["p_bootstrap"])
    return None


def _fmt_diff(d: Optional[tuple[float, float, float, float]]) -> str:
    if d is None:
        return "not compared (see the notes)"
    p = "p < 0.001" if d[3] < 0.001 else f"p {d[3]:.3f}"
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}], {p}"


def sentence(plan: Plan, track: Track, winner: int, ev) -> str:
    """The answer, in one sentence."""
    from .evidence.compare import full_model

    w = plan.arms[winner]
    cfg = plan.base
    row = _row_of(ev.summary, w)
    test = "test AUPRC not available"
    if row is not None:
        test = f"test AUPRC {row['test_auprc_mean']:.3f}"
        if not math.isnan(row.get("test_auprc_ci_low", math.nan)):
            test += f" [{row['test_auprc_ci_low']:.3f}, {row['test_auprc_ci_high']:.3f}]"
    parts = [f"On {cfg.data.name} (data.fraction={float(cfg.data.fraction):g}, {int(cfg.data.image_size)} px): keep "
             f"{w.tag} with {INIT_WORDS[w.init]}", test]
    full = full_model(w.tag)
    if full is None:
        parts.append("it is the whole network")
    else:
        from .evidence.compare import INIT_SHORT

        whole = plan.whole_init(w.init)
        ref = plan.arm(full, whole)
        parts.append(f"vs the whole network with {INIT_SHORT.get(whole, whole)} "
                     + (_fmt_diff(_diff(ev.comparisons, w, plan.arms[ref])) if ref is not None else "not trained"))
    for init in plan.compared_inits():
        if init != w.init:
            other = plan.arm(w.tag, init)
            parts.append(f"vs {INIT_WORDS[init]} " + (_fmt_diff(_diff(ev.comparisons, w, plan.arms[other]))
                                                      if other is not None else "not trained"))
    return "; ".join(parts) + "."


def table(plan: Plan, track: Track, winner: int, ev) -> pd.DataFrame:
    rows = []
    for a, c in enumerate(plan.arms):
        stop = track.dropped.get(a, track.schedule[-1])
        row = {"candidate": c.label, "model": c.tag, "init": c.init,
               "role": "candidate" if a < track.n_candidates else "reference", "status": _status(track, a, winner),
               "rung_reached": None if a in track.failed else stop}
        for r in track.schedule:
            row[f"val_auprc_e{r}"] = rung_score(plan, a, r) if r <= stop and a not in track.failed else math.nan
        found = _row_of(ev.summary, c)
        row["test_auprc"] = found["test_auprc_mean"] if found is not None else math.nan
        row["test_auroc"] = found["test_auroc_mean"] if found is not None else math.nan
        row["reason"] = track.failed.get(a, "")
        row["recommended"] = a == winner
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(plan: Plan, track: Track, adv_table: pd.DataFrame, answer: str, spent: int, grid: int,
             notes: list[str]) -> str:
    o, sched = plan.opts, track.schedule
    n = track.n_candidates
    failed = len([a for a in track.failed if a < n])
    lines = [f"# rtl advise: {plan.base.data.name}", "", answer, "",
             f"Successive halving on validation macro AUPRC (each run's best epoch so far, mean over {o.seeds} "
             f"seed(s)): {n} candidates, rungs at {', '.join(map(str, sched))} epochs, eta {o.eta} (the best 1/{o.eta} "
             "go on at each rung). Test metrics were not used to choose; the test comparisons are paired bootstraps "
             f"over the test set ({o.resamples} resamples), as rtl report computes them.", "",
             "| candidate | role | status | " + " | ".join(f"val AUPRC @{r}" for r in sched) + " | test AUPRC |",
             "|---|---|---|" + "---|" * len(sched) + "---|"]
    for _, r in adv_table.iterrows():
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        cells = [("" if math.isnan(r[f"val_auprc_e{e}"]) else f"{r[f'val_auprc_e{e}']:.3f}") for e in sched]
        test = "" if math.isnan(r["test_auprc"]) else f"{r['test_auprc']:.3f}"
        lines.append(f"| {r['candidate']}{' **(recommended)**' if r['recommended'] else ''} | {r['role']} | "
                     f"{status} | " + " | ".join(cells) + f" | {test} |")
    share = f"{100 * spent / grid:.0f}%" if grid else "n/a"
    lines += ["", f"Image passes (training images processed, every run advise made): {spent:,}; the full grid's "
              f"({n - failed} candidates{' that did not fail' if failed else ''} x {o.seeds} seeds x "
              f"{sched[-1]} epochs): {grid:,}; advise spent {share} of it.", "",
              f"The runs are ordinary rtl train runs under {plan.dir} (rtl report reads them; rtl train with the same "
              "settings reuses them, and a paused one goes on from its last.pt)."]
    if notes:
        lines += ["", "Notes:", *[f"- {n_}" for n_ in notes]]
    return "\n".join(lines) + "\n"


def figure(plan: Plan, track: Track, winner: int, path: Path) -> None:
    """Mean validation AUPRC per epoch of every arm; the dropped ones grey, ending at their rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for a, c in enumerate(plan.arms):
        if a in track.failed:
            continue
        curves = [read_state(plan.runs[a, s]).history for s in plan.seeds]
        if any(h is None for h in curves):
            continue
        stop = min(len(h) for h in curves)
        mean = sum(pd.to_numeric(h["val_auprc"], errors="coerce").to_numpy()[:stop] for h in curves) / len(curves)
        epochs = range(1, stop + 1)
        if a in track.dropped:
            at = track.dropped[a]
            ax.plot(epochs[:at], mean[:at], color="0.7", lw=1)
            ax.plot([at], [mean[at - 1]], "x", color="0.5")
            if stop > at:  # trained on to the end as a reference arm
                ax.plot(epochs[at - 1:], mean[at - 1:], color="0.7", lw=1, ls=":")
        else:
            ax.plot(epochs, mean, color=next(colours), lw=3 if a == winner else 1.5,
                    label=c.label + (" (recommended)" if a == winner else ""))
    for r in track.schedule[:-1]:
        ax.axvline(r, color="0.85", ls="--", lw=1)
    ax.set_xscale("log" if track.schedule[-1] >= 9 else "linear")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation macro AUPRC (mean of {len(plan.seeds)} seeds)")
    ax.set_title(f"rtl advise on {plan.base.data.name}: dropped candidates grey, x where they were dropped "
                 "(dotted: on to the end as a reference)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_io.write_bytes(path, buf.getvalue())


def conclude(plan: Plan, track: Track) -> Advice:
    finals = {a: rung_score(plan, a, track.schedule[-1]) for a in track.finalists}
    winner = max(track.finalists, key=lambda a: (_orderable(finals[a]), -a))
    ev = _evidence(plan, [a for a in track.finalists + track.references if a not in track.failed])
    candidates_ok = [a for a in range(track.n_candidates) if a not in track.failed]
    spent, per_epoch = _passes(plan, list(range(len(plan.arms))))
    grid = len(candidates_ok) * len(plan.seeds) * track.schedule[-1] * per_epoch
    answer = sentence(plan, track, winner, ev)
    adv = table(plan, track, winner, ev)
    text = markdown(plan, track, adv, answer, spent, grid, ev.notes)
    # The figure first (the likeliest to fail: matplotlib, a full disk), advice.md last: a failed write leaves the
    # three files of the last advice that was written whole, or new ones whose advice.md says so.
    figure(plan, track, winner, plan.dir / ADVICE_PNG)
    atomic_io.write_csv(adv, plan.dir / ADVICE_CSV)
    atomic_io.write_bytes(plan.dir / ADVICE_MD, text.encode())
    return Advice(text, adv, winner, spent, grid)


@contextlib.contextmanager
def _advise_lock(folder: Path):
    from filelock import FileLock, Timeout

    (folder / STATE_DIR).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / STATE_DIR / "advise.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another rtl advise is running in {folder}: wait for it, or give this one another folder "
                        "(hydra.sweep.dir=...)") from None
    try:
        yield
    finally:
        lock.release()


def advise(argv: list[str]) -> Advice:
    """``rtl advise [OVERRIDES]``: check everything, halve, conclude."""
    from .preempt import Interrupted

    def stop(signum, frame):  # outside a rung's sweep (launch() handles the signals while one runs)
        raise Interrupted(signum, "rtl advise was stopped between its sweeps; every run keeps what it trained: run "
                                  "the same command again to continue")

    if threading.current_thread() is not threading.main_thread():
        return _advise(argv)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _advise(argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _advise(argv: list[str]) -> Advice:
    opts, rest = parse(argv)
    plan = Plan(opts, rest, candidates(opts))
    plan.compose()
    same: dict[str, list[Candidate]] = {}
    for i in range(len(plan.arms)):
        same.setdefault(plan.runs[i, 0].setting_id, []).append(plan.arms[i])
    for twins in same.values():
        if len(twins) > 1:
            raise UserError(f"{' and '.join(c.given for c in twins)} are one candidate ({twins[0].tag}: the same "
                            "settings, so the same runs): name each once")
    schedule = rungs(len(plan.arms), opts.eta, int(plan.base.train.epochs), opts.min_epochs)
    check_data(plan)
    with _advise_lock(plan.dir):
        t0 = time.perf_counter()
        track = halve(plan, schedule)
        advice = conclude(plan, track)
    if track.launched:
        print(f"rtl advise: {sum(n for _, n in track.launched)} run launch(es) in {len(track.launched)} sweep(s), "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return advice
