"""``rtl``: the command line. Every parser is here, the commands are one table (``COMMANDS``), and one
translator (``errors_to_exit``) turns what a user can cause into one line on stderr and an exit status.

Exit status: 0 done; 2 a user error (one ``rtl: error:`` line; nothing half-written); 3 ``rtl report`` wrote
its tables but runs of the tree are unfinished or failed (named); 128 + N a run stopped by signal N after
saving. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import __version__, conf, runfiles as rf  # noqa: F401  (conf: the schemas and rtl.* resolvers)
from .config import MOVED_TO_RUNTIME, RecipeConfig
from .errors import DamagedFile, NotYourRun, UserError
from .preempt import Interrupted

EXIT_USER_ERROR = 2
EXIT_INCOMPLETE = 3  # rtl report: the tables are written, but some runs below DIR are unfinished or failed


class Command(NamedTuple):
    name: str
    usage: str  # one line of `rtl --help`
    run: Callable[[list[str]], None]
    where: str  # what to change when a file cannot be written (in the error message)


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"rtl: error: {message}", file=sys.stderr)
    sys.exit(code)


# --- Hydra's own errors, in one line -------------------------------------------------------------------

def _hydra_message(err: Exception) -> str:
    """Hydra's composition errors span several lines (what failed, a hint, the cause, full_key,
    object_type) and the hint to append with ``+`` is wrong for our typed groups: keep the key and the cause."""
    text, cause = str(err), err.__cause__
    while cause is not None:  # "Error merging override ..." keeps the reason in the exception it wraps
        text += "\n" + str(cause)
        cause = cause.__cause__
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("Available options"):  # an unknown group option: list the choices on the same line
            choices = []
            for option in lines[i + 1:]:
                if option.startswith("Config search path"):
                    break
                if not option.startswith("base_"):  # the schemas (config.py) are not choices
                    choices.append(option)
            return f"{lines[0]}; {ln.rstrip(':').lower()}: {', '.join(choices)}"
    if isinstance(err, OverrideParseException):
        return _override_message(err)
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    cause = next((ln for ln in lines if ln.startswith(("Key '", "Value '", "Invalid value"))), "")
    if key and cause:
        return f"{key}: {cause}" + (_where_key_applies(key) if cause.startswith("Key") else
                                    " (the types and choices of every key: rethink_tl/config.py)")
    return lines[0] if lines else type(err).__name__


def _override_message(err: OverrideParseException) -> str:
    """An override Hydra cannot parse: most often a value the shell split at a space, or one holding Hydra's
    own syntax (parentheses, brackets, commas)."""
    override = str(err.override)
    if "=" not in override:
        return (f"{override!r} is not an override (KEY=VALUE): a value with a space must be quoted, e.g. "
                "'data.csv=/data/my images.csv'")
    detail = str(err).strip().splitlines()[0]
    return (f"{override}: {detail}; a value holding ()[]{{}}:=,'\" must be quoted for Hydra inside the shell's "
            "quotes, e.g. 'data.csv=\"/data/my (1).csv\"'")


def _where_key_applies(key: str) -> str:
    """For ``data.split_by`` on a dataset without it: which datasets take that key."""
    from .config import SCHEMAS

    group, _, name = key.partition(".")
    if group != "data" or not name:
        return ""
    kinds = [schema.kind for schema in SCHEMAS.values() if dataclasses.is_dataclass(schema)
             and hasattr(schema, "kind") and name in {f.name for f in dataclasses.fields(schema)}]
    return f" (only data={' / data='.join(kinds)} take{'s' if len(kinds) == 1 else ''} it)" if kinds else ""


@contextlib.contextmanager
def errors_to_exit(where: str, catch_user_errors: bool = True) -> Iterator[None]:
    """The one translator: a user error, Hydra's and OmegaConf's composition errors, a file that cannot be
    written and running out of memory each end as one line and exit 2. ``where``: what to change to write
    elsewhere. Inside a Hydra job it must run there (Hydra reports what leaves a job in lines of its own);
    ``catch_user_errors=False`` leaves user errors to the job, which notes them in a sweep and goes on."""
    try:
        yield
    except BrokenPipeError:
        raise
    except UserError as err:
        if not catch_user_errors:
            raise
        fail(str(err))
    except (HydraException, OmegaConfBaseException) as err:  # composition, or an interpolation of the user's
        fail(_hydra_message(err))
    except MemoryError:
        fail("out of memory: use less data (data.num_samples, data.image_size) or a smaller "
             "runtime.eval_batch_size / train.batch_size")
    except ValueError as err:
        if not isinstance(err.__cause__, OSError):
            raise
        # logging could not open Hydra's log file in the output folder (a read-only file system).
        fail(f"cannot write the log file of this run: {err.__cause__}; choose a writable output folder with {where}")
    except OSError as err:
        at = f" {err.filename}" if err.filename else ""
        fail(f"cannot write{at}: {err.strerror or err}; choose a writable folder with {where}")


# --- the Hydra commands: train, pretrain, bench, bench-pretrain ----------------------------------------

_RUN_DIR = "hydra.run.dir=... (or hydra.sweep.dir=... for -m)"

def _forget_refused(out_dir: str) -> None:
    """A single run refused before it wrote anything leaves no folder of its own behind: when the folder holds
    nothing but this invocation's Hydra record, its log and an unheld lock, it goes."""
    hc = HydraConfig.get()
    out = Path(out_dir)
    record = Path(str(hc.output_subdir)).name if hc.output_subdir else None
    ours = {f"{hc.job.name}.log", ".hydra", rf.LOCK}
    try:
        entries = list(out.iterdir())
        hydra_dir = out / ".hydra"
        if record is None or any(e.name not in ours for e in entries) or (
                hydra_dir.is_dir() and any(p.name != record for p in hydra_dir.iterdir())):
            return
        from filelock import FileLock, Timeout

        lock = FileLock(str(out / rf.LOCK))
        try:
            lock.acquire(timeout=0)  # nobody else is in there
        except Timeout:
            return
        try:
            shutil.rmtree(out)
        finally:
            lock.release()
    except OSError:
        return  # whatever cannot be looked at or removed stays


