"""``rtl``: the command line.

    rtl train [OVERRIDES]        one run, e.g. rtl train model=dens_t1 init=pretrained
    rtl train -m [OVERRIDES]     a sweep, e.g. rtl train -m model=dens_t1,dens_f init=random,pretrained
    rtl report DIR               gather every run below DIR into DIR/summary.csv and summary.md

User errors print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig

from .errors import UserError
from .preempt import Interrupted

USAGE = __doc__.split("\n\n")[1]


def _fail(message: str) -> None:
    print(f"rtl: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _train(cfg: DictConfig) -> float:
    from .train import run

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        row = run(cfg, out_dir)
    except Interrupted as err:
        print(f"rtl: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)  # the shell convention for "ended by signal N"
    except UserError as err:
        _fail(str(err))
    return float(row["test_auprc"])


def _report(argv: list[str]) -> None:
    from .report import report

    parser = argparse.ArgumentParser(prog="rtl report", description="Gather every run below DIR into tables.")
    parser.add_argument("dir", help="a run or sweep directory (searched recursively for results.csv)")
    args = parser.parse_args(argv)
    try:
        table = report(args.dir)
    except UserError as err:
        _fail(str(err))
    print(table)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    # Metric warnings (single-class labels) matter, but once per message is enough.
    warnings.simplefilter("once")
    logging.captureWarnings(True)
    if command == "train":
        sys.argv = ["rtl-train", *rest]  # Hydra reads its overrides from sys.argv
        # Let Hydra's own errors reach us, so they end as one message rather than a partial traceback.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            _train()
        except HydraException as err:
            _fail(str(err).strip())
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            _fail(f"cannot write{where}: {err.strerror or err}; choose a writable output folder with "
                  "hydra.run.dir=... (or hydra.sweep.dir=... for -m)")
    elif command == "report":
        _report(rest)
    else:
        _fail(f"unknown command '{command}': use one of train, report (rtl --help)")


if __name__ == "__main__":
    main()
