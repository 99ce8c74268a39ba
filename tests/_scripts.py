"""The scripts of train/ and bench/ as modules, loaded from their files: they are not a
package, and their folders stay off sys.path."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """``load_script("train/stage1.py")``: a fresh module of that file, ``main`` and all."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"vitok_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module