def _job(run, cfg: DictConfig, what: str) -> Any:
    """Run one job of ``rtl train`` / ``rtl pretrain`` (``run(cfg, out_dir)``): a single run, or one job of a
    sweep (``_sweep_job``)."""
    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    if hc.mode == RunMode.MULTIRUN:
        return _sweep_job(run, cfg, what, hc)
    try:
        with errors_to_exit(_RUN_DIR, catch_user_errors=False):  # inside the job, or Hydra adds its own lines
            return run(cfg, out_dir)
    except Interrupted as err:
        print(f"rtl: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)  # the shell convention for "ended by signal N"
    except UserError as err:
        if not isinstance(err, NotYourRun):
            _forget_refused(out_dir)
        fail(str(err))


def _parallel_jobs(hc) -> int:
    """How many jobs the launcher runs at once on this machine (joblib's n_jobs; 1 for the basic launcher)."""
    n = hc.launcher.get("n_jobs") if "n_jobs" in hc.launcher else None
    if n is None:
        return 1
    n = int(n)
    return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)  # joblib: -1 = every core, -2 = all but one


def _sweep_job(run, cfg: DictConfig, what: str, hc) -> Any:
    """One job of a sweep. Whatever becomes of it is recorded for the command that started the sweep
    (sweeps.py): a user error fails this run only (error.txt, the sweep goes on and fails at the end), a bug or
    running out of memory is a crash (traceback in the job's log), a signal saves and stops it. In a worker
    process, the job also stops, saved, when the sweep is interrupted or its command dies; and trains on a device
    slot of its own (distributed.claim_device)."""
    from . import sweeps

    worker = sweeps.in_worker()
    try:
        result = _recorded_job(run, cfg, what, hc, worker)
    finally:
        sweeps.job_done()
    if worker and sweeps.parent_gone():
        sweeps.leave_orphaned()  # nobody is left to hand the result to: the worker would wait on its pipe for ever
    return result


