"""Does the CUDA path of rtl work, and does it keep the GPU busy? Run on a GPU machine, from the repository root:

    .venv/bin/python scripts/gpu_check.py                        # a few minutes on one recent GPU
    .venv/bin/python scripts/gpu_check.py --device cuda:1 --out gpu_check_runs   # keep the run folders

Each check ends PASS or FAIL with its numbers, in one Markdown table at the end (paste it into the README):
  no sync per step   engine.train_one_epoch on images held on the GPU. An epoch runs with
                     torch.cuda.set_sync_debug_mode("error") armed from the first batch to the last train step
                     (the epoch's deliberate reads of the loss total come after), so a sync inside the loop
                     raises and is reported with its line; then, under "warn", an epoch of N steps and one of
                     2N steps must show the same number of syncs. Once with runtime.amp=auto (bf16 on
                     Ampere and later), once with fp16 + GradScaler.
  bench              rtl bench model=dens_f at 224 px, batch 64, runtime.amp=auto: b/a >= 0.9.
  train bf16, fp16   a 2-epoch rtl train on small synthetic data: it finishes, in the precision asked for,
                     with finite losses.
  kill / resume      rtl train killed with SIGKILL as soon as epoch 1's last.pt exists, then run again: its
                     metrics.csv and test metrics equal an uninterrupted run's (cuDNN deterministic, no autotuning).
  rtl pretrain       one epoch of rtl pretrain model=cbr_small (224 px, batch 64, AMP) on a generated ImageFolder of
                     1,024 JPEGs of about 500x375, then rtl bench-pretrain on it with 8 workers: (p), (n), (m), loop.
Exit status: 0 every check passed, 1 one failed, 2 no GPU.

--cpu-dry-run runs the checks that need no GPU (train in bf16, kill / resume) on the CPU at toy sizes: it tests
this script, not the GPU path.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SYNC_MESSAGE = "called a synchronizing CUDA operation"
# Runs `rtl` in a fresh interpreter, first making cuDNN and torch pick deterministic kernels, so that a resumed
# run can be compared with an uninterrupted one number for number.
DETERMINISTIC_RTL = """
import sys, torch
torch.backends.cudnn.deterministic = True
torch.use_deterministic_algorithms(True, warn_only=True)
from rethink_tl.cli import main
main(sys.argv[1:])
"""


@dataclass
class Check:
    name: str
    ok: bool
    numbers: str


@dataclass
class Sizes:
    """What the checks train: real models on a GPU; toy ones for --cpu-dry-run."""

    model: tuple[str, ...] = ("model=dens_t1",)
    image_size: int = 128
    batch: int = 32
    sync_steps: int = 8
    samples: int = 1000  # rtl train runs
    resume_samples: int = 2000  # long enough an epoch that the kill lands before the run ends
    resume_epochs: int = 3


TOY = Sizes(model=("model=trunc", "model.cut=1"), image_size=32, batch=16, samples=240, resume_samples=600)


def fail_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


# --- no sync per step -------------------------------------------------------------------------------

def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class _ArmOnFirstBatch:
    """The training batcher, which switches the sync check on when the loop asks for its first batch."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if not self.armed:
            torch.cuda.set_sync_debug_mode("error")
            self.armed = True
        return self.inner(*args, **kwargs)


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "rethink_tl" in f.filename]
    inner = frames[-1] if frames else None
    parts = [f"{Path(f.filename).name}:{f.lineno} `{f.line}`" for f in (ours[-1:] if ours else []) + [inner] if f]
    return " via ".join(reversed(dict.fromkeys(parts)))


