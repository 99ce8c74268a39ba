"""How every command-line tool reports a user error: one line, exit status 2, no traceback.

A tool raises :class:`UserError` (or ``FileNotFoundError`` / ``ValueError`` from the library's
edge checks) with a message that says what was expected, what was given and what to do;
:func:`run` prints ``error: <message>`` on stderr and exits 2. ``VITOK_DEBUG=1`` re-raises
instead, so the traceback is there when a developer wants it. Anything else is a bug and
keeps its traceback.

Options are checked while they are parsed, before any work starts: every tool builds its
parser with :class:`ArgumentParser` (whose own errors, such as an unknown choice or a missing
required option, are a ``UserError`` too, so they read like every other error) and gives
each option one of the ``type=`` validators below (``positive_int``, ``existing_file``, ...).

A tool that takes a ViTok checkpoint opens it with :func:`load_vitok`: the model, the size
it runs at (the checkpoint's training resolution unless given, :func:`input_size`) checked
against it, and the tool's first line on stderr saying both.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix: a bad option, a missing file, a mismatched checkpoint."""


# Exceptions that the library raises only for input it was given (checked at the edge), and
# FloatingPointError, which only training's non-finite guard raises, with what to change.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError,
               FloatingPointError)


def run(main: Callable[..., object], *args, **kwargs):
    """Call ``main``; turn a user error into ``error: ...`` on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("VITOK_DEBUG") == "1":
            raise
        message = str(e) if str(e) else type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and e.filename not in message:
            message = f"{message}: {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def first_sentence(error: Exception, limit: int = 100) -> str:
    """The start of a library's error message, for quoting inside one of ours."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose parse errors raise :class:`UserError` instead of printing a usage block
    and exiting: under :func:`run` they are one ``error:`` line like every other user error,
    and a test calling ``main(argv)`` sees the exception."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def option(flag: str, value):
    """Name the option a library error came from: ``with cli.option("--data", args.data):``
    turns "no images in X" into "--data X: no images in X"."""
    try:
        yield
    except (UserError, FileNotFoundError, ValueError) as e:
        if flag in str(e):
            raise
        raise UserError(f"{flag} {value}: {e}") from e


# -- type= validators: argparse reports them as "argument --flag: <message>" -------------