def _recorded_job(run, cfg: DictConfig, what: str, hc, worker: bool) -> Any:
    from . import sweeps
    from .distributed import claim_device
    from .preempt import ask_to_stop

    log = logging.getLogger("rtl")
    out_dir = hc.runtime.output_dir
    record = sweeps.JobRecord.open(hc.sweep.dir, int(hc.job.num), out_dir, list(hc.overrides.task))
    if record is not None and record.sweep_interrupted:
        record.end("interrupted", "the sweep was interrupted before this run started: run the same command again")
        return None
    if worker:
        sweeps.watch_parent(ask_to_stop, record.path.parent / sweeps.INTERRUPTED_MARK if record is not None else None)
    claim = None
    if what == "run":
        parallel = _parallel_jobs(hc)
        if parallel > 1 or worker:
            claim = claim_device(str(cfg.runtime.device), int(cfg.runtime.threads), int(cfg.runtime.jobs_per_device),
                                 parallel, log=log)
            cfg.runtime.device, cfg.runtime.threads = claim.device, claim.threads
            log.info("%s: device %s%s, %s CPU threads", out_dir, claim.device,
                     f" (slot {claim.slot})" if claim.slot else "", claim.threads or "torch's default")
    try:
        result = run(cfg, out_dir)
    except Interrupted as err:
        _end(record, "interrupted", str(err))
        if worker:
            return None  # the command that started the sweep says it, once, for every job
        print(f"rtl: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except UserError as err:
        # One bad setting must not cancel the rest of a long sweep: note it, go on, fail at the end.
        log.error("%s %s failed: %s", what, out_dir, err)
        if not isinstance(err, NotYourRun) and os.path.isdir(out_dir):  # that folder holds another run: leave it
            with contextlib.suppress(OSError):
                kind = f"{rf.ERROR_KIND}{rf.KIND_DAMAGED}\n" if isinstance(err, DamagedFile) else ""
                (Path(out_dir) / rf.ERROR).write_text(f"{err}\n{kind}")
        _end(record, "failed", str(err).splitlines()[0])
        return None
    except OSError as err:  # a folder or disk it cannot write: this run fails, as on a user error
        at = f" {err.filename}" if err.filename else ""
        log.error("%s %s failed: cannot write%s: %s", what, out_dir, at, err.strerror or err)
        _end(record, "failed", f"cannot write{at}: {err.strerror or err}")
        return None
    except (Exception, MemoryError) as err:  # a bug, or out of memory: this job crashed, the others go on
        log.exception("%s %s crashed", what, out_dir)
        reason = "out of memory" if isinstance(err, MemoryError) else f"{type(err).__name__}: {err}".splitlines()[0]
        _end(record, "crashed", f"{reason} (the traceback is in the job's log)")
        return None
    finally:
        if claim is not None:
            claim.release()
    status = "paused" if isinstance(result, dict) and result.get("paused") else "finished"  # runtime.stop_after
    _end(record, status, value=None if result is None else _objective(what, result))
    return result


def _objective(what: str, result: dict[str, Any]) -> float:
    """What a job returns to Hydra's sweeper (Optuna's objective): rtl train's best validation macro AUPRC,
    never a test metric; rtl pretrain's validation top-1."""
    return float(result["val_auprc"] if what == "run" else result["val_top1"])


def _end(record, status: str, reason: str = "", value: Any = None) -> None:
    if record is not None:
        record.end(status, reason, value)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _train(cfg: DictConfig) -> float:
    from .train import run

    row = _job(run, cfg, "run")
    return float("nan") if row is None else _objective("run", row)


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def _pretrain(cfg: DictConfig) -> float:
    from .distributed import process_rank
    from .pretrain import run

    if process_rank() != 0:  # one process speaks for a distributed run; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    meta = _job(run, cfg, "pretraining")
    return float("nan") if meta is None else _objective("pretraining", meta)


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def _bench(cfg: DictConfig) -> None:
    from .bench.loop import format_row, run_bench

    with errors_to_exit(_RUN_DIR):
        print(format_row(run_bench(cfg, HydraConfig.get().runtime.output_dir)))


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain_bench")
def _bench_pretrain(cfg: DictConfig) -> None:
    from .bench.pipeline import format_pipeline, run_pipeline_bench

    with errors_to_exit(_RUN_DIR):
        print(format_pipeline(run_pipeline_bench(cfg, HydraConfig.get().runtime.output_dir)))


def _train_keys(args: list[str]) -> list[str]:
    """``train.device=cuda`` (the SPEC's name, and what older command lines say) means ``runtime.device``."""
    return [_renamed(arg, {k: f"runtime.{k}" for k in MOVED_TO_RUNTIME}) for arg in args]


# What rtl train's key names mean for rtl pretrain (SPEC section 10: the same names where they mean the same).
_PRETRAIN_TRAIN_KEYS = {"epochs": "recipe.epochs", "batch_size": "recipe.batch_size", "seed": "recipe.seed",
                        **{k: f"runtime.{k}" for k in MOVED_TO_RUNTIME}}


def _pretrain_keys(args: list[str]) -> list[str]:
    out = [_renamed(arg, _PRETRAIN_TRAIN_KEYS) for arg in args]
    for arg in out:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith("train."):
            name = key.split(".", 1)[1]
            if name == "lr":
                raise UserError("rtl pretrain scales its learning rate with the global batch: set "
                                "recipe.lr_per_256=... (lr = lr_per_256 x global batch / 256), not train.lr")
            known = ", ".join(f.name for f in dataclasses.fields(RecipeConfig))
            raise UserError(f"{key}: rtl pretrain has no train.* settings; its recipe keys are recipe.{{{known}}} "
                            "(train.epochs, train.batch_size and train.seed are read as the recipe's)")
    return out


def _renamed(arg: str, names: dict[str, str]) -> str:
    for prefix in ("", "+", "++", "~"):
        head = f"{prefix}train."
        key = arg[len(head):].split("=", 1)[0]
        if arg.startswith(head) and key in names:
            return f"{prefix}{names[key]}{arg[len(head) + len(key):]}"
    return arg


def _hydra_command(name: str, main: Callable[[], Any], rewrite: Callable[[list[str]], list[str]] | None = None):
    """``rtl NAME [OVERRIDES]`` run by Hydra's ``main`` (one run, or a sweep with -m)."""

    def run(args: list[str]) -> None:
        sys.argv = [f"rtl-{name}", *(rewrite(args) if rewrite else args)]
        # Let Hydra's own errors reach us, so they end as one message rather than a partial traceback.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        if not any(a in ("-m", "--multirun") for a in args):
            main()
            return
        _sweep(main)

    return run


def _sweep(main: Callable[[], Any]) -> None:
    """A sweep, whatever launches its jobs: at the end, every job's record is read (sweeps.py), and a run that
    failed, crashed or was interrupted makes the command fail, naming each with its reason."""
    from . import sweeps

    sweep = sweeps.begin()
    launcher_error: BaseException | None = None
    try:
        main()
    except (UserError, HydraException, OmegaConfBaseException):
        raise
    except KeyboardInterrupt:  # the second Ctrl-C: the launcher stopped its workers where they were
        sweeps.end()
        result = sweeps.outcome(sweep)
        fail(f"the sweep was abandoned (Ctrl-C twice): its running jobs were stopped unsaved; each run resumes from "
             f"its last save when the same command is run again ({len(result.of('finished'))} of "
             f"{len(result.records)} started run(s) had finished)", 130)
    except Exception as err:  # noqa: BLE001  (a launcher's report of a job that died, e.g. submitit's)
        launcher_error = err
    finally:
        sweeps.end()
    result = sweeps.outcome(sweep)
    problems = result.problems()
    if launcher_error is not None:
        if not problems and sweep.records is None:
            raise launcher_error  # the sweep never started: not a job's doing
        problems.append(f"the launcher reported: {type(launcher_error).__name__}: "
                        f"{str(launcher_error).strip().splitlines()[0] if str(launcher_error).strip() else ''}")
    if launcher_error is not None and not result.records:
        raise UserError(f"the launcher failed before any run of the sweep started: {problems[-1].split(': ', 1)[1]}")
    if not problems:
        return
    n, total = len(problems), len(result.records)
    shown = "\n  ".join(problems[:20]) + ("\n  ..." if n > 20 else "")
    interrupted = len(result.of("interrupted"))
    if interrupted and interrupted == n:
        fail(f"the sweep was interrupted: {interrupted} of {total} run(s) stopped, saved; run the same command "
             f"again to resume them:\n  {shown}", 130)
    raise UserError(f"{n} of {total} run(s) of the sweep did not finish (the others did; a failed run's "
                    f"{rf.ERROR} says why):\n  {shown}")


# --- rtl data ----------------------------------------------------------------------------------------------

DATA_USAGE = """usage: rtl data [OVERRIDES]

The split that rtl train with the same overrides would train on: the split rule, then images and class
balance per split, read from the tables alone (no image is decoded, nothing is written). Exit 2, with one
message, on any problem a run would meet. Sweep values (data.fraction=0.05,0.1) and the sweep of an
experiment (+experiment=fig3) are expanded over the keys that change the data (data.*, train.seed), and each
distinct split is shown once, e.g.
    rtl data data=csv data.csv=/data/covid/images.csv data.cutoff_date=2020-06-30
    rtl data +experiment=fig3 data.csv=/data/covid/images.csv data.date_column=study_date"""


def _data(overrides: list[str]) -> None:
    """``rtl data [overrides]`` (DATA_USAGE). The figure targets call it before their sweeps, with the
    sweeps' own data overrides, so that a data problem stops them before any training."""
    import itertools

    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from .config import validate
    from .data import UnusableSplit, plan
    from .evidence.designs import sweep_values

    if any(a in ("-h", "--help") for a in overrides):
        print(DATA_USAGE)
        return
    args = [a for a in _train_keys(overrides) if a not in ("-m", "--multirun")]  # a sweep's line works as it is
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"rtl data takes key=value overrides, not {flags[0]} (rtl data --help)")
    parsed = OverridesParser.create().parse_overrides(args)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        first = [f"{k}={v[0]}" for k, v in sweeps.items()]
        base = compose(config_name="config", overrides=fixed + first, return_hydra_config=True)
        given = {o.get_key_element() for o in parsed}
        for key, value in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items():
            if key not in given:  # the experiment's sweep, unless the command line sets that key
                sweeps[key] = sweep_values(key, value)
        # Only data keys change the split, and the training seed with data.subset=per_seed; the rest keep one
        # value (each combination reads the tables again: a CheXpert train.csv is 223k rows).
        per_seed = str(base.data.subset) == "per_seed" or any(v == "per_seed" for v in sweeps.get("data.subset", []))
        data_keys = [k for k in sweeps if (k == "train.seed" and per_seed) or k == "data" or k.startswith("data.")]
        others = [f"{k}={v[0]}" for k, v in sweeps.items() if k not in data_keys]
        shown: dict[str, list[str]] = {}
        for combo in itertools.product(*(sweeps[k] for k in data_keys)):
            chosen = [f"{k}={v}" for k, v in zip(data_keys, combo)]
            cfg = compose(config_name="config", overrides=fixed + others + chosen)
            where = f" ({' '.join(chosen)})" if chosen else ""
            try:
                validate(cfg)
                text = plan(cfg.data, train_seed=int(cfg.train.seed), check=True)
            except UnusableSplit as err:
                print(err.text)
                raise UserError(f"{err}{where}") from None
            except UserError as err:
                raise UserError(f"{err}{where}") from None
            shown.setdefault(text, []).append(" ".join(chosen))
    for text, combos in shown.items():
        if len(shown) > 1 or len(combos) > 1:
            print(f"[{'; '.join(combos)}]")
        print(text)


