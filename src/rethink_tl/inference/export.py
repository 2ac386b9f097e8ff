"""``rtl export``: a finished run's best checkpoint as a file that other programs run, with its model card.

    rtl export runs/covid/dens_t1/pretrained/f1/s0-1a2b3c4d --format onnx --out dens_t1_covid.onnx

The file holds the classifier followed by its sigmoid: it takes the preprocessed image tensor, float32
(N, C, S, S) with any N, and gives the probabilities (N, L), one per label, as ``predictions.csv.gz`` holds them.
Beside it go ``MODEL_CARD.md`` (what the model is, what it was trained and tested on, its test metrics with 95%
intervals, its external results, what it is for, and that it is not for clinical use) and
``<stem>.preprocessing.json`` (how an image file becomes that tensor, and what comes out), both built from the
run's own files only.

Nothing is written unless the exported file agrees with best.pt: both score up to ``MAX_CHECK`` of the run's
own test images (rebuilt from its config, fingerprint checked), in a batch of one and batches of ``CHECK_BATCH``,
and the largest difference of a probability must be at most ``TOLERANCE``. The preprocessing spec is checked the
same way: applied as written (numpy) to those images, it must give the tensor rtl's own pipeline gives. The three
files are staged beside their targets and renamed into place together; a refusal or a failure leaves none of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import __version__, atomic_io, runfiles as rf
from ..data import DataBundle, dataset, trained_channels
from ..data.images import ImageSpec
from ..errors import UserError
from ..evidence import predictions
from ..evidence.predictions import SplitPredictions
from ..evidence.results import label_names
from ..evidence.stats import LEVEL, RESAMPLES, SEED, STAT_METRICS, Holdout, Interval, Scored, TooFewImages, bootstrap
from ..metrics import METRIC_NAMES, score
from .finished import FinishedRun, eval_batcher, one_run, rebuild_data
from .predict import decoding

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}  # --format -> the default model file's suffix
INSTALL = "pip install 'rethink-tl[export]'"
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # onnxscript: torch.onnx.export(dynamo=True) translates with it
OPSET = 18  # the oldest opset torch 2.14's exporter implements natively (older ones go through a converter)
TOLERANCE = 1e-4  # largest allowed |probability of the file - probability of best.pt|
SPEC_TOLERANCE = 1e-5  # largest allowed |spec applied with numpy - rtl's Batcher| on the normalised input
MAX_CHECK = 256  # test images scored by both models (the first ones of the split)
# largest allowed |best.pt here - the run's recorded test probability|: other devices and kernels round otherwise
# (1e-3 at most between a GPU and a CPU), while other images or another image size move them by tenths
RECORDED_TOLERANCE = 1e-2
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
CHECK_BATCH = 32
INPUT, OUTPUT = "image", "probabilities"
SPEC_FORMAT = "rtl-preprocessing/1"
NOT_CLINICAL = ("**Not for clinical use.** This model is a research artefact of an experiment on transfer learning. "
                "It has not been validated for diagnosis, screening or triage, nor cleared or approved by any "
                "regulator; it must not inform the care of a patient.")


# --- what goes where -------------------------------------------------------------------------------------------

@dataclass
class Targets:
    model: Path
    card: Path
    spec: Path

    def all(self) -> list[Path]:
        return [self.model, self.card, self.spec]


def check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not supported: choose one of {', '.join(FORMATS)}")
    return fmt


def check_dependencies(fmt: str) -> None:
    """The optional packages the format needs, imported (an ImportError becomes one message naming the extra)."""
    if fmt != "onnx":
        return
    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                        f"installed: {INSTALL}")


def targets(run_path: Path, fmt: str, out: Optional[str], force: bool) -> Targets:
    """The model file (``out``, default RUN_DIR/export/<format>/model<suffix>), the card and the spec beside it;
    UserError for a place that cannot take them or files there that only --force replaces."""
    if out is None:
        model = run_path / rf.EXPORT_DIR / fmt / f"{rf.EXPORT_STEM}{FORMATS[fmt]}"
    else:
        model = Path(out)
        if model.is_dir() or out.endswith(("/", os.sep)):
            raise UserError(f"--out {out} is a folder: give the model file's name, e.g. --out "
                            f"{model / (rf.EXPORT_STEM + FORMATS[fmt])}")
        if not model.parent.is_dir():
            raise UserError(f"--out {out}: the folder {model.parent} does not exist; create it first")
        if fmt == "onnx" and model.suffix.lower() != ".onnx":
            raise UserError(f"--out {out}: an ONNX file's name ends in .onnx (e.g. --out {model.with_suffix('.onnx')})")
        if fmt != "onnx" and model.suffix.lower() == ".onnx":
            raise UserError(f"--out {out} ends in .onnx, but --format is {fmt}: name it {model.with_suffix('.pt')}, "
                            "or pass --format onnx")
        if fmt == "torchscript" and model.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
            raise UserError(f"--out {out}: a TorchScript file's name ends in {' or '.join(TORCHSCRIPT_SUFFIXES)} (e.g. "
                            f"--out {model.with_suffix('.pt')})")
    found = Targets(model, model.parent / rf.MODEL_CARD, model.with_name(model.stem + rf.PREPROCESSING_SUFFIX))
    if found.model.parent.resolve() == run_path.resolve():  # --force would replace best.pt, results.csv, ...
        raise UserError(f"--out {out}: the export goes beside the run's own files, not among them: choose another "
                        f"folder (the default is {run_path / rf.EXPORT_DIR / fmt})")
    run_files = [n for n in (*rf.TRAIN_STARTED, *rf.PRETRAIN_FILES) if (found.model.parent / n).exists()]
    if run_files:  # another run's folder: --force would replace its best.pt, results.csv, ...
        raise UserError(f"--out {out}: {found.model.parent} is an rtl run's folder (it holds {run_files[0]}): the "
                        "export cannot go among a run's files; choose another folder")
    others = _other_exports(found)
    if others:  # one MODEL_CARD.md per folder: it would describe this model, beside the other one
        raise UserError(f"--out {out}: {found.model.parent} holds another export ({others[0]}) whose "
                        f"{rf.MODEL_CARD} this one would replace, even with --force: choose another folder")
    there = [p for p in found.all() if p.exists() or p.is_symlink()]
    if there and not force:
        raise UserError(f"{', '.join(map(str, there))} exist{'s' if len(there) == 1 else ''}: choose another --out, "
                        "or pass --force to replace")
    folders = [p for p in there if p.is_dir()]
    if folders:
        raise UserError(f"{folders[0]} is a folder: the export cannot replace it; choose another --out")
    return found


def _other_exports(found: Targets) -> list[str]:
    """Model files of other exports in the target folder: named by a spec there (``model_file``) and still there."""
    out = []
    for spec in sorted(found.model.parent.glob(f"*{rf.PREPROCESSING_SUFFIX}")):
        try:
            name = json.loads(spec.read_text()).get("model_file")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name != found.model.name and (found.model.parent / name).exists():
            out.append(name)
    return out


# --- the file --------------------------------------------------------------------------------------------------

class Probabilities(nn.Module):
    """The classifier and its sigmoid: what the exported file computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image))


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, log whole graphs when torch.export fails and warn of their own deprecation:
    none of that is the user's business, the verification says whether the file is right."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """(the ONNX file, which exporter made it). torch.export's exporter first (dynamo=True, onnxscript)."""
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    try:
        with _quiet():
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=dynamic)
        return program.model_proto.SerializeToString(), "torch.onnx.export(dynamo=True)"
    except torch.onnx.OnnxExporterError as err:
        first = err.__cause__ or err  # the exporter's own text is a page of advice; its cause says what failed
    # torch.export refuses what it cannot trace symbolically (Python branches on tensor values, some custom ops);
    # the older TorchScript-based exporter records the path one example takes instead. That may not hold for every
    # input, so it is only the fallback, and the verification that follows decides whether its file is kept.
    buf = io.BytesIO()
    try:
        with _quiet():
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    except Exception as err:  # noqa: BLE001  (the exporter raises many kinds for an op it cannot express)
        raise UserError(f"the model cannot be exported to ONNX: torch.export failed ({_first_line(first)}), and so did "
                        f"the TorchScript-based exporter ({_first_line(err)}); try --format torchscript") from None
    return buf.getvalue(), f"torch.onnx.export(dynamo=False), as torch.export failed ({_first_line(first)})"


def with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    """The ONNX file with ``props`` in its metadata_props (what a runtime shows of a model)."""
    import onnx

    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, props)
    return proto.SerializeToString()


def torchscript_bytes(module: nn.Module, example: torch.Tensor, extra: dict[str, str]) -> tuple[bytes, str]:
    """(the TorchScript file, how it was made). Traced: scripting fails on timm's and torchvision's Python;
    torch 2.14 calls torch.jit deprecated (a FutureWarning), but its files load in every torch since 1.x."""
    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.jit.save(torch.jit.trace(module, example, check_trace=False), buf, _extra_files=extra)
    return buf.getvalue(), "torch.jit.trace"


def runner(fmt: str, data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """The exported file, loaded back by its own runtime: float32 input (N, C, S, S) -> probabilities (N, L)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same share of the CPU as torch has
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT], {INPUT: x})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation (torchscript_bytes)
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def runtime_name(fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
    return f"torch.jit.load, torch {torch.__version__} (CPU)"


# --- the preprocessing, as a spec ------------------------------------------------------------------------------

GEOMETRY = {
    "crop": "scale the short side to {s} px (Pillow, bicubic), then keep the centre {s} x {s} square "
            "(PIL.ImageOps.fit, centring 0.5, no bleed)",
    "pad": "scale the long side to {s} px (Pillow, bicubic), then pad the short side with black (0) equally on both "
           "sides to {s} x {s} (PIL.ImageOps.pad, centring 0.5)",
    "stretch": "resize to {s} x {s} px ignoring the aspect ratio (Pillow, bicubic)",
}
WIDE = {
    "minmax": "samples wider than 8 bits (16-bit, 32-bit integer or float images) are mapped from the image's own "
              "min..max onto 0..255: round((v - min) * 255 / (max - min)), a constant image becoming 0",
    "full": "samples wider than 8 bits are divided by 257 (v * 255 / 65535, rounded; float images use their own "
            "min..max)",
}
LUMA = "ITU-R 601-2 luma, Pillow's convert('L'): L = (299 R + 587 G + 114 B) / 1000"


def channel_rules(decoded: Optional[int], channels: int) -> tuple[str, str]:
    """(what a grey image becomes, what a colour image becomes) at the model's input of ``channels`` channels, for
    a run that decoded its images with ``decoded`` channels (None: cannot be told any more). engine.Batcher's rule:
    one stored channel is repeated into 3; 3 stored channels for a one-channel model are averaged."""
    if channels == 1:
        grey = "its grey level in the one input channel"
        to_one = "the mean of R, G and B (each / 255) in the one input channel"
    else:
        grey = f"its grey level repeated in all {channels} input channels (R = G = B)"
        to_one = ""
    if decoded == 3:
        colour = to_one or f"R, G and B in the {channels} input channels, in that order"
    elif decoded == 1:
        colour = f"converted to grey first ({LUMA}), then as a grey image: the run decoded every image as grey"
    else:
        colour = ("not known: the run resolved data.channels=auto on training images that can no longer be read; "
                  "rtl predict asks --channels for such a run")
    return grey, colour


def preprocessing_spec(run: FinishedRun, labels: list[str]) -> dict[str, Any]:
    """How an image file becomes the exported model's input, and what comes out (module docstring)."""
    info = run.model.info
    channels = int(getattr(info, "in_chans", 3))
    mean, std = [float(v) for v in info.mean], [float(v) for v in info.std]
    mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
    if len(mean) != channels or len(std) != channels:
        raise RuntimeError(f"model {info.name}: {channels} input channels but mean {info.mean} and std {info.std}")
    decoded = trained_channels(run.cfg.data)
    grey, colour = channel_rules(decoded, channels)
    spec: ImageSpec = decoding(run.cfg.data, decoded or 1)
    size = int(run.image_size)
    from_files = "resize" in run.cfg.data  # datasets of image files have the decoding keys; arrays do not
    steps = [
        "read the file with Pillow and turn it by its EXIF orientation (PIL.ImageOps.exif_transpose); JPEG files "
        f"are opened in draft mode first, img.draft('{'L' if spec.channels == 1 else 'RGB'}', ({size}, {size})) "
        "(libjpeg may decode at 1/2, 1/4 or 1/8 scale), as rtl does",
        "DICOM files (.dcm, .dicom or the DICM marker): pixels through the modality LUT and the VOI window "
        f"data.dicom_window={spec.dicom_window}, MONOCHROME1 inverted (rethink_tl/data/dicom.py)",
        "8-bit samples are kept; " + WIDE[spec.rescale16],
        f"to one grey channel ({LUMA})" if spec.channels == 1 else
        "to RGB (Pillow's convert('RGB'): a grey image's level in R, G and B)",
        GEOMETRY[spec.resize].format(s=size),
        f"channels: a grey image gives {grey}; a colour image is {colour}",
        "x = pixel / 255 (float32, 0..1), then per input channel c: (x - mean[c]) / std[c]",
        f"stack the images into a float32 array (N, {channels}, {size}, {size}), N any batch size",
    ]
    return {
        "format": SPEC_FORMAT,
        "labels": list(labels),
        "input": {"name": INPUT, "dtype": "float32", "layout": "NCHW", "shape": ["N", channels, size, size]},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["N", len(labels)], "labels": list(labels),
                   "meaning": "sigmoid probabilities, one per label in the order of labels, each in [0, 1] and "
                              "independent of the others (multi-label: they need not sum to 1); no further step"},
        "image_size": size,
        "decode": {"library": "Pillow", "exif_transpose": True, "jpeg_draft": True, "channels": spec.channels,
                   "grey_conversion": LUMA, "rescale16": spec.rescale16, "rescale16_rule": WIDE[spec.rescale16],
                   "dicom_window": spec.dicom_window, "dicom_frame": spec.dicom_frame,
                   "trained_on": ("image files, decoded this way" if from_files else
                                  f"arrays of {run.cfg.data.kind} data already at {size} px; image files are decoded "
                                  "this way (the schema's defaults, as rtl predict does)")},
        "geometry": {"resize": spec.resize, "resample": "bicubic", "size": size,
                     "rule": GEOMETRY[spec.resize].format(s=size)},
        "scaling": {"from": "uint8", "divide_by": 255.0},
        "normalisation": {"mean": mean, "std": std, "rule": "(x - mean[c]) / std[c] per input channel c"},
        "channels": {"input_channels": channels, "decoded_channels": decoded, "grey_images": grey,
                     "colour_images": colour},
        "steps": steps,
    }


