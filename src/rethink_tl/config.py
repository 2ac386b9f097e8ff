"""The configuration schema: one dataclass per config group, registered with Hydra's ConfigStore.

Every default lives here, once. The YAML files under ``conf/`` pick a schema (``defaults: [base_X]``)
and set only the values that differ from it; code reads ``cfg.train.lr``, never ``cfg.get(key, default)``.
Hydra checks types and enum choices while it composes the config (``train.epochs=abc`` never reaches a
run); :func:`validate` then checks what types cannot say (ranges, unknown keys added with ``+``) before
any model or dataset is built. What only a model or a dataset knows (which models read ``model.cut``,
what a dataset's shares must add up to) is checked by their registries (models/, data/); what makes two
runs the same run is identity.py's. This module imports nothing of the project but its errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from .errors import UserError


class Choice(str, Enum):
    """An enum whose members print as their value (``auto``, not ``Amp.auto``) and compare equal to it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class InitName(Choice):
    random = "random"
    pretrained = "pretrained"


class InitSource(Choice):  # weights/sources.py
    # torchxrayvision's chest X-ray DenseNet121 (densenet121-res224-all): one grey input channel, xrv's intensities
    torchxrayvision = "torchxrayvision"


class Amp(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class PosWeight(Choice):
    balanced = "balanced"


class Uncertain(Choice):
    ones = "ones"  # U-Ones, the paper
    zeros = "zeros"
    ignore = "ignore"  # masked out of loss and metrics


class Resize(Choice):
    crop = "crop"  # centre square, as the paper ("cropped and resized to 224x224")
    pad = "pad"  # keep the whole film, black bars
    stretch = "stretch"


class SplitBy(Choice):
    patient = "patient"  # no patient in two splits
    image = "image"  # every image on its own, as the paper's random CheXpert split (leaks patients)


class SubsetRule(Choice):
    fixed = "fixed"  # one training subset (data.subset_seed) for every train.seed
    per_seed = "per_seed"  # subset seed = data.subset_seed + train.seed


class Rescale16(Choice):
    minmax = "minmax"  # each 16-bit image's own range
    full = "full"  # 0..65535


class Logger(Choice):  # tracking.py
    none = "none"
    tensorboard = "tensorboard"  # torch's SummaryWriter into <run>/tensorboard/
    mlflow = "mlflow"  # an MLflow run per run folder, a sweep one experiment (runtime.mlflow_uri)


class DicomWindow(Choice):  # data/dicom.py
    auto = "auto"  # the file's VOI LUT or window, else its own min..max
    minmax = "minmax"  # each image's own min..max, whatever window it carries
    none = "none"  # the stored bits' whole range: one value, one grey in every file


class OnBadImage(Choice):
    error = "error"  # list missing / unreadable images and stop
    skip = "skip"  # drop them with a warning


class Head(Choice):
    pool = "pool"  # global average pool of the last feature map (C inputs to the Linear layer), the default
    flatten = "flatten"  # the whole last feature map (C*H*W inputs), as the authors' code does for DenseNets


# --- model, init ------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = MISSING  # the registry name (conf/model/<name>.yaml); the default model is in config.yaml
    tag: str = "${.name}"  # how results and run directories name the model (aliases record their target)
    backbone: Optional[str] = None  # model=timm / model=trunc: any timm backbone
    cut: Optional[int] = None  # model=trunc: cut after this feature stage (0-based, timm's count)
    # What the Linear layer reads: pool (default) averages the last feature map over space; flatten keeps
    # its spatial detail, so the head is sized for data.image_size and only fits images of that size.
    head: Head = Head.pool
    # Dropout(p) just before the Linear layer (the authors' CBR nets use 0.1); 0, the default, adds none.
    dropout: float = 0.0


@dataclass
class InitConfig:
    # random: RI. pretrained: TL for full models, Truncated-TL for truncated ones, Transfusion for slim ones.
    name: InitName = MISSING
    # An explicit weights file; otherwise the torchvision / timm caches (TORCH_HOME, HF_HOME), installed
    # weight packages, then a download when `download` is true.
    weights: Optional[str] = None
    download: bool = True
    # Whose pretrained weights: null is ImageNet (or what rtl pretrain installed); torchxrayvision is chest X-ray
    # pretraining, for the DenseNet121 models only, which then read one grey channel (README: "Chest X-ray weights").
    source: Optional[InitSource] = None


# A pretrained init from a source other than ImageNet has a conf/init option of its own (init=xrv is init=pretrained
# init.source=torchxrayvision), and results.csv, run folders and reports call it by that option's name.
SOURCE_INITS = {InitSource.torchxrayvision.value: "xrv"}


def init_tag(name: Any, source: Any = None) -> str:
    """What results.csv, run folders and reports call an init: random, pretrained (ImageNet), or its source's
    option (xrv)."""
    if source is None or str(name) != InitName.pretrained:
        return str(name)
    if str(source) not in SOURCE_INITS:
        raise ValueError(f"init.source={source} is not a weights source: choose one of {', '.join(SOURCE_INITS)}")
    return SOURCE_INITS[str(source)]


def init_source(init: Any) -> Optional[str]:
    """The weights source an init config names (None: ImageNet); a UserError where it would mean nothing."""
    init = typed(InitConfig, init if init is not None else {}, where="init")
    source = init.source
    if source is None:
        return None
    if OmegaConf.is_missing(init, "name") or str(init.name) != InitName.pretrained:
        shown = "not set" if OmegaConf.is_missing(init, "name") else f"init={init.name}"
        raise UserError(f"init.source={source} names whose pretrained weights to load, but the init is {shown}: use "
                        f"init=pretrained init.source={source} (init={SOURCE_INITS[str(source)]}), or leave "
                        "init.source out for random weights")
    return str(source)


# --- data -------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    name: str = "???"  # run directories and results.csv use this name: give each dataset its own
    kind: str = "???"  # which dataset builder (data/<kind>.py)
    image_size: int = 224
    fraction: float = 1.0  # stratified share of the training split, chosen by subset_seed
    subset_seed: int = 0
    # fixed: every train.seed trains on the same subset (the paper); per_seed: the subset is drawn with
    # subset_seed + train.seed, so the subset's own variance enters the error bars over seeds
    subset: SubsetRule = SubsetRule.fixed


@dataclass
class SyntheticData(DataConfig):
    name: str = "synthetic"
    kind: str = "synthetic"
    seed: int = 0  # which synthetic dataset (images are a pure function of this seed)
    num_samples: int = 4000  # total over train/val/test
    val_share: float = 0.1
    test_share: float = 0.25
    labels: List[str] = field(default_factory=lambda: ["opacity", "nodule"])
    prevalence: float = 0.0588  # train/val positive rate per label (about 1:16)
    test_prevalence: float = 0.1  # prevalence drifts in the test split, as in a prospective test set


@dataclass
class ImageFilesData(DataConfig):
    """Datasets of image files: how they are decoded and cached (README: "Real data")."""

    resize: Resize = Resize.crop  # the paper: "cropped and resized to 224x224"
    channels: str = "auto"  # auto: 3 if any image is stored in colour, else 1 | 1 | 3
    rescale16: Rescale16 = Rescale16.minmax
    dicom_window: DicomWindow = DicomWindow.auto  # DICOM files: the VOI step (README: "DICOM")
    dicom_frame: Optional[int] = None  # DICOM files: frame K of a multi-frame file; null refuses them
    on_bad_image: OnBadImage = OnBadImage.error
    cache: bool = True  # decode once into a uint8 memmap, reuse it in every later run
    cache_dir: Optional[str] = None  # null: next to the data, or $XDG_CACHE_HOME/rethink_tl if not writable
    workers: Optional[int] = None  # decoding threads; null: one per CPU core


@dataclass
class ChexpertData(ImageFilesData):
    name: str = "chexpert"
    kind: str = "chexpert"
    root: Optional[str] = None  # the folder that holds train.csv and valid.csv
    labels: Any = "paper13"  # paper13 (all but Support Devices) | all14 | competition5 | [observations]
    uncertain: Uncertain = Uncertain.ones
    frontal_only: bool = False  # false: all of train.csv, frontal and lateral, as the paper
    use_official_valid: bool = False  # true: valid.csv is the test split, train.csv gives train and val
    # patient: no patient in two splits (our default, a documented deviation); image: the paper's random split
    split_by: SplitBy = SplitBy.patient
    test_share: float = 0.2  # of the patients (images); then val_share of the rest: 72/8/20 like the paper
    val_share: float = 0.1
    split_seed: int = 0
    channels: str = "1"  # CheXpert is grey


@dataclass
class CsvData(ImageFilesData):
    name: str = "csv"
    kind: str = "csv"
    csv: Optional[str] = None  # the CSV listing the images
    root: Optional[str] = None  # folder that relative paths start from; null: the CSV's folder
    path_column: str = "path"
    patient_column: Optional[str] = None  # null: patient_id / patient / subject_id if present, else per image
    date_column: str = "date"
    labels: Optional[List[str]] = None  # null: every other column holding only 1 / 0 / -1 / blank
    uncertain: Uncertain = Uncertain.ones
    cutoff_date: Optional[str] = None  # YYYY-MM-DD: test = on or after it, train/val = before (prospective)
    split_by: SplitBy = SplitBy.patient  # what val_share / test_share count: patients, or single images
    val_share: float = 0.2  # of the patients before the cutoff (or of the non-test patients)
    test_share: float = 0.2  # of the patients, random split only (no cutoff_date)
    split_seed: int = 0
    # Columns kept beside each prediction for subgroup evidence (rtl report --by COLUMN), e.g. [sex, age]: never a
    # label or an input, and not part of the run's settings.
    group_columns: Optional[List[str]] = None


@dataclass
class MedmnistData(DataConfig):
    name: str = "${.flag}"
    kind: str = "medmnist"
    flag: str = "pneumoniamnist"  # pneumoniamnist, chestmnist, breastmnist, ... (2D sets only)
    npz: Optional[str] = None  # a .npz in the MedMNIST layout; null: look in root
    root: Optional[str] = None  # null: ~/.medmnist (the medmnist package's folder)
    size: Optional[int] = None  # 28 | 64 | 128 | 224: which file; null: smallest present >= image_size
    download: bool = True  # fetch a missing file (needs the medmnist package and the network)


# --- the training protocol and the runtime --------------------------------------------------------------

@dataclass
class TrainConfig:
    """The paper's protocol (Peng et al. 2021): everything here can change a result."""

    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-5  # Adam
    weight_decay: float = 0.0
    seed: int = 0
    lr_factor: float = 0.5  # ReduceLROnPlateau on validation macro AUPRC (mode max)
    patience: int = 5
    early_stop: int = 0  # stop after this many epochs without a better validation AUPRC (0 = never)
    min_lr: float = 0.0  # stop once the learning rate falls below this (0 = never)
    # The paper's only augmentation, "slight random rotation" (no angle given): uniform in +-rotate_degrees,
    # applied to whole batches on the device. 10 degrees is our reading of "slight" (README: Preprocessing).
    rotate_degrees: float = 10.0
    scale_jitter: float = 0.0  # optional random zoom by up to +-this share (0 = off, the paper)
    # BCE-with-logits; balanced weighs each label's positives by neg/pos of the training split,
    # null = unweighted (the paper)
    pos_weight: Optional[PosWeight] = None


@dataclass
class ExecutionConfig:
    """How a process executes, for rtl train and rtl pretrain alike. Results do not depend on these beyond
    floating-point noise, so they are not part of a run's identity, except ``amp`` (README: "Where runs go")."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each process takes cuda:LOCAL_RANK)
    threads: int = 0  # CPU threads; 0 = torch's default (one per core)
    amp: Amp = Amp.auto  # auto = bf16 on GPUs with native bf16, else fp16 with a grad scaler; fp32 on CPU
    channels_last: bool = True  # NHWC: faster convolutions on tensor-core GPUs and on AVX-512 CPUs
    compile: bool = False  # torch.compile the model (slow first epoch, faster after)
    cudnn_benchmark: bool = True
    eval_batch_size: int = 256
    force: bool = False  # run again from scratch even when the run directory holds a finished run
    progress: bool = True  # tqdm bars


@dataclass
class RuntimeConfig(ExecutionConfig):
    """rtl train's runtime."""

    data_on_device: float = 0.5  # keep uint8 images on the GPU when they fit in this share of free memory
    # A parallel local sweep (hydra/launcher=joblib): jobs per GPU at once with runtime.device=auto (small models
    # leave a GPU idle between their steps; two or more on one GPU fill it).
    jobs_per_device: int = 1
    # Pause after this epoch (0: never): last.pt and metrics.csv are kept and the run continues, exactly, when it is
    # run again with a larger value or without it. Not part of the run's identity: rtl advise's rungs use it.
    stop_after: int = 0
    # Experiment tracking beside the run's files (tracking.py); not part of the run's identity.
    logger: Logger = Logger.none
    # runtime.logger=mlflow: the tracking URI (a team's server, http://host:5000); null: a sqlite file, mlflow.db,
    # in the sweep folder (a single run: its run folder). The experiment: null names it by that folder's path.
    mlflow_uri: Optional[str] = None
    mlflow_experiment: Optional[str] = None


@dataclass
class BenchConfig:
    steps: int = 8  # timed training steps in (a), (b) and (c)
    warmup: int = 2  # untimed steps first (allocator, cuDNN autotuning, compile)
    eval_images: int = 512
    naive_workers: int = 2  # DataLoader workers of the naive loop (c)
    source_scale: float = 1.5  # the naive loop's files are this much larger than data.image_size
    score_n: int = 45000  # predictions scored by metrics.score: the size of the paper's CheXpert test split
    score_labels: int = 14


# --- rtl pretrain -------------------------------------------------------------------------------------

@dataclass
class ImageFolderData:
    """An ImageFolder tree, the ImageNet layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG."""

    root: Optional[str] = None
    name: str = "${rtl.basename:${.root}}"  # weights.json and the run folder name the dataset by this
    image_size: int = 224  # RandomResizedCrop size in training, centre-crop size in validation
    # Validation: shorter side resized to this, then the centre image_size crop. Default: the recipe's ratio,
    # 256 for 224 (rounded image_size x 256 / 224), so a smaller image_size keeps the same share of the image.
    val_resize: int = II("rtl.val_resize:${.image_size}")
    min_scale: float = 0.08  # RandomResizedCrop keeps 8%-100% of the image area (Szegedy et al. 2015)
    flip: bool = True  # random horizontal flip in training


@dataclass
class RecipeConfig:
    """The optimisation recipe. No defaults here: every value, with its source, is in conf/recipe/*.yaml."""

    epochs: int = MISSING
    batch_size: int = MISSING  # images per process (per GPU) per forward pass
    accumulate: int = MISSING  # forward passes per step; global batch = batch_size x processes x accumulate
    lr_per_256: float = MISSING  # lr = lr_per_256 x global batch / 256 (linear scaling rule)
    momentum: float = MISSING
    nesterov: bool = MISSING
    weight_decay: float = MISSING
    decay_norm_and_bias: bool = MISSING  # false: no weight decay on normalisation weights and biases
    label_smoothing: float = MISSING
    warmup_epochs: int = MISSING  # linear warm-up from lr/warm-up steps to lr, then cosine decay to 0
    seed: int = MISSING  # data order and augmentation (per image, so independent of workers and processes)


@dataclass
class PretrainRuntime(ExecutionConfig):
    """rtl pretrain's runtime: the input pipeline's processes, and where the result goes."""

    workers: Optional[int] = None  # decoding processes per GPU process; null: the CPU cores / processes, max 16
    prefetch: int = 4  # batches each worker prepares ahead
    install: bool = True  # install the finished weights into $RTL_WEIGHTS, where init=pretrained finds them


@dataclass
class PretrainBench:
    images: int = 256  # generated ImageNet-like JPEGs (about 500 x 375, quality 90) when data.root is null
    batches: int = 4  # timed batches per phase (after one untimed batch)
    steps: int = 4  # timed model steps
    warmup: int = 1


@dataclass
class PretrainConfig:
    model: ModelConfig = MISSING
    recipe: RecipeConfig = MISSING
    data: ImageFolderData = field(default_factory=ImageFolderData)
    runtime: PretrainRuntime = field(default_factory=PretrainRuntime)
    bench: Optional[PretrainBench] = None
    experiment: Optional[str] = None
    vars: Any = field(default_factory=dict)


SCHEMAS: dict[str, type] = {
    "base_model": ModelConfig, "base_init": InitConfig, "base_train": TrainConfig, "base_runtime": RuntimeConfig,
    "base_synthetic": SyntheticData, "base_chexpert": ChexpertData, "base_csv": CsvData,
    "base_medmnist": MedmnistData, "base_bench": BenchConfig, "base_recipe": RecipeConfig,
}
_GROUP_OF = {"base_model": "model", "base_init": "init", "base_train": "train", "base_runtime": "runtime",
             "base_bench": "bench", "base_recipe": "recipe"}


def _val_resize(image_size: Any) -> int:
    """The classic validation resize for a centre crop of ``image_size``: 256 for 224 (ImageNet's recipe)."""
    return int(round(int(image_size) * 256 / 224))


def register() -> None:
    """Make the schemas available to the YAML files' defaults lists (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group=_GROUP_OF.get(name, "data"), name=name, node=node)
    cs.store(name="base_pretrain", node=PretrainConfig)
    if not OmegaConf.has_resolver("rtl.val_resize"):
        OmegaConf.register_new_resolver("rtl.val_resize", _val_resize)
    if not OmegaConf.has_resolver("rtl.init_tag"):  # the run-directory patterns of conf/config.yaml
        OmegaConf.register_new_resolver("rtl.init_tag", init_tag)


register()

# Keys that moved from train to runtime: old command lines keep working (cli rewrites them).
MOVED_TO_RUNTIME = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


# --- validation -------------------------------------------------------------------------------------

def _between(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v) -> bool:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    left = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    right = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    return check, " and ".join(s for s in (left, right) if s)


# key -> (check, what is allowed). Keys absent from a config (other dataset kinds) are not checked.
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
RANGES = {
    "train.epochs": _between(1, 100_000), "train.batch_size": _between(2, 1_000_000),
    "train.lr": _between(0, 10, lo_open=True), "train.weight_decay": _between(0, 10),
    "train.seed": _between(0, SEED_MAX),
    "train.lr_factor": _between(0, 1, True, True), "train.patience": _between(0), "train.early_stop": _between(0),
    "train.min_lr": _between(0, 10), "train.rotate_degrees": _between(0, 180),
    "train.scale_jitter": _between(0, 1, hi_open=True),
    "runtime.threads": _between(0, 1024), "runtime.data_on_device": _between(0, 1),
    "runtime.eval_batch_size": _between(1, 1_000_000), "runtime.jobs_per_device": _between(1, 64),
    "runtime.stop_after": _between(0),
    "data.image_size": _between(8, 4096), "data.fraction": _between(0, 1, lo_open=True),
    "data.subset_seed": _between(0, SEED_MAX), "data.seed": _between(0, SEED_MAX // 3),
    "data.num_samples": _between(3, 10_000_000), "data.val_share": _between(0, 1, True, True),
    "data.test_share": _between(0, 1, True, True), "data.prevalence": _between(0, 1, True, True),
    "data.test_prevalence": _between(0, 1, True, True), "data.split_seed": _between(0, SEED_MAX),
    "data.workers": _between(1, 1024), "model.cut": _between(0),
    "model.dropout": _between(0, 1, hi_open=True),
    "bench.steps": _between(1, 100_000), "bench.warmup": _between(0, 100_000), "bench.eval_images": _between(1),
    "bench.naive_workers": _between(0, 256), "bench.source_scale": _between(1, 16), "bench.score_n": _between(2),
    "bench.score_labels": _between(1, 1000),
    "recipe.epochs": _between(1, 100_000), "recipe.batch_size": _between(2, 1_000_000),
    "recipe.accumulate": _between(1, 1024), "recipe.lr_per_256": _between(0, 100, lo_open=True),
    "recipe.momentum": _between(0, 1, hi_open=True), "recipe.weight_decay": _between(0, 1),
    "recipe.label_smoothing": _between(0, 1, hi_open=True), "recipe.warmup_epochs": _between(0, 100_000),
    "recipe.seed": _between(0, SEED_MAX), "data.val_resize": _between(8, 8192),
    "data.min_scale": _between(0, 1, lo_open=True), "runtime.workers": _between(0, 1024),
    "runtime.prefetch": _between(1, 1024), "bench.images": _between(8, 100_000), "bench.batches": _between(1),
}
# Keys a config may have beside the groups: the experiment's name, and free values for interpolations.
ROOT_KEYS = ("experiment", "vars", "hydra")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
GROUPS = ("model", "init", "data", "train", "runtime", "bench", "recipe")


def _unknown_keys(cfg: DictConfig) -> None:
    for group in GROUPS:
        node = cfg.get(group) if group in cfg else None
        if node is None:
            continue
        schema = OmegaConf.get_type(node)
        if "recipe" in cfg and group in ("init", "train"):
            raise UserError(f"rtl pretrain has no {group}.* settings: its groups are model, data, recipe and runtime "
                            "(conf/pretrain.yaml)")
        if not dataclasses.is_dataclass(schema):
            raise UserError(f"the {group} config has no schema: a config file of group {group} must start with "
                            f"'defaults: [base_...]' (see the files in conf/{group}/)")
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {group}.{close[0]}?)" if close else ""
                raise UserError(f"unknown key {group}.{key}{hint}; {group} keys are: {', '.join(known)}")


def _finite(cfg: DictConfig) -> None:
    """NaN and infinity pass a float's type check, and then every comparison with them is false."""
    for group in GROUPS:
        if group not in cfg or not isinstance(cfg[group], DictConfig):
            continue
        for key in cfg[group]:
            value = OmegaConf.select(cfg, f"{group}.{key}", throw_on_missing=False)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{group}.{key}={value} is not a finite number")


def _dataset_kind(cfg: DictConfig) -> None:
    if "data" not in cfg:
        return
    schema = OmegaConf.get_type(cfg.data)
    kind = getattr(schema, "kind", None) if dataclasses.is_dataclass(schema) else None
    if kind and str(cfg.data.kind) != kind:
        raise UserError(f"data.kind={cfg.data.kind} cannot change what data={kind} reads: choose the dataset "
                        f"with data={cfg.data.kind} instead")


def validate(cfg: DictConfig) -> None:
    """Check what Hydra's typed composition cannot: ranges, finite numbers, device names, keys added with
    ``+`` and keys that do not apply. Raises UserError naming the key, the value and what is allowed."""
    extra = [k for k in cfg if k not in GROUPS and k not in ROOT_KEYS]
    if extra:
        groups = [g for g in GROUPS if g in cfg and cfg[g] is not None]
        raise UserError(f"unknown key {extra[0]}: the config has the groups {', '.join(groups)}, and "
                        f"{', '.join(ROOT_KEYS[:2])} (put values for interpolations under vars.)")
    _unknown_keys(cfg)
    _finite(cfg)
    if "kind" in cfg.get("data", {}):
        _dataset_kind(cfg)
    for key, (check, allowed) in RANGES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as err:  # noqa: BLE001  (an interpolation that cannot resolve is the user's)
            raise UserError(f"{key}: {err}".splitlines()[0]) from err
        if value is not None and not isinstance(value, bool) and not check(value):
            raise UserError(f"{key}={value} is out of range: it must be {allowed}")
    if "runtime" in cfg and not _DEVICE.match(str(cfg.runtime.device)):
        raise UserError(f"runtime.device={cfg.runtime.device} is not a device: use auto, cpu, cuda or cuda:N")
    if "recipe" in cfg:
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", str(cfg.data.name)) or str(cfg.data.name) in (".", ".."):
            raise UserError(f"data.name={cfg.data.name!r} cannot name the dataset (it is a folder of the run's path): "
                            "use letters, digits, '_', '-' and '.'")
        if cfg.recipe.warmup_epochs >= cfg.recipe.epochs:
            raise UserError(f"recipe.warmup_epochs={cfg.recipe.warmup_epochs} leaves no epoch after the warm-up: it "
                            f"must be less than recipe.epochs={cfg.recipe.epochs}")
        if cfg.data.val_resize < cfg.data.image_size:
            raise UserError(f"data.val_resize={cfg.data.val_resize} is smaller than the centre crop data.image_size="
                            f"{cfg.data.image_size}: it must be at least as large (the recipe: 256 for 224)")



def typed(schema: type, cfg: Any, where: str = "") -> DictConfig:
    """``cfg`` (a composed config node or a plain mapping, as tests and scripts pass) checked against
    ``schema``, with the schema's defaults for what it leaves out."""
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is schema:
        return cfg
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except Exception as err:  # noqa: BLE001  (omegaconf's ValidationError / ConfigKeyError: bad user values)
        key = getattr(err, "full_key", None) or ""
        key = f"{where}.{key}" if where and key else key
        raise UserError((f"{key}: " if key else "") + str(err).strip().splitlines()[0]) from err