# --- rtl report ----------------------------------------------------------------------------------------

def _report(argv: list[str]) -> None:
    from .evidence.report import ReportOptions, report
    from .evidence.stats import RESAMPLES, SEED
    from .metrics import DEFAULT_METRICS, METRICS

    parser = argparse.ArgumentParser(prog="rtl report", description="Gather every run below DIR into tables "
                                     "(summary.csv, summary.md) and draw the figure of its experiment. Exit 0: "
                                     "done; 2: an error, or runs whose files cannot be trusted (named; the tables "
                                     "are written without them); 3: the tables are written, but runs below DIR are "
                                     "unfinished or failed (named).")
    parser.add_argument("dir", help="a run or sweep directory (searched recursively for results.csv)")
    parser.add_argument("--figure", metavar="figN", help="draw this paper figure (fig2 ... fig7) from the runs of "
                        "its experiment design only; default: the experiment the runs were made with, if any "
                        "(fig2 needs no runs: DIR is where it goes); calibration: reliability diagrams of every "
                        "setting's test predictions (calibration.png/.pdf)")
    parser.add_argument("--out", metavar="OUT", help="write tables and figure here (default: DIR)")
    parser.add_argument("--note", default="", help="a line added under the figure title, e.g. what a profile stands "
                        "in for")
    parser.add_argument("--metric", default=",".join(DEFAULT_METRICS), metavar="M[,M]",
                        help=f"the metrics of the tables and of the figure's rows of panels, comma-separated, from "
                        f"{', '.join(METRICS)} (auprc: average precision; auprc_trapz: the trapezoid PR area, as the "
                        f"paper's authors' code computes it); default {','.join(DEFAULT_METRICS)}. summary.csv always "
                        "has every recorded metric")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                        help="also compare setting A with B (MODEL/INIT, e.g. dens_t1/pretrained dens_f/random; "
                        "MODEL/INIT:KEY=VALUE picks one of several settings, e.g. dens_t1/random:train.lr=0.001) "
                        "at every dataset and fraction that has both: paired difference, 95%% interval, p-values; "
                        "repeatable. TL vs RI and truncated/slim vs full TL are always compared")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, metavar="N",
                        help=f"bootstrap resamples of the test images for intervals and comparisons (default "
                        f"{RESAMPLES}; 0: none)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the bootstrap resamples (default {SEED})")
    parser.add_argument("--operating-point", metavar="RULE", help="also write operating_points.csv: per setting "
                        "and label, sensitivity, specificity, PPV and NPV on test (95%% intervals) at a threshold "
                        "chosen on each run's validation predictions by RULE: youden, sens=X (e.g. sens=0.9) or "
                        "spec=X (e.g. spec=0.95)")
    parser.add_argument("--by", metavar="COLUMN[:EDGES]", help="also write subgroups.csv: per value of a group column "
                        "kept beside the predictions (a CSV's data.group_columns, CheXpert's sex and age), AUROC / "
                        "AUPRC (and, with --operating-point, the rates) with 95%% intervals and each group's gap to "
                        "the largest; COLUMN:0,40,60,80,120 bins a numeric column into [a, b)")
    args = parser.parse_args(argv)
    options = ReportOptions(figure=args.figure, out=args.out, note=args.note,
                            metrics=tuple(m.strip() for m in args.metric.split(",")),
                            compare=[tuple(pair) for pair in args.compare], resamples=args.resamples, seed=args.seed,
                            operating_point=args.operating_point, by=args.by)
    done = report(args.dir, options)
    print(done.text)
    # The tables are written, but a script that goes on to use them must learn that runs are missing.
    if done.problems:
        fail("; ".join(done.problems))
    if done.incomplete:
        fail(f"the tables are written, but not every run below {args.dir} is in them: {'; '.join(done.incomplete)}",
             EXIT_INCOMPLETE)


