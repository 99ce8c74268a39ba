"""A model directory: ``config.json`` and ``model.safetensors``, saved and loaded.

The bottom of the model stack: ViTok (vitok_fast/model.py), the DiT (vitok_fast/dit.py), the
Hub mixin (vitok_fast/hub.py) and training checkpoints (vitok_fast/checkpoint.py) all name and
read these files through here, and this module imports none of them. A model class given to
:func:`load_model_dir` needs ``cls(config)`` and a ``config`` with ``to_json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

from vitok_fast.fileio import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"  # beside the model in a training checkpoint (vitok_fast/checkpoint.py)
STEP_DIR = re.compile(r"^step_(\d{8})$")  # a training checkpoint inside a run directory

# A field only each kind of config.json has: what a folder of the wrong kind holds.
_KIND_FIELDS = {"ViTok": "encoder_width", "DiT": "num_classes"}


def latest_step_dir(run_dir: Path) -> Path | None:
    """The newest complete ``step_XXXXXXXX`` checkpoint of a training run directory."""
    found = sorted((int(m[1]), p) for p in run_dir.iterdir()
                   if (m := STEP_DIR.match(p.name)) and p.is_dir()
                   and all((p / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE)))
    return found[-1][1] if found else None


def model_folder(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The folder holding ``config.json`` for ``path``, and a note saying how it was chosen
    (None when ``path`` is that folder): a training run directory gives its latest complete
    checkpoint (the EMA weights where stage 2 / the DiT saved them); a folder holding exactly
    one model folder gives that one. Anything else comes back as it is, for the loader to
    name what is missing."""
    path = Path(path)
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return path, None
    latest = latest_step_dir(path)
    if latest is not None:
        ema = (latest / "ema" / CONFIG_FILE).is_file()
        chosen = latest / "ema" if ema else latest
        return chosen, (f"using the latest checkpoint of the run {path}: {chosen}"
                        + (" (its EMA weights)" if ema else ""))
    found = sorted({c.parent for c in path.glob(f"*/{CONFIG_FILE}")} |
                   {c.parent for c in path.glob(f"*/*/{CONFIG_FILE}")})
    found = [f for f in found if (f / WEIGHTS_FILE).is_file()]
    if len(found) > 1:
        raise ValueError(f"{path} holds several model checkpoints; pass one of: "
                         f"{', '.join(map(str, found))}")
    if found:
        return found[0], f"using the model checkpoint {found[0]}"
    return path, None


def check_kind(config_data: dict, what: str, config_path) -> None:
    """A config.json of another kind of model (a DiT given where a ViTok is expected, a
    diffusers folder) is named as such, before its fields are read as ours."""
    if "_class_name" in config_data:  # diffusers writes it
        raise ValueError(f"{config_path} is a diffusers {config_data['_class_name']} folder, not "
                         f"a {what} checkpoint; pass the vitok_fast checkpoint it was converted "
                         f"from (vitok_fast/diffusers.py loads diffusers folders)")
    for kind, field in _KIND_FIELDS.items():
        if kind != what and field in config_data and _KIND_FIELDS.get(what) not in config_data:
            raise ValueError(f"{config_path.parent} is a {kind} checkpoint, not a {what}: "
                             f"pass it where a {kind} is expected"
                             + (" (sample --dit, train/dit.py --resume)" if kind == "DiT" else
                                " (--ckpt of the tools, train/dit.py --vitok)"))


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
    """The model of a directory written by :func:`save_model_dir` (or of a training run
    directory: its latest checkpoint, :func:`model_folder`, named on stderr): each file
    checked, a config of another kind of model named, the
    config built by ``config_cls.from_dict`` (with ``overrides``), the weights cast to
    ``torch_dtype`` if given, strict key and shape checks, on ``device`` (default CPU).
    ``what`` names the model in messages."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = "cpu" if device is None else device
    directory, note = model_folder(directory)
    if note:
        print(note, file=sys.stderr)
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
    check_kind(config_data, what, config_path)
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
