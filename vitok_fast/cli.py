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
import functools
import importlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable


def lazy_exports(module: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A command module's PEP 562 ``__getattr__``: names it re-exports from the library (where
    they used to live) are imported on first use, so that its ``--help`` imports no torch.
    ``exports`` maps a name to its library module, or to ``"module:name"`` where it differs."""

    def __getattr__(name: str):
        if name in exports:
            source, _, attr = exports[name].partition(":")
            return getattr(importlib.import_module(source), attr or name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def lazy_function(module: str, name: str) -> Callable:
    """``module.name``, imported on the first call: a script's module-level name for a library
    function that stays a seam (a test may patch it) without importing torch with the script."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on the first call."
    return call


def no_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` for a command module's functions, importing torch on the first call
    rather than when the module is (its ``--help`` imports no torch)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The tools' ``--help``: the description as written, and ``(default: X)`` after an
    option's help unless the help already says its default or there is none to say (None,
    False, a suppressed default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or "default" in text.lower() or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose parse errors raise :class:`UserError` instead of printing a usage block
    and exiting: under :func:`run` they are one ``error:`` line like every other user error,
    and a test calling ``main(argv)`` sees the exception. Its ``--help`` uses
    :class:`HelpFormatter` unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # "argument --ckpt/--init: ..." names an option by its canonical name alone
        message = re.sub(r"^argument (--[\w-]+)(/--[\w-]+)+:", r"argument \1:", message)
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        # a default that needs torch to work out (--device's) is worked out only now, after
        # parsing, so that --help and a parse error never import torch
        namespace, extras = super().parse_known_args(args, namespace)
        for name, value in vars(namespace).items():
            if isinstance(value, LazyDefault):
                setattr(namespace, name, value.resolve())
        return namespace, extras


class LazyDefault:
    """An option's default that is worked out after parsing (by :class:`ArgumentParser`)."""

    def __init__(self, resolve: Callable[[], object], text: str):
        self.resolve, self.text = resolve, text

    def __str__(self) -> str:
        return self.text


# -- the options every tool spells the same way -------------------------------------------
# One name per thing across the tools and the training scripts (tests/test_cli_vocabulary.py
# walks every parser): --ckpt for an input checkpoint, --out for what a command writes, and
# one --lpips-vgg / --inception with the same values everywhere. Old names stay for one
# release as deprecated aliases that say so on stderr.

DEPRECATED_UNTIL = "0.2"


class _Store(argparse._StoreAction):
    """``store`` that prints one deprecation line when a deprecated alias is used."""

    def __init__(self, option_strings, dest, deprecated=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.deprecated = tuple(deprecated)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            print(f"warning: {option_string} is deprecated and goes in vitok_fast "
                  f"{DEPRECATED_UNTIL}; use {self.option_strings[0]}", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def add_option(parser, flag: str, *, deprecated: tuple[str, ...] = (), shared: str | None = None,
               **kwargs) -> argparse.Action:
    """``parser.add_argument(flag, *deprecated, ...)``: the deprecated aliases parse into the
    same option and print one deprecation line; ``shared`` marks an option built here, which
    the vocabulary test requires wherever that option appears."""
    if deprecated:
        kwargs["help"] = (f"{kwargs.get('help') or ''} ({', '.join(deprecated)}: the old "
                          f"name, deprecated)").lstrip()
    action = parser.add_argument(flag, *deprecated, action=_Store, deprecated=deprecated,
                                 **kwargs)
    action.shared = shared
    return action


CKPT_HELP = ("a ViTok: a folder written by save_pretrained, a training checkpoint "
             "(step_XXXXXXXX/) or a training run folder (its latest checkpoint)")


def add_ckpt(parser, help: str = CKPT_HELP, **kwargs) -> argparse.Action:
    """``--ckpt``: the checkpoint a command reads."""
    return add_option(parser, "--ckpt", metavar="CKPT", help=help, **kwargs)


def add_out(parser, help: str, *, type=None, **kwargs) -> argparse.Action:
    """``--out``: what a command writes (a file or a folder, as ``type`` checks)."""
    return add_option(parser, "--out", metavar="OUT", type=type or output_dir, help=help,
                      **kwargs)


def add_lpips_vgg(parser) -> argparse.Action:
    """``--lpips-vgg``: a file, or ``random`` (vitok_fast.perceptual.load_lpips reads both)."""
    return add_option(parser, "--lpips-vgg", default=None, metavar="PATH", shared="lpips-vgg",
                      help="VGG16 weights for LPIPS, vgg16-397923af.pth (default: torchvision's "
                      "cache); 'random' = a random backbone, for smoke runs and tests only: "
                      "its distances mean nothing")


def add_inception(parser) -> argparse.Action:
    """``--inception``: the FID / IS network's weights (vitok_fast.metrics.load_inception)."""
    return add_option(parser, "--inception", default=None, metavar="PATH", shared="inception",
                      help="Inception weights for FID and IS, torch-fidelity's "
                      "weights-inception-2015-12-05-6726825d.pth (no default: nothing is "
                      "downloaded)")


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


DEFAULT_DEVICE = LazyDefault(lambda: default_device(), "cuda if available, else cpu")


def add_device(parser, *, later: bool = False) -> argparse.Action:
    """``--device``: cpu, cuda or cuda:N, checked as it is parsed. Its default is this machine's
    choice, or None with ``later=True`` for a caller that chooses per rank (training)."""
    return add_option(parser, "--device", type=device, metavar="DEVICE", shared="device",
                      default=None if later else DEFAULT_DEVICE,
                      help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def add_no_kernels(parser, help: str = "plain-PyTorch ops instead of the fused Triton "
                   "kernels") -> argparse.Action:
    """``--no-kernels``: the plain-PyTorch reference ops instead of the fused Triton kernels."""
    action = parser.add_argument("--no-kernels", action="store_true", help=help)
    action.shared = "no-kernels"
    return action