# --- rtl advise -----------------------------------------------------------------------------------------

def _advise(argv: list[str]) -> None:
    from .advise import USAGE, advise
    from .preempt import Interrupted

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        done = advise(argv)
    except Interrupted as err:
        fail(str(err), 128 + err.signum)
    print(done.text, end="")


# --- rtl evaluate | predict | explain | export ---------------------------------------------------------

def _evaluate(argv: list[str]) -> None:
    from .inference.evaluate import evaluate_runs

    parser = argparse.ArgumentParser(
        prog="rtl evaluate", description="External validation: score a finished run's best checkpoint (or every "
        "finished run below a sweep folder) on another dataset, chosen with data overrides, e.g. rtl evaluate RUN "
        "data=csv data.csv=other.csv --map opacity=Opacity. Writes RUN/external/<name>/.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run, or a sweep folder")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                        help="the external data: data=... and data.KEY=... overrides")
    parser.add_argument("--map", action="append", default=[], metavar="MODEL_LABEL=DATA_LABEL",
                        help="score the model's label against a differently named label of the data (repeatable)")
    parser.add_argument("--name", help="RUN_DIR/external/<name>/ (default: the external data.name)")
    parser.add_argument("--split", choices=("all", "test"), default="all",
                        help="all: every image of the external dataset (default); test: its test split only")
    parser.add_argument("--force", action="store_true",
                        help="replace an evaluation of the same --name on other data")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    args = parser.parse_intermixed_args(argv)
    evaluate_runs(args.run_dir, args.overrides, label_map=args.map, name=args.name, split=args.split,
                  force=args.force, device=args.device, argv=argv)


