"""vitok_fast: a fast, tested implementation of ViTok (arXiv 2501.09755).

The public names load on first use (PEP 562), so ``import vitok_fast.interpret`` (which must
run before triton is imported, see interpret.py) imports neither the model nor Triton.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["PAPER_VARIANTS", "SIZES", "DiagonalGaussian", "ViTok", "ViTokConfig", "__version__"]

_HOMES = {"PAPER_VARIANTS": "vitok_fast.config", "SIZES": "vitok_fast.config",
          "ViTokConfig": "vitok_fast.config", "DiagonalGaussian": "vitok_fast.model",
          "ViTok": "vitok_fast.model"}


def __getattr__(name):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitok_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
