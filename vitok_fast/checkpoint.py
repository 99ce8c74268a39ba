"""Training checkpoints that survive crashes and resume exactly.

A checkpoint is a directory ``<run>/step_00001000/`` holding

  config.json, model.safetensors   the model, written by ``ViTok.save_pretrained``, so
                                   ``ViTok.from_pretrained(<run>/step_00001000)`` loads it
  ema/                             stage 2: the model with the EMA decoder (use it to evaluate)
  train_state.pt                   optimizer(s), scheduler(s), step, RNG states of every rank,
                                   data position, skip counters, the run's arguments

Atomicity: everything is written into a hidden temporary directory next to the final one
(each file through ``atomic_write``: temp file, fsync, rename), then the directory is renamed
into place and its parent fsynced. A crash at any point leaves at worst a ``.step_*.tmp``
directory, which ``list_checkpoints`` ignores and the next save removes; the last complete
checkpoint is never touched until a newer one is complete. Only the last ``keep`` are kept.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from vitok_fast.fileio import atomic_write
from vitok_fast.model import CONFIG_FILE, WEIGHTS_FILE, ViTok

STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step: int, model: ViTok, state: dict, *,
                    extra_models: dict[str, ViTok] | None = None, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    ``model`` must be a plain (unwrapped) ViTok; ``state`` anything ``torch.save`` takes.
    ``extra_models`` go to sub-directories (``{"ema": ema_model}``). Returns the directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    for stale in run_dir.glob(".step_*.tmp"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=run_dir))
    try:
        model.save_pretrained(tmp)
        for sub, extra in (extra_models or {}).items():
            extra.save_pretrained(tmp / sub)
            _fsync_dir(tmp / sub)
        atomic_write(tmp / STATE_FILE, lambda path: torch.save(state, path))
        _fsync_dir(tmp)
        final = run_dir / name
        if final.exists():  # the same step saved again (e.g. after a resume): swap it out
            old = run_dir / f".{name}.old.tmp"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old_dir in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old_dir, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE))


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``run_dir`` as ``(step, path)``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match[1]), path))
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(spec: str | None, run_dir, flag: str = "--resume") -> Path | None:
    """``--resume`` semantics: ``None``/``""`` = start fresh; ``auto`` = the latest complete
    checkpoint in ``run_dir`` if any; otherwise a checkpoint directory, or a run directory
    (its latest), which must exist."""
    if not spec:
        return None
    if spec == "auto":
        return latest_checkpoint(run_dir)
    path = Path(spec).expanduser()
    if path.is_dir() and is_complete(path):
        return path
    if path.is_dir() and (latest := latest_checkpoint(path)) is not None:
        return latest
    raise FileNotFoundError(
        f"{flag} {spec}: expected a checkpoint directory holding {CONFIG_FILE}, {WEIGHTS_FILE} "
        f"and {STATE_FILE} (e.g. {Path(run_dir) / step_dir_name(1000)}), or a run directory "
        f"with such checkpoints, or 'auto'")


def load_state(path) -> dict:
    """The ``train_state.pt`` of a checkpoint directory (on the CPU)."""
    # weights_only=False: the state holds Python RNG states and argument dicts we wrote.
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