def _predict(argv: list[str]) -> None:
    from .inference.predict import predict_to_file

    parser = argparse.ArgumentParser(
        prog="rtl predict", description="A trained model's probabilities for new images: one CSV row per image "
        "(path, prob_<label> for every label of the model), the images decoded as the run decoded its own.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder of one finished rtl train run")
    parser.add_argument("images", metavar="IMAGES", help="a folder (searched recursively for image files), a CSV "
                        "with a path column (paths relative to its folder, or absolute), or one image")
    parser.add_argument("--out", help="the CSV to write (default: RUN_DIR/predict/<name of IMAGES>.csv)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--path-column", metavar="COL", help="IMAGES as a CSV: the column of paths (default: path)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out missing or unreadable files (listed on "
                        "stderr) instead of stopping")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="decode as grey (1) or colour (3): only needed "
                        "when the run trained with data.channels=auto and its training images are gone")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    predict_to_file(args.run_dir, args.images, args.out, force=args.force, path_column=args.path_column,
                    skip_bad=args.skip_bad, channels=args.channels, device=args.device)


def _explain(argv: list[str]) -> None:
    from .inference.explain import explain_to_files

    parser = argparse.ArgumentParser(
        prog="rtl explain", description="Grad-CAM maps of a finished run's best checkpoint on its test images: "
        "per label, the highest-scored positives, the lowest-scored positives and the highest-scored negatives.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder of a finished rtl train run")
    parser.add_argument("--label", metavar="L", help="only this label (default: every label of the model)")
    parser.add_argument("--n", type=int, default=4, metavar="N", help="images per group (default 4)")
    parser.add_argument("--out", metavar="DIR", help="where the PNG and PDF go (default RUN_DIR/explain/)")
    args = parser.parse_args(argv)
    explain_to_files(args.run_dir, args.label, args.n, args.out)


