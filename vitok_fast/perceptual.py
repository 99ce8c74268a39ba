"""LPIPS (VGG) without downloads: the loss of stage 1 and a metric of evaluation.

The ``lpips`` package ships its learned linear layers (``weights/v0.1/vgg.pth``) but fetches
the VGG16 backbone from torchvision's hub on first use. We never download: the backbone comes
from a file the user gives, or from torchvision's cache if an earlier run put it there, and
tests use a random backbone (``pretrained_backbone=False``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from vitok_fast import cli

# torchvision's file name for the ImageNet VGG16 weights (VGG16_Weights.IMAGENET1K_V1).
VGG16_FILE = "vgg16-397923af.pth"
# lpips' vgg16 wrapper cuts torchvision's `features` into five slices at these indices.
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def default_vgg16_path() -> Path:
    """Where torchvision caches the VGG16 weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


TRAIN_WITHOUT = "or train without LPIPS with --lpips-weight 0"


RANDOM = "random"  # --lpips-vgg random: a random backbone


def find_vgg16(vgg_path: str | os.PathLike | None = None, without: str = TRAIN_WITHOUT) -> Path:
    """The VGG16 weights to use, or a FileNotFoundError that says how to get them, or
    (``without``) how to do without them."""
    path = Path(vgg_path) if vgg_path is not None else default_vgg16_path()
    if path.is_file():
        return path
    given = f"--lpips-vgg {vgg_path}" if vgg_path is not None else f"torchvision's cache {path}"
    raise FileNotFoundError(
        f"LPIPS needs the ImageNet VGG16 weights ({VGG16_FILE}) and found none in {given}. "
        f"Copy the file from a machine with internet access (torchvision.models.vgg16("
        f"weights='IMAGENET1K_V1') puts it in ~/.cache/torch/hub/checkpoints/) and pass its "
        f"path with --lpips-vgg PATH, {without}.")


def load_lpips(vgg_path: str | os.PathLike | None = None, pretrained_backbone: bool = True,
               device="cpu", without: str = TRAIN_WITHOUT) -> torch.nn.Module:
    """The lpips package's LPIPS(net='vgg'), frozen and in eval mode.

    ``pretrained_backbone=False``, or ``vgg_path="random"`` (what ``--lpips-vgg random`` gives
    every tool), keeps a random VGG backbone (for tests; no file needed).
    Inputs are images in [-1, 1]; the call returns one distance per image, ``(B, 1, 1, 1)``.
    """
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if pretrained_backbone and vgg_path != RANDOM:
        path = find_vgg16(vgg_path, without)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.net.load_state_dict(_vgg_to_lpips(state), strict=True)
        except Exception as e:  # unpickling and key errors come in many classes
            raise ValueError(
                f"--lpips-vgg {path}: cannot load it as the VGG16 weights {VGG16_FILE} "
                f"({type(e).__name__}: {cli.first_sentence(e)}); the file is "
                f"truncated, corrupt or another network's; copy {VGG16_FILE} again, {without}"
            ) from e
    model.requires_grad_(False)
    return model.eval().to(device)


def _vgg_to_lpips(state: dict) -> dict:
    """Map torchvision's ``features.{i}.*`` keys to lpips' ``slice{k}.{i}.*``."""
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue  # the classifier is unused
        index = int(parts[1])
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            if lo <= index < hi:
                mapped[f"slice{k}.{index}.{parts[2]}"] = value
    return mapped
