"""Minimal stand-in for the training engineer's data pipeline (same contract, fewer sources).

Only image directories and the embedded scikit-image photos are implemented here, so that the
evaluation tools can run and be tested on this branch; the full module (videos, WebDataset
shards, train-time augmentation) replaces this file at merge time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_EMBEDDED = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
             "motorcycle_left", "retina", "cat", "camera")
_VAL = ("chelsea", "coffee", "rocket")


def _resize_center_crop(img: Image.Image, r: int) -> torch.Tensor:
    """The evaluation protocol: shorter side to r (bicubic), centre crop r x r, to [-1, 1]."""
    w, h = img.size
    s = r / min(w, h)
    img = img.resize((max(r, round(w * s)), max(r, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - r) // 2, (h - r) // 2
    img = img.crop((left, top, left + r, top + r))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


class _Images(torch.utils.data.Dataset):
    def __init__(self, load_fns, resolution):
        self.load_fns, self.resolution, self.skipped = load_fns, resolution, 0

    def __len__(self):
        return len(self.load_fns)

    def __getitem__(self, i):
        return _resize_center_crop(self.load_fns[i]().convert("RGB"), self.resolution)


def make_dataset(source: str, resolution: int, frames: int = 1, *, frame_stride: int = 1,
                 train: bool = True, seed: int = 0):
    if frames != 1:
        raise NotImplementedError("this stand-in data module reads images only")
    if source in ("embedded", "embedded:val"):
        import skimage.data

        names = _VAL if source.endswith(":val") else tuple(n for n in _EMBEDDED if n not in _VAL)
        fns = [lambda n=n: Image.fromarray(getattr(skimage.data, n)()) for n in names]
        return _Images(fns, resolution)
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"data source {source!r} is neither 'embedded[:val]' nor a directory")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({sorted(IMAGE_EXTS)}) found under {source}")
    return _Images([lambda p=p: Image.open(p) for p in files], resolution)
