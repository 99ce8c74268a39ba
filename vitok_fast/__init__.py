"""vitok_fast: a fast, tested implementation of ViTok (arXiv 2501.09755)."""

from vitok_fast.config import PAPER_VARIANTS, SIZES, ViTokConfig
from vitok_fast.model import DiagonalGaussian, ViTok

__version__ = "0.1.0"
__all__ = ["PAPER_VARIANTS", "SIZES", "DiagonalGaussian", "ViTok", "ViTokConfig", "__version__"]