def apply_spec(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """The spec's scaling, channels and normalisation applied to decoded uint8 images (N, 1 or 3, S, S)."""
    x = images.astype(np.float32) / np.float32(spec["scaling"]["divide_by"])
    channels = spec["channels"]["input_channels"]
    if x.shape[1] == 1 and channels > 1:
        x = np.repeat(x, channels, axis=1)
    elif x.shape[1] == 3 and channels == 1:
        x = x.mean(axis=1, keepdims=True)
    if x.shape[1] != channels:
        raise RuntimeError(f"{x.shape[1]}-channel images for a {channels}-channel model")
    mean = np.asarray(spec["normalisation"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["normalisation"]["std"], np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


# --- the checks ------------------------------------------------------------------------------------------------

@dataclass
class Verification:
    images: int  # test images scored by both
    of: int  # test images of the run
    max_abs_diff: float  # exported file vs best.pt
    vs_recorded: float  # best.pt here vs the run's predictions.csv.gz (information: other devices round otherwise)
    spec_diff: float  # the spec applied with numpy vs rtl's pipeline
    batch_sizes: list[int]
    runtime: str


def verify(fmt: str, data: bytes, module: nn.Module, run: FinishedRun, spec: dict[str, Any], bundle: DataBundle,
           test: SplitPredictions) -> Verification:
    """Score the first MAX_CHECK test images with the file and with best.pt; UserError beyond TOLERANCE."""
    split = bundle.test
    n = min(MAX_CHECK, len(split))
    images = split.images[:n]
    batcher = eval_batcher(run.model)
    with torch.no_grad():
        x = batcher(images).contiguous().numpy()
    spec_diff = float(np.abs(apply_spec(spec, images.numpy()).astype(np.float64) - x).max())
    if spec_diff > SPEC_TOLERANCE:
        raise RuntimeError(f"the preprocessing spec gives inputs {spec_diff:.2e} away from rtl's pipeline: the spec "
                           "does not describe what engine.Batcher does")
    run_file = runner(fmt, data)
    chunks = [slice(0, 1)] + [slice(i, min(i + CHECK_BATCH, n)) for i in range(0, n, CHECK_BATCH)]
    diff, sizes = 0.0, set()
    reference = np.zeros((n, len(run.labels)), np.float32)
    for part in chunks:
        with torch.no_grad():
            want = module(torch.from_numpy(x[part])).numpy()
        got = run_file(np.ascontiguousarray(x[part]))
        if got.shape != want.shape:
            raise UserError(f"the exported file gives outputs of shape {got.shape} for a batch of {want.shape[0]}, "
                            f"best.pt {want.shape}: nothing was written; try the other --format")
        diff = max(diff, float(np.abs(got.astype(np.float64) - want).max()))
        reference[part] = want
        sizes.add(part.stop - part.start)
    if not diff <= TOLERANCE:  # a NaN output fails too
        raise UserError(f"the exported {fmt} file differs from best.pt by {diff:.2e} in a probability on the run's "
                        f"test images (at most {TOLERANCE:g} is allowed): nothing was written; try the other --format")
    where = {i: k for k, i in enumerate(test.ids)}
    rows = [where[i] for i in split.ids[:n]]
    recorded = float(np.abs(test.probs[rows].astype(np.float64) - reference).max())
    if not recorded <= RECORDED_TOLERANCE:
        # The fingerprint covers ids, labels and masks, not pixels: images replaced under the same names, or a
        # config.yaml edited since (another image size), show here, as best.pt scoring other inputs.
        raise UserError(f"best.pt scores the run's test images up to {recorded:.3g} away from the probabilities the "
                        f"run recorded (predictions.csv.gz; at most {RECORDED_TOLERANCE:g} is allowed): the images or "
                        f"{rf.CONFIG} changed since the run, so its card would state numbers of other inputs; restore "
                        "them, or train the run again (runtime.force=true)")
    return Verification(n, len(split), diff, recorded, spec_diff, sorted(sizes), runtime_name(fmt))


def check_predictions(run: FinishedRun, bundle: DataBundle) -> tuple[predictions.Predictions, SplitPredictions]:
    """The run's predictions file, checked to be its own: its labels, its test images, its results.csv back."""
    pred = predictions.read(run.path / rf.PREDICTIONS)
    if pred.label_names != run.labels:
        raise UserError(f"{pred.path} names labels {pred.label_names}, the model {run.labels}: the file is not this "
                        "run's; run it again with runtime.force=true")
    test = pred.split("test")
    if sorted(test.ids) != sorted(bundle.test.ids):
        raise UserError(f"{pred.path} holds other test images than the run's rebuilt test split: the file is not this "
                        "run's; run it again with runtime.force=true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a label with one class: NaN here and in results.csv alike
        got = score(test.labels, test.probs, run.labels, mask=test.mask)
    for m in STAT_METRICS:
        want = float(run.row.get(f"test_{m}", np.nan))
        if not (np.isclose(got.macro[m], want, rtol=0, atol=1e-9) or (np.isnan(got.macro[m]) and np.isnan(want))):
            raise UserError(f"{pred.path} gives test {m} {got.macro[m]:.6f}, but {rf.RESULTS} says {want:.6f}: the "
                            "file is not this run's; run it again with runtime.force=true")
    return pred, test


# --- the numbers of the card -----------------------------------------------------------------------------------

@dataclass
class Evidence:
    """Point values with 95% intervals (per label and macro) on one set of images, or why there is no interval."""

    where: str
    units: str  # "60 images", "30 patients"
    intervals: dict[tuple[Optional[str], str], Interval] = field(default_factory=dict)  # (label | None, metric)
    missing: dict[Optional[str], str] = field(default_factory=dict)  # label | None -> why no interval

    def cell(self, label: Optional[str], metric: str, value: float) -> str:
        iv = self.intervals.get((label, metric))
        if value is None or np.isnan(value):
            return "- (undefined)"
        if iv is None or np.isnan(iv.low):
            return f"{value:.4f}"
        return f"{value:.4f} [{iv.low:.4f}, {iv.high:.4f}]"


def evidence(sp: SplitPredictions, labels: list[str], where: str) -> Evidence:
    """rtl report's intervals (evidence.stats.bootstrap: patients as units where known, BCa widened for small
    samples, RESAMPLES resamples with SEED) of the macro metrics and of each label's."""
    whole = Holdout.of(sp.labels, sp.mask, labels, sp.patients, where)
    ev = Evidence(where, f"{whole.n_units} {whole.unit_kind}")
    rows = [("mean", m, 0) for m in STAT_METRICS]
    parts: list[tuple[Optional[str], Holdout, np.ndarray]] = [(None, whole, sp.probs)]
    if len(labels) > 1:
        parts += [(lab, Holdout.of(sp.labels[:, [j]], sp.mask[:, [j]], [lab], sp.patients, where), sp.probs[:, [j]])
                  for j, lab in enumerate(labels)]
    for label, holdout, probs in parts:
        try:
            got = bootstrap(holdout, [Scored(label or "macro", {0: probs})], rows, RESAMPLES, SEED)
        except TooFewImages as err:
            ev.missing[label] = str(err)
            continue
        ev.intervals.update({(label, m): iv for m, iv in zip(STAT_METRICS, got)})
    return ev


def class_counts(bundle: DataBundle, pred: predictions.Predictions, labels: list[str]) -> list[dict[str, Any]]:
    """Per split and label: images, positives, negatives and unknown (mask 0). Train from the rebuilt data (the run
    keeps no predictions of it), val and test from predictions.csv.gz, which must agree with the rebuilt data."""
    rows = []
    for name, split in bundle.splits().items():
        y, mask = split.labels.numpy() > 0.5, split.mask.numpy()
        if name != "train":
            kept = pred.split(name)
            y_kept, m_kept = kept.labels > 0.5, kept.mask
            if len(kept) != len(split) or ((y_kept & m_kept).sum(0) != (y & mask).sum(0)).any() or \
                    (m_kept.sum(0) != mask.sum(0)).any():
                raise UserError(f"{pred.path}: its {name} labels are not those of the rebuilt data: the file is not "
                                "this run's; run it again with runtime.force=true")
            y, mask = y_kept, m_kept
        for j, label in enumerate(labels):
            pos = int((y[:, j] & mask[:, j]).sum())
            known = int(mask[:, j].sum())
            rows.append({"split": name, "images": len(y), "label": label, "positives": pos,
                         "negatives": known - pos, "unknown": len(y) - known})
    return rows


@dataclass
class External:
    name: str
    row: dict[str, Any]
    record: dict[str, Any]
    evidence: Optional[Evidence]


def externals(run: FinishedRun) -> tuple[list[External], list[str]]:
    """rtl evaluate's results of this run (RUN_DIR/external/<name>/), with intervals from their predictions; notes
    on those left out (unreadable, or made from a checkpoint the run has replaced since)."""
    found, notes = [], []
    root = run.path / rf.EXTERNAL_DIR
    for results in sorted(root.glob(f"*/{rf.RESULTS}")) if root.is_dir() else []:
        folder = results.parent
        try:
            row = pd.read_csv(results, float_precision="round_trip").iloc[0].to_dict()
            record = json.loads((folder / rf.EXTERNAL_MARK).read_text())
        except (OSError, ValueError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            notes.append(f"external/{folder.name}: left out, its files cannot be read ({_first_line(err)})")
            continue
        if str(row.get("source_finished")) != str(run.row.get("finished")):
            notes.append(f"external/{folder.name}: left out, it scored the checkpoint of a run that finished "
                         f"{row.get('source_finished')}; this run was trained again since: run rtl evaluate again")
            continue
        scored = label_names(row.keys())
        ev = None
        try:
            ext = predictions.read(folder / rf.PREDICTIONS)
            ev = evidence(ext.split("external"), ext.label_names, "external set")
        except UserError as err:
            notes.append(f"external/{folder.name}: no intervals ({err})")
        found.append(External(folder.name, {**row, "_labels": scored}, record, ev))
    return found, notes


# --- the card --------------------------------------------------------------------------------------------------

def _value(row: dict[str, Any], key: str, default: str = "-") -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "":
        return default
    return str(v)


def where_from(data) -> str:
    """The settings that name the dataset's images (its source keys), e.g. ``data.csv=/data/covid.csv``."""
    keys = dataset(data).source_keys
    shown = ", ".join(f"data.{k}={data.get(k)}" for k in keys)
    return f"data={data.kind}" + (f" ({shown})" if shown else "")


def metric_table(ev: Evidence, row: dict[str, Any], labels: list[str], prefix: str = "test") -> list[str]:
    lines = ["| | " + " | ".join(METRIC_NAMES[m] for m in STAT_METRICS) + " |",
             "|---|" + "---|" * len(STAT_METRICS)]
    rows = [(None, "macro (mean over labels)")] + ([(lab, lab) for lab in labels] if len(labels) > 1 else [])
    for label, title in rows:
        cells = []
        for m in STAT_METRICS:
            key = f"{prefix}_{m}" + (f"_{label}" if label else "")
            cells.append(ev.cell(label, m, float(row.get(key, np.nan))))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def interval_note(ev: Evidence) -> str:
    methods = sorted({f"{iv.method} x{iv.factor:.3f}" for iv in ev.intervals.values()})
    together = "; all of a patient's images go in or out together" if ev.units.endswith("patients") else ""
    text = (f"Brackets: {LEVEL:.0%} bootstrap intervals over the {ev.units} of the {ev.where} (the unit resampled"
            f"{together}), as rtl report computes them: scipy.stats.bootstrap, {RESAMPLES} resamples, seed {SEED}; "
            "BCa, or percentile where BCa is undefined, widened about the estimate by the small-sample factor "
            f"sqrt(m/(m-1)) x t(m-1)/z, m the fewest units with a positive or a negative (used here: "
            f"{', '.join(methods) or 'none'}).")
    for label, why in ev.missing.items():
        text += f" No interval for {label or 'the macro mean'}: {why}."
    return text


@dataclass
class CardFacts:
    """What the card says beyond the run's own files: the export and its checks, the counts, the intervals."""

    fmt: str
    files: Targets
    sha256: str
    exporter: str
    spec: dict[str, Any]
    check: Verification
    counts: list[dict[str, Any]]
    test: Evidence
    external: list[External]
    external_notes: list[str]
    test_patients: Optional[int]


def model_card(run: FinishedRun, facts: CardFacts) -> str:
    row = run.row
    sections = [
        [f"# Model card: {row['model']} ({_value(row, 'strategy')}) on {row['dataset']}", "", f"> {NOT_CLINICAL}", "",
         f"Exported by `rtl export` (rethink-tl {__version__}) from the run `{run.path}` (setting "
         f"{row['setting_id']}), its best checkpoint `{rf.BEST}` (epoch {run.best_epoch}). Every number below comes "
         f"from that run's own files (`{rf.RESULTS}`, `{rf.PREDICTIONS}`, `{rf.CONFIG}`, `{rf.IDENTITY}`)."],
        _intended_use(run, facts.fmt),
        _model_section(run),
        _data_section(run, facts),
        ["## Test metrics", "", *metric_table(facts.test, row, run.labels), "", interval_note(facts.test),
         f"Validation (where the best epoch was chosen; point values): AUROC {float(row['val_auroc']):.4f}, AUPRC "
         f"{float(row['val_auprc']):.4f}."],
        _external_section(facts.external, facts.external_notes),
        _file_section(run, facts),
        ["## Preprocessing", "", *[f"{i}. {step}" for i, step in enumerate(facts.spec["steps"], 1)], "",
         f"mean {facts.spec['normalisation']['mean']}, std {facts.spec['normalisation']['std']} (per input channel). "
         f"The same, machine-readable, in `{facts.files.spec.name}`.", "", f"> {NOT_CLINICAL}"],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _intended_use(run: FinishedRun, fmt: str) -> list[str]:
    row = run.row
    reader = "ONNX" if fmt == "onnx" else "TorchScript"
    return ["## Intended use", "",
            "Research on transfer learning for medical image classification: reproducing, inspecting or comparing "
            f"this run's result (model `{row['model']}`, init `{row['init']}`, {100 * float(row['fraction']):g}% of "
            f"the training data, seed {row['seed']}), for example with other software that reads {reader}. It scores "
            f"images like its training data ({row['dataset']}, {run.image_size} px, the labels "
            f"{', '.join(run.labels)}) and nothing else; on images from another source it has only the external "
            "results below. Out of scope: any clinical decision, any patient's care, any use as a medical device."]


def _model_section(run: FinishedRun) -> list[str]:
    row, model = run.row, run.cfg.model
    arch = f"{model.name}" + "".join(f", {k} {model[k]}" for k in ("backbone", "cut")
                                     if k in model and model[k] is not None)
    sha = _value(row, "weights_sha256", "")
    return [
        "## Model", "",
        f"- architecture: `{row['model']}` (model={arch}; head {model.get('head', 'pool')}, dropout "
        f"{model.get('dropout', 0.0)}), {int(row['params']):,} parameters",
        f"- init: `{row['init']}` ({_value(row, 'strategy')}); weights loaded: {_value(row, 'weights', 'random')}"
        + (f", sha256 `{sha}`" if sha else ""),
        f"- training: {_value(row, 'epochs_run')} of {_value(row, 'epochs')} epochs, best epoch {run.best_epoch} "
        f"(by validation AUPRC), lr {_value(row, 'lr')}, batch {_value(row, 'batch_size')}, precision "
        f"{_value(row, 'precision')}, on {_value(row, 'device')}, {_value(row, 'started')} to "
        f"{_value(row, 'finished')}",
        f"- software: rethink-tl {_value(row, 'rethink_tl')} (git {_value(row, 'git_commit')}), torch "
        f"{_value(row, 'torch')}, torchvision {_value(row, 'torchvision')}, timm {_value(row, 'timm')}, python "
        f"{_value(row, 'python')}",
        f"- outputs: {len(run.labels)} sigmoid probabilities, in this order: {', '.join(run.labels)}",
    ]


def _data_section(run: FinishedRun, facts: CardFacts) -> list[str]:
    row, size = run.row, run.image_size
    subset = _value(row, "subset_seed", "")
    return [
        "## Data", "",
        f"- dataset: {row['dataset']}, from {where_from(run.cfg.data)}; images {size} x {size} px",
        f"- split rule: {_value(row, 'split_rule')}",
        f"- training fraction: {float(row['fraction']):g}"
        + (f" (the subset drawn with seed {int(float(subset))})" if subset else ""),
        f"- images: train {_value(row, 'n_train')}, val {_value(row, 'n_val')}, test {_value(row, 'n_test')}"
        + (f" ({facts.test_patients} test patients)" if facts.test_patients else ""),
        f"- recorded balance (positives:negatives): train {_value(row, 'train_balance')}; val "
        f"{_value(row, 'val_balance')}; test {_value(row, 'test_balance')}",
        "",
        "| split | label | images | positives | negatives | unknown |",
        "|---|---|---|---|---|---|",
        *[f"| {c['split']} | {c['label']} | {c['images']} | {c['positives']} | {c['negatives']} | {c['unknown']} |"
          for c in facts.counts],
        "",
        "Train counts come from the run's data rebuilt from its config (its fingerprint checked against the run's); "
        f"val and test counts from `{rf.PREDICTIONS}`, which agrees with it. Unknown: the label does not count for "
        "that image (an uncertain finding with data.uncertain=ignore).",
    ]


def _external_section(external: list[External], notes: list[str]) -> list[str]:
    lines = ["## External results", ""]
    if not external:
        lines.append("None for this checkpoint:" if notes else
                     "None: this run has not been scored on other data (`rtl evaluate RUN_DIR data=...` does it).")
    for ext in external:
        r, data = ext.row, ext.record.get("data") or {}
        shown = f"data={data.get('kind', '?')}" + "".join(
            f", data.{k}={data[k]}" for k in ("csv", "root", "flag", "seed") if data.get(k) is not None)
        missing = _value(r, "labels_missing", "")
        lines += [f"### {ext.name}", "",
                  f"{shown}; split {_value(r, 'split')}, {_value(r, 'n_test')} images; labels scored "
                  f"{_value(r, 'label_map')}" + (f"; missing {missing}" if missing else "")
                  + f"; evaluated {_value(r, 'evaluated')}.", "",
                  *metric_table(ext.evidence or Evidence("external set", "?"), r, r["_labels"]), "",
                  interval_note(ext.evidence) if ext.evidence is not None else "No intervals.", ""]
    if notes:
        lines += ([] if lines[-1] == "" else [""]) + [f"- {note}" for note in notes]
    while lines[-1] == "":
        lines.pop()
    return lines


def _file_section(run: FinishedRun, facts: CardFacts) -> list[str]:
    check, spec, files = facts.check, facts.spec, facts.files
    kind = f"ONNX, opset {OPSET}" if facts.fmt == "onnx" else "TorchScript"
    which = (f"all {check.of} test images" if check.images == check.of else
             f"the first {check.images} of the {check.of} test images (at most {MAX_CHECK} are scored)")
    return [
        "## This file", "",
        f"- `{files.model.name}`: {kind}, made with {facts.exporter}, torch {torch.__version__}; sha256 "
        f"`{facts.sha256}`",
        f"- input `{INPUT}`: float32 (N, {spec['input']['shape'][1]}, {run.image_size}, {run.image_size}), N any batch "
        f"size, preprocessed as `{files.spec.name}` says; output `{OUTPUT}`: float32 (N, {len(run.labels)}), "
        f"{spec['output']['meaning']}",
        f"- checked against best.pt on {which}, in batches of {', '.join(map(str, check.batch_sizes))}, with "
        f"{check.runtime}: largest difference of a probability {check.max_abs_diff:.3g} (allowed {TOLERANCE:g}); "
        f"best.pt on this machine against the run's recorded test probabilities: {check.vs_recorded:.3g}",
    ]


# --- writing all three, or none --------------------------------------------------------------------------------

def commit(files: dict[Path, bytes]) -> None:
    """Write every file, or none: each is staged atomically beside its target (atomic_io, so a full disk is one
    UserError), then all are renamed into place. On any failure the staged files, whatever was already renamed and
    folders made for them go again."""
    missing = {a for t in files for a in (t.parent, *t.parent.parents) if not a.exists()}
    made = sorted(missing, key=lambda p: len(p.parts))
    for folder in made:  # outermost first; removed in the reverse order
        folder.mkdir(exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    for target in files:  # staged files of an export killed before it renamed them
        for stale in target.parent.glob(f".{target.name}.*.export"):
            with contextlib.suppress(OSError, ValueError):
                if not _alive(int(stale.name.rsplit(".", 2)[-2])):
                    stale.unlink()
    try:
        for target, data in files.items():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.export")
            atomic_io.write_bytes(tmp, data, option="--out")
            staged.append((tmp, target))
        for tmp, target in staged:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for path in [tmp for tmp, _ in staged] + placed:
            with contextlib.suppress(OSError):
                path.unlink()
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Exported:
    files: Targets
    verification: Verification
    exporter: str


def export_run(run_dir: str, fmt: str = "onnx", out: Optional[str] = None, *, force: bool = False) -> Exported:
    """``rtl export`` (module docstring): checks, exports, verifies, then writes the three files together."""
    fmt = check_format(fmt)
    check_dependencies(fmt)
    run = one_run(run_dir, "rtl export")
    files = targets(run.path, fmt, out, force)
    bundle = rebuild_data(run, "the export could not be checked on the run's own test images")
    pred, test = check_predictions(run, bundle)
    spec = preprocessing_spec(run, run.labels)

    module = Probabilities(run.model).eval()
    data, exporter = export_bytes(fmt, module, spec, bundle, run, files)
    check = verify(fmt, data, module, run, spec, bundle, test)

    ext, ext_notes = externals(run)
    patients = len(set(test.patients)) if test.patients is not None else None
    facts = CardFacts(fmt, files, _sha256(data), exporter, spec, check, class_counts(bundle, pred, run.labels),
                      evidence(test, run.labels, "test split"), ext, ext_notes, patients)
    # The model is renamed into place last: a kill in between leaves a card without its model, never a model
    # without its card (or beside an older one).
    commit({files.spec: (json.dumps(spec_record(run, facts), indent=1) + "\n").encode(),
            files.card: model_card(run, facts).encode(), files.model: data})
    return Exported(files, check, exporter)


def export_bytes(fmt: str, module: nn.Module, spec: dict[str, Any], bundle: DataBundle, run: FinishedRun,
                 files: Targets) -> tuple[bytes, str]:
    """The exported file (traced on two of the run's test images, preprocessed by the spec) and how it was made."""
    example = torch.from_numpy(apply_spec(spec, bundle.test.images[:2].numpy()))
    if len(example) < 2:  # a test split of one image: the batch axis is made dynamic on two
        example = example.repeat(2, 1, 1, 1)
    extra = {"labels": json.dumps(run.labels), "preprocessing": files.spec.name, "rethink_tl": __version__,
             "setting_id": str(run.row["setting_id"]), "source_run": str(run.path.resolve())}
    if fmt == "onnx":
        data, exporter = onnx_bytes(module, example)
        return with_metadata(data, extra), exporter
    return torchscript_bytes(module, example, {f"rtl_{k}.txt": v for k, v in extra.items()})


def spec_record(run: FinishedRun, facts: CardFacts) -> dict[str, Any]:
    """The preprocessing spec with what the file is, how it was checked and which run it comes from."""
    check = facts.check
    return {
        **facts.spec, "model_file": facts.files.model.name, "model_format": facts.fmt, "model_sha256": facts.sha256,
        "exporter": {"how": facts.exporter, "torch": torch.__version__,
                     **({"opset": OPSET} if facts.fmt == "onnx" else {})},
        "verification": {"images": check.images, "test_images": check.of, "first_images": True,
                         "max_abs_diff": check.max_abs_diff, "tolerance": TOLERANCE, "batch_sizes": check.batch_sizes,
                         "runtime": check.runtime, "best_pt_vs_recorded_predictions": check.vs_recorded,
                         "spec_vs_rtl_pipeline": check.spec_diff},
        "run": {"path": str(run.path.resolve()), "setting_id": str(run.row["setting_id"]),
                "model": str(run.row["model"]), "init": str(run.row["init"]), "best_epoch": run.best_epoch,
                "finished": _value(run.row, "finished"), "best_pt_sha256": _sha256((run.path / rf.BEST).read_bytes())},
    }


def export_to_files(run_dir: str, fmt: str = "onnx", out: Optional[str] = None, *, force: bool = False) -> None:
    done = export_run(run_dir, fmt, out, force=force)
    v = done.verification
    print(f"wrote {done.files.model} ({done.exporter}); checked on {v.images} of the {v.of} test images with "
          f"{v.runtime}: largest probability difference {v.max_abs_diff:.3g} (allowed {TOLERANCE:g})")
    print(f"beside it: {done.files.card.name}, {done.files.spec.name}")
