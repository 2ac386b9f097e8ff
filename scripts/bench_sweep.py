"""Parallel local runs, measured: the same small sweep one job at a time and N jobs at once (hydra/launcher=joblib
with the device pool), wall time of each and whether their results are the same.

    .venv/bin/python scripts/bench_sweep.py                       # 4 runs; 1 job x 1 thread vs 2 jobs x 1 thread
    .venv/bin/python scripts/bench_sweep.py --jobs 4 --gpu        # on a GPU machine: 1, 2 and 4 jobs on one GPU

Prints one Markdown table. On a GPU (--gpu) the runs use runtime.device=auto and runtime.jobs_per_device=N, so the
N jobs share the GPU; images/s in total is the sum of the runs' training images over the sweep's wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

RTL = shutil.which("rtl") or str(Path(sys.executable).parent / "rtl")
SWEEP = ["model=lite0_t2", "data=synthetic", "data.image_size=64", "data.num_samples=1200", "train.epochs=3",
         "train.batch_size=32", "train.lr=1e-3,3e-3", "train.seed=0,1", "init=random", "runtime.progress=false"]
METRICS = ("best_epoch", "val_auroc", "val_auprc", "test_auroc", "test_auprc")


def sweep(folder: Path, jobs: int, gpu: bool) -> tuple[float, pd.DataFrame]:
    args = [*SWEEP, f"hydra.sweep.dir={folder}"]
    if gpu:
        args += ["runtime.device=auto", f"runtime.jobs_per_device={jobs}"]
    else:
        args += ["runtime.device=cpu", "runtime.threads=1"]
    if jobs > 1:
        args += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    t0 = time.perf_counter()
    proc = subprocess.run([RTL, "train", "-m", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"sweep with {jobs} job(s) failed:\n{proc.stderr[-3000:]}")
    rows = [pd.read_csv(p).iloc[0] for p in sorted(folder.rglob("results.csv"))]
    table = pd.DataFrame(rows).sort_values(["train_lr" if "train_lr" in rows[0] else "lr", "seed"])
    return seconds, table.reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="the most jobs at once (also measured: 1, 2, 4 up to it)")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (device pool) instead of the CPU")
    args = parser.parse_args()
    counts = sorted({1, *[n for n in (2, 4, 8) if n <= args.jobs], args.jobs})
    with tempfile.TemporaryDirectory() as tmp:
        measured = {n: sweep(Path(tmp) / f"jobs{n}", n, args.gpu) for n in counts}
    base_seconds, base = measured[1]
    print("| jobs at once | wall s | speed-up | images/s in total | results equal to one at a time |")
    print("|---|---|---|---|---|")
    for n, (seconds, table) in measured.items():
        images = float((table["images_per_s"] * table["train_seconds"]).sum())
        equal = all((table[m] == base[m]).all() for m in METRICS)
        print(f"| {n} | {seconds:.1f} | {base_seconds / seconds:.2f} | {images / seconds:.0f} | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