def _number(kind, text: str, expected: str, ok: Callable[[float], bool]):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value) or (kind is float and not math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    """A count: 1, 2, 3, ..."""
    return _number(int, text, "a positive integer", lambda v: v > 0)


def nonnegative_int(text: str) -> int:
    """0, 1, 2, ... (worker counts, seeds)."""
    return _number(int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """A loss weight or a decay: 0 switches the term off."""
    return _number(float, text, "a number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _number(float, text, "a number between 0 and 1", lambda v: 0 <= v <= 1)


def existing_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file, got {text}, which is a directory")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"expected an existing file, got {text}, which does not exist")
    return text


def existing_dir(text: str) -> str:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a directory, got {text}, which is a file")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"expected an existing directory, got {text}, which does not exist")
    return text


def output_dir(text: str) -> str:
    """A directory to write into: it may not exist yet, but must not be a file."""
    if Path(text).expanduser().exists() and not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(
            f"expected an output directory, got {text}, which is a file; choose another path")
    return text


def output_file(text: str) -> str:
    """A file to write: it may exist (it is replaced), but must not be a directory."""
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(
            f"expected an output file, got {text}, which is a directory; give a file name in it")
    return text


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where there is a GPU."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, "
                                         f"got {text!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"got {text}, but no CUDA device is available; "
                                             f"use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"got {text}, but only {count} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- checks that need the model (its patch and tubelet sizes) ----------------------------


def check_sizes(config, *, resolution=None, frames=None, tile=None, overlap=None) -> None:
    """``--resolution``, ``--frames``, ``--tile`` and ``--overlap`` against the model, before
    the first batch: sizes are whole patches (p pixels) and clips whole tubelets (q frames)."""
    p, q = config.patch_size, config.tubelet_size
    if resolution is not None and resolution % p:
        raise UserError(f"--resolution must be a multiple of the patch size {p} of {config.name}, "
                        f"got {resolution}; try {max(p, round(resolution / p) * p)}")
    if frames is not None and frames != 1 and not config.is_video:
        raise UserError(f"--frames {frames} is for video models; {config.name} is an image model "
                        f"(leave --frames out)")
    if frames is not None and frames % q:
        raise UserError(f"--frames must be a multiple of the tubelet size {q} of {config.name}, "
                        f"got {frames}; try {max(q, frames // q * q)}")
    if tile is None:
        if overlap is not None:
            raise UserError(f"--overlap {overlap} is given without --tile; add --tile PIXELS")
        return
    if tile % p:
        raise UserError(f"--tile must be a multiple of the patch size {p} of {config.name}, "
                        f"got {tile}; try {max(p, round(tile / p) * p)}")
    if overlap is not None and (overlap % p or overlap >= tile):
        raise UserError(f"--overlap must be a multiple of the patch size {p} and smaller than "
                        f"--tile {tile}, got {overlap}")


# -- the ViTok a tool opens, and the size it runs at --------------------------------------


def input_size(config, trained: dict | None, resolution=None, frames=None) -> dict:
    """The ``resolution`` and ``frames`` a tool runs ``config`` at: the given ones, else the
    checkpoint's training setting (``trained``, from :func:`checkpoint.training_settings`),
    else the paper's defaults (256 px images, 16 x 128 px videos). Returns them with
    ``trained_resolution`` / ``trained_frames`` (None when not recorded) and ``size_source``:
    "checkpoint", "given" or "default"."""
    video = config.is_video
    t_res = trained.get("resolution") if trained else None
    t_frames = (trained.get("frames") or 1) if trained else None
    if resolution is None and frames is None:
        source = "checkpoint" if t_res else "default"
    else:
        source = "given"
    res = resolution or t_res or (128 if video else 256)
    fr = frames or (t_frames if t_res else None) or (16 if video else 1)
    return {"resolution": res, "frames": fr, "trained_resolution": t_res,
            "trained_frames": t_frames, "size_source": source}


def describe_size(size: dict, given: str = "given") -> str:
    """``64 px (its training resolution)`` and the like, for a tool's first line; ``given``
    names where a size not from the checkpoint came from."""
    what = f"{size['resolution']} px" + (f" x {size['frames']} frames" if size["frames"] > 1 else "")
    trained = size["trained_resolution"]
    trained_what = (f"{trained} px" + (f" x {size['trained_frames']} frames"
                                       if (size["trained_frames"] or 1) > 1 else "")) if trained else None
    if size["size_source"] == "checkpoint":
        return f"{what} (its training resolution)"
    if size["size_source"] == "default":
        return f"{what} (the default: the checkpoint records no training resolution; " \
               f"set --resolution)"
    if trained and (size["resolution"], size["frames"]) != (trained, size["trained_frames"]):
        return f"{what} ({given}; NOT the training resolution {trained_what})"
    return f"{what} ({given}" + ("; the training resolution)" if trained else ")")


def load_vitok(spec, tool: str, *, device="cpu", no_kernels: bool = False, resolution=None,
               frames=None, tile=None, overlap=None, verbose: bool = True,
               native: Callable | None = None, given: str = "given"):
    """The ViTok of ``--ckpt spec`` (a model folder, a checkpoint, a run directory) for a
    command: returns ``(model, model folder, size)`` where ``size`` is :func:`input_size`.
    The sizes are checked against the model (:func:`check_sizes`), then the command's first
    line goes to stderr, naming the model, the folder it came from and the size it runs at.
    ``native(size)`` true (reconstruct) keeps inputs at their own size: ``size["resolution"]``
    is then None. ``given`` says where a ``resolution`` passed in came from."""
    from vitok_fast.checkpoint import resolve_ckpt, training_settings
    from vitok_fast.model import ViTok
    from vitok_fast.pretrained import model_folder

    folder = resolve_ckpt(spec, quiet=True)
    _, note = model_folder(spec)
    model = ViTok.from_pretrained(folder, device=device,
                                  **({"use_kernels": False} if no_kernels else {}))
    size = input_size(model.config, training_settings(folder), resolution, frames)
    said = describe_size(size, given)
    if native is not None and native(size):
        said = "each input's own size, centre-cropped to whole patches" + (
            "" if size["size_source"] != "default" else
            " (the checkpoint records no training resolution; set --resolution to resize)")
        size["resolution"] = None
    check_sizes(model.config, resolution=size["resolution"], frames=frames, tile=tile,
                overlap=overlap)
    where = f"{folder} (the latest checkpoint of the run {spec})" if note and "latest" in note \
        else str(folder)
    if verbose:  # rank 0 of a sharded run
        print(f"{tool}: ViTok {model.config.name} from {where} at {said}", file=sys.stderr)
    return model, folder, size