def sync_check(device: str, amp: str, sizes: Sizes) -> Check:
    from rethink_tl import engine
    from rethink_tl.data.base import Split
    from rethink_tl.data.renderer import generate_split
    from rethink_tl.models import build_model

    cfg = _compose([*sizes.model, f"data.image_size={sizes.image_size}", f"train.batch_size={sizes.batch}",
                    f"runtime.device={device}", f"runtime.amp={amp}", "init=random"])
    dev = engine.configure_device(cfg.runtime)
    precision = engine.resolve_precision(str(cfg.runtime.amp), dev)
    name = f"no sync per step ({precision.name})"
    torch.manual_seed(0)
    model = build_model(cfg.model, num_labels=2, image_size=sizes.image_size).to(
        dev, memory_format=torch.channels_last)
    batcher, _ = engine.make_batchers(model.info, cfg.train, cfg.runtime, dev)
    optimizer, _ = engine.make_optimizer(model, cfg.train)
    loss_fn = engine.masked_bce(None)
    n = sizes.sync_steps * sizes.batch  # whole batches only: one input shape, so cuDNN tunes once
    images, y = generate_split(2 * n, sizes.image_size, seed=0, prevalence=0.3)
    images = torch.from_numpy(images)[:, None].to(dev)  # on the GPU, as rtl train keeps a dataset that fits
    y = torch.from_numpy(y).float()

    def split(k: int) -> Split:
        return Split(images[:k], y[:k], torch.ones(y[:k].shape, dtype=torch.bool), [str(i) for i in range(k)])

    epoch = [0]

    def run_epoch(data: Split, batcher_=batcher) -> None:
        epoch[0] += 1
        engine.train_one_epoch(model, data, batcher_, optimizer, loss_fn, sizes.batch, 0,
                               engine.EpochProgress(epoch[0]), precision=precision)

    def warned_syncs(data: Split) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_epoch(data)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum(SYNC_MESSAGE in str(w.message) for w in caught)

    run_epoch(split(n))  # allocator, cuDNN autotuning: one-off costs that are not the loop's
    short, long = warned_syncs(split(n)), warned_syncs(split(2 * n))
    per_step = (long - short) / sizes.sync_steps
    counted = f"warn: {short} syncs per epoch of {sizes.sync_steps} steps, {long} of {2 * sizes.sync_steps}"

    # The error run goes last: an exception in the middle of a step leaves the optimizer (and scaler) mid-update.
    real_step, steps = engine.train_step, [0]

    def step_then_disarm(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps[0] += 1
        if steps[0] == sizes.sync_steps:
            torch.cuda.set_sync_debug_mode(0)  # the epoch's end reads the loss total on purpose
        return loss

    engine.train_step = step_then_disarm
    first_sync = ""
    try:
        run_epoch(split(n), _ArmOnFirstBatch(batcher))
    except RuntimeError as err:
        if SYNC_MESSAGE not in str(err):
            raise
        first_sync = _where(err)
    finally:
        engine.train_step = real_step
        torch.cuda.set_sync_debug_mode(0)
    if first_sync:
        return Check(name, False, f"error mode: a sync in step {steps[0] + 1} at {first_sync}; {counted}")
    return Check(name, per_step == 0,
                 f"error mode: none in {steps[0]} steps; {counted}" + (f" ({per_step:g} per step)" if per_step else ""))


# --- rtl in subprocesses ------------------------------------------------------------------------------

def rtl(args: list[str], deterministic: bool = False, stderr=None):
    """Run ``rtl`` to the end (``stderr=None``: captured), or start it with its stderr going to that file."""
    code = DETERMINISTIC_RTL if deterministic else "import sys\nfrom rethink_tl.cli import main\nmain(sys.argv[1:])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS is deterministic only with a fixed workspace
    cmd = [sys.executable, "-c", code, *args]
    if stderr is not None:
        # A file, not a pipe: nobody reads a pipe while the run goes on, and a full one would stall it.
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def bench_check(device: str, out: Path) -> Check:
    import pandas as pd

    name = "rtl bench dens_f 224 px b64"
    proc = rtl(["bench", "model=dens_f", "data.image_size=224", "train.batch_size=64", "bench.steps=20",
                "runtime.amp=auto", f"runtime.device={device}", "runtime.progress=false",
                f"hydra.run.dir={out / 'bench'}"])
    if proc.returncode != 0:
        return Check(name, False, f"exit {proc.returncode}: {last_error(proc.stderr)}")
    r = pd.read_csv(out / "bench" / "bench.csv").iloc[0]
    numbers = (f"{r.precision}: (a) {r.a_bare_ips:.0f}, (b) {r.b_loop_ips:.0f}, (c) {r.c_naive_ips:.0f} images/s "
               f"[{r.c_precision}, {r.c_timed_batches} batches]; b/a {r.b_over_a:.3f}, b/c {r.b_over_c:.2f}; "
               f"eval {r.eval_ips:.0f} images/s; peak GB a/b/c {r.a_peak_gb:.2f}/{r.b_peak_gb:.2f}/{r.c_peak_gb:.2f}; "
               f"data on GPU: {bool(r.b_data_on_device)}")
    return Check(name, bool(r.b_over_a >= 0.9 and r.b_data_on_device), numbers)


def train_args(sizes: Sizes, device: str, amp: str, run_dir: Path, samples: int, epochs: int, *extra: str) -> list[str]:
    return ["train", *sizes.model, "init=random", f"data.image_size={sizes.image_size}", f"data.num_samples={samples}",
            "data.prevalence=0.3", "data.test_prevalence=0.3", f"train.epochs={epochs}",
            f"train.batch_size={sizes.batch}", "train.lr=1e-3", f"runtime.device={device}", f"runtime.amp={amp}",
            "runtime.progress=false", *extra, f"hydra.run.dir={run_dir}"]


def train_check(device: str, amp: str, sizes: Sizes, out: Path) -> Check:
    import pandas as pd

    name = f"rtl train 2 epochs {amp}"
    run_dir = out / f"train_{amp}"
    t0 = time.perf_counter()
    proc = rtl(train_args(sizes, device, amp, run_dir, sizes.samples, 2))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return Check(name, False, f"exit {proc.returncode}: {last_error(proc.stderr)}")
    metrics, results = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(run_dir / "results.csv").iloc[0]
    losses = metrics.train_loss.tolist()
    finite = len(losses) == 2 and all(math.isfinite(v) for v in losses)
    numbers = (f"{results.precision} on {results.device}; loss {' -> '.join(f'{v:.4f}' for v in losses)}; "
               f"val AUROC {metrics.val_auroc.iloc[-1]:.3f}; epoch {metrics.seconds.mean():.1f} s; run {seconds:.0f} s")
    return Check(name, bool(finite and results.precision == amp), numbers)


def pretrain_check(device: str, out: Path, dry: bool) -> Check:
    """One epoch of rtl pretrain model=cbr_small on a generated ImageFolder, and rtl bench-pretrain on it."""
    import json

    import pandas as pd

    from rethink_tl.bench.folders import make_imagefolder

    name = "rtl pretrain cbr_small 1 epoch + bench-pretrain"
    per_class = 8 if dry else 128  # bench-pretrain reads 1 + bench.batches batches of one epoch
    folder = make_imagefolder(out / "imagefolder", train_per_class=per_class, val_per_class=max(2, per_class // 8),
                              sizes=((500, 375), (375, 500), (500, 333)))
    size, batch = (121, 16) if dry else (224, 64)
    run_dir = out / "pretrain"
    common = ["model=cbr_small", f"data.root={folder}", f"data.image_size={size}",
              f"data.val_resize={size * 8 // 7}", f"recipe.batch_size={batch}", f"runtime.device={device}",
              "runtime.progress=false"]
    t0 = time.perf_counter()
    proc = rtl(["pretrain", *common, "recipe.epochs=1", "recipe.warmup_epochs=0", "runtime.install=false",
                f"hydra.run.dir={run_dir}"])
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return Check(name, False, f"pretrain exit {proc.returncode}: {last_error(proc.stderr)}")
    hist, meta = pd.read_csv(run_dir / "pretrain.csv"), json.loads((run_dir / "weights.json").read_text())
    proc = rtl(["bench-pretrain", *common, f"bench.batches={2 if dry else 8}", f"bench.steps={2 if dry else 20}",
                f"runtime.workers={1 if dry else 8}",
                f"hydra.run.dir={out / 'bench_pretrain'}"])
    if proc.returncode != 0:
        return Check(name, False, f"bench-pretrain exit {proc.returncode}: {last_error(proc.stderr)}")
    b = pd.read_csv(out / "bench_pretrain" / "bench_pretrain.csv").iloc[0]
    row = hist.iloc[0]
    numbers = (f"{meta['precision']} on {meta['device']}; {8 * per_class} images, loss {row.train_loss:.3f}, "
               f"{row.img_per_s:.0f} img/s in the epoch, run {seconds:.0f} s; bench: p {b.p_img_s:.0f} "
               f"({b.p_img_s_per_worker:.0f}/worker), n {b.n_img_s:.0f}, m {b.m_img_s:.0f}, loop {b.loop_img_s:.0f} "
               f"img/s, p/n {b.p_over_n:.2f}, loop/min(p, m) {b.loop_over_min_p_m:.2f}")
    return Check(name, bool(math.isfinite(row.train_loss) and meta["precision"] != "fp32" or dry), numbers)


def compare_runs(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two run folders hold the same metrics (the wall-clock column aside), and the largest difference."""
    import pandas as pd

    ma, mb = (pd.read_csv(p / "metrics.csv").drop(columns=["seconds"]) for p in (a, b))
    keys = ["test_auroc", "test_auprc", "val_auprc", "best_epoch"]
    ra, rb = (pd.read_csv(p / "results.csv")[keys] for p in (a, b))
    if list(ma.columns) != list(mb.columns) or len(ma) != len(mb):
        return False, f"metrics.csv differ in shape: {ma.shape} vs {mb.shape}"
    numeric = ma.select_dtypes("number").columns
    diff = max(float((ma[numeric] - mb[numeric]).abs().max().max()), float((ra - rb).abs().max().max()))
    if ma.equals(mb) and ra.equals(rb):
        return True, f"{len(ma)} epochs identical"
    return False, f"{len(ma)} epochs, largest difference {diff:.3g}"


def resume_check(device: str, sizes: Sizes, out: Path) -> Check:
    name = "kill / resume"
    amp = "auto" if device.startswith("cuda") else "off"

    def args(run_dir: Path) -> list[str]:
        return train_args(sizes, device, amp, run_dir, sizes.resume_samples, sizes.resume_epochs,
                          "runtime.cudnn_benchmark=false")

    reference, killed = out / "resume_reference", out / "resume_killed"
    proc = rtl(args(reference), deterministic=True)
    if proc.returncode != 0:
        return Check(name, False, f"reference run: exit {proc.returncode}: {last_error(proc.stderr)}")
    log = out / "resume_killed.stderr"
    with open(log, "w") as stderr:
        running = rtl(args(killed), deterministic=True, stderr=stderr)
        deadline = time.time() + 600
        while not (killed / "last.pt").exists() and running.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if running.poll() is not None:
            return Check(name, False, f"the run ended (exit {running.returncode}) before it could be killed: "
                                      f"{last_error(log.read_text())}")
        os.kill(running.pid, signal.SIGKILL)
        running.wait()
    if not (killed / "last.pt").exists():
        return Check(name, False, "no last.pt after 600 s: epoch 1 never finished")
    epochs_done = len(torch.load(killed / "last.pt", weights_only=True)["history"])
    proc = rtl(args(killed), deterministic=True)
    if proc.returncode != 0:
        return Check(name, False, f"resumed run: exit {proc.returncode}: {last_error(proc.stderr)}")
    same, how = compare_runs(reference, killed)
    return Check(name, same, f"SIGKILL after epoch {epochs_done} of {sizes.resume_epochs}, resumed: {how}")


# --- the table ----------------------------------------------------------------------------------------

def table(header: str, checks: list[Check]) -> str:
    rows = [header, "", "| check | result | numbers |", "|---|---|---|"]
    rows += [f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.numbers} |" for c in checks]
    return "\n".join(rows)


def gpu_header(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return (f"GPU check: {props.name} ({device}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the CUDA path of rtl on this machine's GPU; prints one table.")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda, the current GPU)")
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when it finds no driver; the line below says it once
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.cpu_dry_run:
        device, sizes, header = "cpu", TOY, f"GPU check, CPU dry run: torch {torch.__version__}"
    else:
        if gpus == 0:
            print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False): run it on a GPU machine",
                  file=sys.stderr)
            return 2
        suffix = args.device.partition(":")[2]
        index = int(suffix) if suffix.isdigit() else 0 if args.device == "cuda" else -1
        if args.device not in ("cuda", f"cuda:{index}") or not 0 <= index < gpus:
            print(f"gpu_check: --device {args.device} is not one of this machine's {gpus} GPU(s): use cuda or "
                  f"cuda:0 ... cuda:{gpus - 1}", file=sys.stderr)
            return 2
        device, sizes = f"cuda:{index}", Sizes()
        header = gpu_header(torch.device(device))

    with tempfile.TemporaryDirectory(prefix="rtl-gpu-check-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        runs = []
        if not args.cpu_dry_run:
            runs += [(f"no sync per step ({amp})", lambda amp=amp: sync_check(device, amp, sizes))
                     for amp in ("auto", "fp16")]
            runs.append(("rtl bench dens_f 224 px b64", lambda: bench_check(device, out)))
        runs += [(f"rtl train 2 epochs {amp}", lambda amp=amp: train_check(device, amp, sizes, out))
                 for amp in (("bf16", "fp16") if not args.cpu_dry_run else ("bf16",))]
        runs.append(("kill / resume", lambda: resume_check(device, sizes, out)))
        runs.append(("rtl pretrain", lambda: pretrain_check(device, out, args.cpu_dry_run)))
        checks = []
        for name, run in runs:
            t0 = time.perf_counter()
            try:
                check = run()
            except Exception as err:  # noqa: BLE001  (a check that crashes is a failed check; the others still run)
                check = Check(name, False, f"crashed: {fail_line(err)} at {_where(err)}")
            print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            checks.append(check)
    print()
    print(table(header, checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
