"""``rtl``: the command line.

    rtl train [OVERRIDES]        one run, e.g. rtl train model=dens_t1 init=pretrained
    rtl train -m [OVERRIDES]     a sweep, e.g. rtl train -m model=dens_t1,dens_f init=random,pretrained
    rtl data [OVERRIDES]         the split a run would train on (rule, images, class balance), no image read
    rtl report DIR               gather every run below DIR into DIR/summary.csv and summary.md, with 95% bootstrap
                                 intervals and paired comparisons (comparisons.csv); --figure figN,
                                 --metric auroc,auprc,auprc_trapz, --compare A B, --resamples N, --seed S, --out DIR
    rtl evaluate RUN_DIR [OVERRIDES] [--map M=D]   score a finished run (or every run of a sweep) on another
                                 dataset, e.g. data=csv data.csv=other.csv: RUN_DIR/external/<name>/
    rtl predict RUN_DIR IMAGES   per-label probabilities of a trained model for a folder or CSV of images
    rtl explain RUN_DIR [--label L] [--n N]   Grad-CAM maps of the best checkpoint on test images
    rtl bench [OVERRIDES]        images/s of the bare model step, the rtl loop and a naive loop
    rtl pretrain [OVERRIDES]     ImageNet-style pretraining on an ImageFolder tree, e.g.
                                 rtl pretrain model=cbr_small data.root=/data/imagenet (torchrun for several GPUs);
                                 installs the weights where init=pretrained finds them
    rtl bench-pretrain [OVERRIDES]  images/s of the pretraining input pipeline, a plain torchvision loader,
                                 the model step and the whole loop, on generated JPEGs or data.root
    rtl weights list|install RUN_DIR [--replace]|remove MODEL|check MODELS   the weights rtl pretrain installed

User errors print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .config import MOVED_TO_RUNTIME
from .errors import NotYourRun, UserError
from .preempt import Interrupted

USAGE = __doc__.split("\n\n")[1]


def _fail(message: str) -> None:
    print(f"rtl: error: {message}", file=sys.stderr)
    sys.exit(2)


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
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    cause = next((ln for ln in lines if ln.startswith(("Key '", "Value '", "Invalid value"))), "")
    if key and cause:
        return f"{key}: {cause}" + (_where_key_applies(key) if cause.startswith("Key") else
                                    " (the types and choices of every key: rethink_tl/config.py)")
    return lines[0] if lines else type(err).__name__


def _where_key_applies(key: str) -> str:
    """For ``data.split_by`` on a dataset without it: which datasets take that key."""
    import dataclasses

    from .config import SCHEMAS

    group, _, name = key.partition(".")
    if group != "data" or not name:
        return ""
    kinds = [schema.kind for schema in SCHEMAS.values() if dataclasses.is_dataclass(schema)
             and hasattr(schema, "kind") and name in {f.name for f in dataclasses.fields(schema)}]
    return f" (only data={' / data='.join(kinds)} take{'s' if len(kinds) == 1 else ''} it)" if kinds else ""


def _moved_keys(args: list[str]) -> list[str]:
    """``train.device=cuda`` (the SPEC's name, and what older command lines say) means ``runtime.device``."""
    out = []
    for arg in args:
        for prefix in ("", "+", "++", "~"):
            head = f"{prefix}train."
            key = arg[len(head):].split("=", 1)[0]
            if arg.startswith(head) and key in MOVED_TO_RUNTIME:
                arg = f"{prefix}runtime.{arg[len(head):]}"
                break
        out.append(arg)
    return out


def _job(run, cfg: DictConfig, what: str) -> Any:
    """Run one job of ``rtl train`` / ``rtl pretrain`` (``run(cfg, out_dir)``). A signal ends it with 128 + N; a
    user error ends a single run with one line, and in a sweep is noted in the run's error.txt, the sweep
    going on and failing at the end."""
    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    try:
        return run(cfg, out_dir)
    except Interrupted as err:
        print(f"rtl: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)  # the shell convention for "ended by signal N"
    except UserError as err:
        if hc.mode != RunMode.MULTIRUN:
            _fail(str(err))
        # One bad setting must not cancel the rest of a long sweep: note it, go on, fail at the end.
        logging.getLogger("rtl").error("%s %s failed: %s", what, out_dir, err)
        if not isinstance(err, NotYourRun) and os.path.isdir(out_dir):  # that folder holds another run: leave it
            (Path(out_dir) / "error.txt").write_text(f"{err}\n")
        _SWEEP_FAILURES.append(f"{out_dir}: {str(err).splitlines()[0]}")
        return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _train(cfg: DictConfig) -> float:
    from .train import run

    row = _job(run, cfg, "run")
    return float("nan") if row is None else float(row["test_auprc"])


_SWEEP_FAILURES: list[str] = []


def _sweep_failed() -> None:
    n = len(_SWEEP_FAILURES)
    shown = "\n  ".join(_SWEEP_FAILURES[:10]) + ("\n  ..." if n > 10 else "")
    _fail(f"{n} run(s) of the sweep failed (the others finished; each failed run's error.txt says why, except "
          f"where its folder holds another run):\n  {shown}")


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def _pretrain(cfg: DictConfig) -> float:
    from .config import process_rank
    from .pretrain import run

    if process_rank() != 0:  # one process speaks for a distributed run; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    meta = _job(run, cfg, "pretraining")
    return float("nan") if meta is None else float(meta["val_top1"])


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain_bench")
def _bench_pretrain(cfg: DictConfig) -> None:
    from .bench import format_pipeline, run_pipeline_bench

    try:
        row = run_pipeline_bench(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as err:
        _fail(str(err))
    print(format_pipeline(row))


def _slot_name(name: str) -> str:
    """A model name (aliases resolved: densenet121 -> dens_f) or an installed folder's name (trunc-resnet18-cut2)."""
    from .models.registry import canonical_name
    from .weights import check_slot, weights_slot

    try:
        canonical = canonical_name(name)
    except UserError:
        return check_slot(name)
    return check_slot(name) if canonical in ("timm", "trunc") else weights_slot({"name": canonical})


def _weights(argv: list[str]) -> None:
    from .weights import install, list_installed, remove_installed, weights_home

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
                           "a note on stderr names the others (the Makefile's figure targets use it)")
    check.add_argument("models", metavar="MODELS")
    args = parser.parse_args(argv)
    if args.action == "check":
        from .weights import installed

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
        rows = list_installed()
        print(f"{weights_home()}: {len(rows)} installed")
        for r in rows:
            if r.get("damaged"):
                print(f"  {r['slot']:<24} weights.json missing or damaged: rtl weights install RUN_DIR --replace")
                continue
            top5 = r.get("val_top5")
            top5 = "-" if top5 is None or top5 != top5 else f"{top5:.4f}"
            print(f"  {r['slot']:<24} {r['dataset']} ({r['num_classes']} classes, {r['image_size']} px), "
                  f"{r['epochs']} epochs, val top-1 {r['val_top1']:.4f} top-5 {top5}, sha256 {r['sha256'][:12]}, "
                  f"from {r['run_dir']}")


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def _bench(cfg: DictConfig) -> None:
    from .bench import format_row, run_bench

    try:
        row = run_bench(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as err:
        _fail(str(err))
    print(format_row(row))


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
    from .report import sweep_values

    if any(a in ("-h", "--help") for a in overrides):
        print(DATA_USAGE)
        return
    args = [a for a in overrides if a not in ("-m", "--multirun")]  # a sweep's command line works as it is
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


def _report(argv: list[str]) -> None:
    from .report import report

    parser = argparse.ArgumentParser(prog="rtl report", description="Gather every run below DIR into tables "
                                     "(summary.csv, summary.md) and draw the figure of its experiment.")
    parser.add_argument("dir", help="a run or sweep directory (searched recursively for results.csv)")
    parser.add_argument("--figure", metavar="figN", help="draw this paper figure (fig2 ... fig7) from the runs of "
                        "its experiment design only; default: the experiment the runs were made with, if any "
                        "(fig2 needs no runs: DIR is where it goes)")
    parser.add_argument("--out", metavar="OUT", help="write tables and figure here (default: DIR)")
    parser.add_argument("--note", default="", help="a line added under the figure title, e.g. what a profile stands in for")
    parser.add_argument("--metric", default="auroc,auprc", metavar="M[,M]",
                        help="the metrics of the tables and of the figure's rows of panels, comma-separated, from "
                        "auroc, auprc (average precision) and auprc_trapz (trapezoid PR area, as the paper's authors' "
                        "code computes it); default auroc,auprc. summary.csv always has every recorded metric")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                        help="also compare setting A with B (MODEL/INIT, e.g. dens_t1/pretrained dens_f/random) at every "
                        "dataset and fraction that has both: paired difference, 95%% interval, p-values; repeatable. "
                        "TL vs RI and truncated/slim vs full TL are always compared")
    parser.add_argument("--resamples", type=int, default=2000, metavar="N",
                        help="bootstrap resamples of the test images for intervals and comparisons (default 2000; "
                        "0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    args = parser.parse_args(argv)
    metrics = tuple(m.strip() for m in args.metric.split(","))
    try:
        done = report(args.dir, figure=args.figure, out=args.out, note=args.note, metrics=metrics,
                      compare=args.compare, resamples=args.resamples, seed=args.seed)
    except UserError as err:
        _fail(str(err))
    print(done.text)
    # The tables are written, but a script that goes on to use them must learn that runs are missing.
    if done.problems:
        _fail("; ".join(done.problems))


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:
        # The reader of our output went away (rtl report DIR | head): nothing to report, no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    # Metric warnings (single-class labels) matter, but once per message is enough.
    warnings.simplefilter("once")
    logging.captureWarnings(True)
    if command in ("train", "bench", "pretrain", "bench-pretrain"):
        sys.argv = [f"rtl-{command}", *(_moved_keys(rest) if command in ("train", "bench") else rest)]
        # Let Hydra's own errors reach us, so they end as one message rather than a partial traceback.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            {"train": _train, "bench": _bench, "pretrain": _pretrain, "bench-pretrain": _bench_pretrain}[command]()
            if _SWEEP_FAILURES:
                _sweep_failed()
        except HydraException as err:
            _fail(_hydra_message(err))
        except OmegaConfBaseException as err:  # an interpolation of the user's that cannot be resolved
            _fail(_hydra_message(err))
        except MemoryError:
            _fail("out of memory: use less data (data.num_samples, data.image_size) or a smaller "
                  "runtime.eval_batch_size / train.batch_size")
        except ValueError as err:
            if "Unable to configure handler" not in str(err):
                raise
            # Hydra could not open its log file in the output folder (a read-only file system).
            _fail(f"cannot write the log file of this run: {err.__cause__ or err}; choose a writable output "
                  "folder with hydra.run.dir=... (or hydra.sweep.dir=... for -m)")
        except BrokenPipeError:
            raise
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            _fail(f"cannot write{where}: {err.strerror or err}; choose a writable output folder with "
                  "hydra.run.dir=... (or hydra.sweep.dir=... for -m)")
    elif command == "data":
        try:
            _data(_moved_keys(rest))
        except UserError as err:
            _fail(str(err))
        except (HydraException, OmegaConfBaseException) as err:
            _fail(_hydra_message(err))
    elif command == "weights":
        try:
            _weights(rest)
        except UserError as err:
            _fail(str(err))
        except OSError as err:
            _fail(f"{err.filename or ''}: {err.strerror or err}")
    elif command in ("evaluate", "predict", "explain"):
        import importlib

        module = importlib.import_module(f".{command}", __package__)
        try:
            module.main(rest)
        except UserError as err:
            _fail(str(err))
        except (HydraException, OmegaConfBaseException) as err:
            _fail(_hydra_message(err))
        except BrokenPipeError:
            raise
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            _fail(f"cannot read or write{where}: {err.strerror or err}")
    elif command == "report":
        try:
            _report(rest)
        except BrokenPipeError:
            raise
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            _fail(f"cannot write{where}: {err.strerror or err}; choose a writable folder with --out")
    else:
        _fail(f"unknown command '{command}': use one of train, data, report, evaluate, predict, explain, bench, pretrain, bench-pretrain, weights (rtl --help)")


if __name__ == "__main__":
    main()