def _export(argv: list[str]) -> None:
    from .inference.export import FORMATS, export_to_files

    parser = argparse.ArgumentParser(
        prog="rtl export", description="A finished run's best checkpoint as an ONNX or TorchScript file that takes "
        "the preprocessed image tensor and gives per-label probabilities, checked against best.pt on the run's own "
        f"test images, with {rf.MODEL_CARD} and <name>{rf.PREPROCESSING_SUFFIX} beside it.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder of one finished rtl train run")
    parser.add_argument("--format", default="onnx", metavar="|".join(FORMATS),
                        help=f"{' or '.join(FORMATS)} (default onnx; onnx needs pip install 'rethink-tl[export]')")
    parser.add_argument("--out", metavar="FILE", help="the model file (default RUN_DIR/export/<format>/model.onnx "
                        "or model.pt); the card and the spec go into its folder")
    parser.add_argument("--force", action="store_true", help="replace the model file, card or spec if they exist")
    args = parser.parse_args(argv)
    export_to_files(args.run_dir, args.format, args.out, force=args.force)


# --- rtl weights ---------------------------------------------------------------------------------------

def _slot_name(name: str) -> str:
    """A model name (aliases resolved: densenet121 -> dens_f), or the name of an installed weights folder (a timm
    backbone's: trunc-resnet18-cut2, timm-resnet18); anything else is an unknown model (UserError)."""
    from .models import canonical_name
    from .weights import check_slot, weights_home, weights_slot

    check_slot(name)  # a name, never a path
    try:
        canonical = canonical_name(name)
    except UserError:
        if name.startswith(("timm-", "trunc-")) or (weights_home() / name).is_dir():
            return name
        named = _model_preset(name)  # model=lite0_t2: trunc with its backbone and cut set
        if named is not None:
            return weights_slot(named)
        raise
    if canonical in ("timm", "trunc"):
        raise UserError(f"{name} needs its backbone: name its installed folder, e.g. {canonical}-resnet18"
                        + ("-cut2" if canonical == "trunc" else "") + " (rtl weights list shows them)")
    return weights_slot({"name": canonical})


def _model_preset(name: str) -> dict[str, Any] | None:
    """The backbone and cut a model config (conf/model/NAME.yaml) fixes for a timm model, or None."""
    import importlib.resources

    path = importlib.resources.files("rethink_tl").joinpath("conf", "model", f"{name}.yaml")
    if not path.is_file():
        return None
    preset = OmegaConf.to_container(OmegaConf.load(str(path)))
    keys = {"name", "backbone"} | ({"cut"} if preset.get("name") == "trunc" else set())
    return preset if isinstance(preset, dict) and keys <= set(preset) else None


