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

Damage after the fact (a file truncated or deleted by a full disk, a bad copy, a user) is
caught on resume: :func:`load_resume` opens every file of the checkpoint and names the one
that does not read. ``--resume auto`` then falls back to the newest checkpoint that does,
and says which; an explicit ``--resume PATH`` stops with the file's name instead.

:func:`resolve_ckpt` turns what a user passes as ``--ckpt`` (a model folder, a run, a folder
holding one model) into the model folder; every command and train/dit.py use it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from vitok_fast.faults import kill_point
from vitok_fast.fileio import atomic_write
from vitok_fast.pretrained import CONFIG_FILE, WEIGHTS_FILE

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


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, state: dict, *,
                    extra_models: dict[str, torch.nn.Module] | None = None, keep: int = 3) -> Path:
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
        kill_point("save", step, run_dir)  # test hook: a crash halfway through the save
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


class CheckpointError(ValueError):
    """A checkpoint file is missing or does not read; the message names the file."""


def _check_model_dir(directory: Path) -> None:
    """``config.json`` parses and ``model.safetensors`` has a whole header whose tensors the
    file covers (safetensors checks that on open: a truncated file fails here)."""
    import json

    from safetensors import safe_open

    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing")
    try:
        json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} does not read: {e}") from None
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError, OSError: truncated, empty, not safetensors
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not read (truncated or "
                              f"damaged?): {e}") from None


def read_checkpoint(path) -> dict:
    """Check every file of checkpoint ``path`` (the model, each sub-model such as ``ema/``,
    the train state) and return the train state; :class:`CheckpointError` names the first
    file that is missing or does not read."""
    path = Path(path)
    _check_model_dir(path)
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        _check_model_dir(sub)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path / STATE_FILE} is missing")
    try:
        state = load_state(path)
    except Exception as e:  # RuntimeError (zip), EOFError, OSError, UnpicklingError
        raise CheckpointError(f"{path / STATE_FILE} does not read (truncated or damaged?): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / STATE_FILE} holds no training state")
    return state


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory, complete or not, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted((int(m[1]), p) for p in run_dir.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def load_resume(spec: str | None, run_dir, verbose: bool = True,
                log=None) -> tuple[Path | None, dict | None]:
    """``--resume`` with every file checked: ``(checkpoint, train state)``, or ``(None,
    None)`` for a fresh start. ``auto`` takes the newest checkpoint in ``run_dir`` that
    reads, and logs each one it passes over and which it used; a named checkpoint (or run
    directory: its newest) that does not read raises :class:`CheckpointError` naming the
    file, since falling back there would silently train from another step. Messages go to
    ``log`` (default: stderr), only if ``verbose`` (rank 0)."""
    if log is None:
        log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if not verbose:
        log = lambda message: None  # noqa: E731
    if not spec:
        return None, None
    if spec != "auto":
        path = Path(spec).expanduser()
        if path.is_dir() and not _STEP_DIR.match(path.name) and _step_dirs(path):
            path = _step_dirs(path)[-1][1]  # a run directory: its newest checkpoint
        elif not (path.is_dir() and any((path / f).exists()
                                        for f in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE))):
            path = resolve_checkpoint(spec, run_dir)  # raises: what --resume expects
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"--resume {spec}: {e}; resume from an earlier checkpoint, or "
                                  f"pass --resume auto to use the newest one that reads") from None
    skipped = []
    for _, path in reversed(_step_dirs(Path(run_dir))):
        try:
            state = read_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: --resume auto: skipping {path.name}: {e}")
            skipped.append(path.name)
            continue
        if skipped:
            log(f"--resume auto: resuming from {path}, the newest checkpoint that reads "
                f"(unusable: {', '.join(skipped)})")
        return path, state
    if skipped:
        raise CheckpointError(
            f"--resume auto: no checkpoint in {run_dir} reads ({', '.join(skipped)}); move them "
            f"aside, or pass --resume '' to start fresh")
    return None, None


def resolve_ckpt(path) -> Path:
    """A save_pretrained directory; a training run directory (its latest checkpoint, the
    EMA weights where stage 2 saved them); or a folder holding exactly one model folder.

    Training checkpoints keep the model's save_pretrained folder inside (next to optimizer
    state); pointing at the outer folder is the common slip, so it is resolved when
    unambiguous and otherwise answered with the candidates.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt expects a checkpoint directory written by save_pretrained, "
                                f"got {path}, which is not a directory")
    if (path / CONFIG_FILE).is_file():
        return path
    latest = latest_checkpoint(path)  # a training run directory: its latest checkpoint,
    if latest is not None:           # with the stage-2 EMA weights where there are some
        chosen = latest / "ema" if (latest / "ema" / CONFIG_FILE).is_file() else latest
        print(f"using the latest checkpoint of the run: {chosen}", file=sys.stderr)
        return chosen
    found = sorted({c.parent for c in path.glob(f"*/{CONFIG_FILE}")} |
                   {c.parent for c in path.glob(f"*/*/{CONFIG_FILE}")})
    found = [f for f in found if (f / WEIGHTS_FILE).is_file()]
    if len(found) == 1:
        print(f"using the model checkpoint {found[0]}", file=sys.stderr)
        return found[0]
    if len(found) > 1:
        raise ValueError(f"{path} holds several model checkpoints; pass one of: "
                         f"{', '.join(map(str, found))}")
    return path  # from_pretrained names the missing config.json / model.safetensors
