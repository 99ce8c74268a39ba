"""A model directory: ``config.json`` and ``model.safetensors``, saved and loaded.

The bottom of the model stack: ViTok (vitok_fast/model.py), the DiT (vitok_fast/dit.py), the
Hub mixin (vitok_fast/hub.py) and training checkpoints (vitok_fast/checkpoint.py) all name and
read these files through here, and this module imports none of them. A model class given to
:func:`load_model_dir` needs ``cls(config)`` and a ``config`` with ``to_json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from vitok_fast.fileio import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_dir(model: nn.Module, directory: str | os.PathLike, tag: str) -> None:
    """``config.json`` and ``model.safetensors`` of ``model`` (which has a ``config`` with
    ``to_json``), each written atomically; ``tag`` names the config in the weights' metadata.
    ViTok and the DiT save through here, so vitok_fast.checkpoint keeps runs of both."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.config.to_json()
    atomic_write(directory / WEIGHTS_FILE,
                 lambda path: save_file(state, path, metadata={"format": "pt", tag: config}))
    atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(config + "\n"))


def load_model_dir(cls, config_cls, directory: Path, what: str, *, device=None,
                   torch_dtype: torch.dtype | None = None, overrides: dict | None = None):
    """The model of a directory written by :func:`save_model_dir`: each file checked, the
    config built by ``config_cls.from_dict`` (with ``overrides``), the weights cast to
    ``torch_dtype`` if given, strict key and shape checks, on ``device`` (default CPU).
    ``what`` names the model in messages."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = "cpu" if device is None else device
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"expected a {what} checkpoint file {path} (a directory written by "
                f"save_pretrained holds {CONFIG_FILE} and {WEIGHTS_FILE}), but it does not exist")
    try:
        config_data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    config = config_cls.from_dict({**config_data, **(overrides or {})})
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):  # no memory for weights that are replaced at once
        model = cls(config)
    _check_state(model.state_dict(), state, config_path, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def _check_state(expected: dict, given: dict, config_path, weights_path) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match {config_path}: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}")
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for {key}: {config_path} expects {tuple(tensor.shape)}, "
                f"{weights_path} holds {tuple(given[key].shape)}")