def _weights(argv: list[str]) -> None:
    from .weights import install, installed, list_installed, remove_installed, weights_home

    parser = argparse.ArgumentParser(prog="rtl weights", description="The weights rtl pretrain installed (in "
                                     "$RTL_WEIGHTS, default ~/.cache/rethink_tl/weights), which init=pretrained uses.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="one line per installed model")
    add = sub.add_parser("install", help="install a finished pretraining (its folder)")
    add.add_argument("run_dir")
    add.add_argument("--replace", action="store_true", help="replace other weights installed for that model")
    rm = sub.add_parser("remove", help="remove the weights installed for a model")
    rm.add_argument("slot", metavar="MODEL")
    check = sub.add_parser("check", help="print which of MODELS (comma-separated) have weights installed; "
                           "a note on stderr names the others (the Makefile's figure targets use it); an unknown "
                           "model name is an error")
    check.add_argument("models", metavar="MODELS")
    args = parser.parse_args(argv)
    if args.action == "check":
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise UserError("rtl weights check needs model names, e.g. rtl weights check cbr_small,cbr_tiny")
        models = [_slot_name(m) for m in models]
        have = [m for m in models if installed(m) is not None]
        missing = [m for m in models if m not in have]
        if missing:
            print(f"TL runs of {', '.join(missing)} skipped: no weights installed for them in {weights_home()}; "
                  "make pretrain-cbr IMAGENET=DIR (or rtl pretrain model=NAME data.root=DIR) makes and installs "
                  "them, or set CBR_WEIGHTS=DIR holding <model>.pth", file=sys.stderr)
        print(",".join(have))
    elif args.action == "install":
        print(f"installed into {install(args.run_dir, replace=args.replace)}")
    elif args.action == "remove":
        print(f"removed {remove_installed(_slot_name(args.slot))}")
    else:
        _list_weights(list_installed(), weights_home())


def _list_weights(rows: list[dict[str, Any]], home: Path) -> None:
    print(f"{home}: {len(rows)} installed")
    for r in rows:
        if r.get("damaged"):
            print(f"  {r['slot']:<24} {rf.WEIGHTS_META} missing or damaged: rtl weights install RUN_DIR --replace")
            continue
        top5 = r.get("val_top5")
        top5 = "-" if top5 is None or top5 != top5 else f"{top5:.4f}"
        print(f"  {r['slot']:<24} {r['dataset']} ({r['num_classes']} classes, {r['image_size']} px), "
              f"{r['epochs']} epochs, val top-1 {r['val_top1']:.4f} top-5 {top5}, sha256 {r['sha256'][:12]}, "
              f"from {r['run_dir']}")


# --- the table of commands -----------------------------------------------------------------------------

COMMANDS = {c.name: c for c in (
    Command("train", "rtl train [OVERRIDES]        one run, e.g. rtl train model=dens_t1 init=pretrained; -m: a "
            "sweep, e.g. rtl train -m model=dens_t1,dens_f init=random,pretrained",
            _hydra_command("train", _train, _train_keys),
            _RUN_DIR),
    Command("data", "rtl data [OVERRIDES]         the split a run would train on (rule, images, class balance), no "
            "image read", _data, _RUN_DIR),
    Command("report", "rtl report DIR               every run below DIR -> DIR/summary.csv and summary.md with 95% "
            "bootstrap intervals and paired comparisons; --figure figN, --metric, --compare A B, --out DIR",
            _report, "--out"),
    Command("advise", "rtl advise [OVERRIDES]       which candidate to keep and whether ImageNet init helps, by "
            "successive halving on val AUPRC (advise.models=[...] or advise.backbone=NAME; advise.eta, advise.seeds)",
            _advise, "hydra.sweep.dir=..."),
    Command("evaluate", "rtl evaluate RUN_DIR [OVERRIDES] [--map M=D]   score a finished run (or a sweep) on "
            "another dataset: RUN_DIR/external/<name>/", _evaluate, "a RUN_DIR you may write to"),
    Command("predict", "rtl predict RUN_DIR IMAGES   per-label probabilities for a folder or CSV of images",
            _predict, "--out"),
    Command("explain", "rtl explain RUN_DIR [--label L] [--n N]   Grad-CAM maps of the best checkpoint on test "
            "images", _explain, "--out"),
    Command("export", "rtl export RUN_DIR [--format onnx|torchscript] [--out FILE]   the best checkpoint as an ONNX "
            "or TorchScript file, checked, with MODEL_CARD.md and its preprocessing spec", _export, "--out"),
    Command("bench", "rtl bench [OVERRIDES]        images/s of the bare model step, the rtl loop and a naive loop",
            _hydra_command("bench", _bench, _train_keys), _RUN_DIR),
    Command("pretrain", "rtl pretrain [OVERRIDES]     ImageNet-style pretraining on an ImageFolder tree, e.g. rtl "
            "pretrain model=cbr_small data.root=/data/imagenet; installs the weights for init=pretrained",
            _hydra_command("pretrain", _pretrain, _pretrain_keys), _RUN_DIR),
    Command("bench-pretrain", "rtl bench-pretrain [OVERRIDES]  images/s of the pretraining input pipeline, a "
            "plain loader, the model step and the whole loop", _hydra_command("bench-pretrain", _bench_pretrain),
            _RUN_DIR),
    Command("weights", "rtl weights list|install RUN_DIR [--replace]|remove MODEL|check MODELS   the weights rtl "
            "pretrain installed", _weights, "RTL_WEIGHTS=DIR"),
)}


def usage() -> str:
    lines = ["usage: rtl COMMAND [ARGS]   (rtl COMMAND --help for one command; rtl --version)", ""]
    lines += [f"  {c.usage}" for c in COMMANDS.values()]
    lines += ["", "User errors print one line and exit 2; anything else is a bug and keeps its traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader of our output went away (rtl report DIR | head): nothing to report, no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("--version", "-V", "version"):
        print(f"rtl {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}': use one of {', '.join(COMMANDS)} (rtl --help)")
    # Metric warnings (single-class labels) matter, but once per message is enough.
    warnings.simplefilter("once")
    logging.captureWarnings(True)
    entry = COMMANDS[command]
    with errors_to_exit(entry.where):
        entry.run(rest)


if __name__ == "__main__":
    main()
