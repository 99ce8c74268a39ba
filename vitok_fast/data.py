"""Training and evaluation data: image folders, videos, WebDataset shards, embedded photos.

One entry point, ``make_dataset(source, resolution, frames)``, whose items are float32
tensors in [-1, 1]: ``(3, R, R)`` images or ``(3, T, R, R)`` clips. ``train=True`` takes a
random-resized crop and a random horizontal flip; ``train=False`` resizes the shorter side to
R and takes the centre crop (the paper's evaluation protocol).

Sources:
  ``embedded`` / ``embedded:val``  real photos that scikit-image ships, a few held out: a
      default that needs no download.
  ``embedded-video`` / ``embedded-video:val``  synthetic clips made by panning and zooming a
      window across those photos. They are *not* real videos: use them for smoke runs and
      tests, not to report video quality.
  a directory  recursive images (jpg, jpeg, png, webp) or, for clips, videos (mp4, webm,
      avi, mkv, mov); a single video file works too.
  ``"shards/{000..099}.tar"``  WebDataset tar shards (brace pattern), split by rank and
      data-loader worker; each sample is a jpg/png/webp image or an mp4/webm/avi video.

Labels: a folder laid out as ``root/<class>/<file>`` (every file exactly one directory below
the root, as ImageNet and UCF-101 are) gives label k to the k-th class name in sorted order
(``dataset.classes``); WebDataset samples with a ``cls`` entry carry that integer. Any other
item has label -1.

Unreadable files. Training (``train=True``) skips a file that cannot be decoded: it is
replaced by the next readable one, counted once and named in a warning, never a crash.
Evaluation, encoding and decoding (``train=False``) never substitute: iterating the dataset
gives exactly the readable items, in order, and ``ds[i]`` of an unreadable item raises
``UnreadableItem``. With ``with_meta=True`` every item is a dict ``{"x", "label", "index",
"path", "error"}`` (``x`` None and ``error`` the reason for an unreadable one) and
``collate_items`` batches them: the readable ones are stacked, the others listed with their
reason, so a consumer knows which file each output came from and which were dropped, across
data-loader workers and ranks. Files are checked when they are decoded, not by a scan up
front: a truncated JPEG passes PIL's header ``verify()`` and fails only when decoded, so a
scan could not replace the check at load time and would double the reading. ``dataset.skipped``
and ``dataset.skipped_files`` count and name the files skipped so far, across workers. An
empty folder or a pattern that matches nothing raises ``FileNotFoundError`` at construction,
before any training starts.

Randomness is a pure function of a per-sample seed, so a run that resumes at sample n sees
exactly the crops an uninterrupted run saw (``make_loader`` and ``StreamSampler``).
"""

from __future__ import annotations

import glob
import io
import math
import os
import random
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from vitok_fast.media import read_clip  # video decoding lives in vitok_fast/media.py

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov")

# Real photographs shipped inside scikit-image (no download). Synthetic images (logo,
# colorwheel, horse) are left out. Grayscale photos are used as RGB. [ours]
EMBEDDED_TRAIN = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina",
                  "stereo_motorcycle", "camera", "moon", "coins", "grass", "gravel", "brick",
                  "cell", "page", "text")
EMBEDDED_VAL = ("coffee", "rocket", "clock")  # held out: never seen by `embedded`

# [ours] Random-resized crop: area fraction and aspect ratio of the crop before it is resized
# to R x R. The paper says neither; torchvision's default area (0.08, 1) throws away too much
# of a photo for a reconstruction model, so we keep at least half of it.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def make_dataset(source: str, resolution: int, frames: int = 1, *, frame_stride: int = 1,
                 train: bool = True, seed: int = 0, with_meta: bool = False):
    """The dataset named by ``source`` (see the module docstring), items in [-1, 1].

    ``with_meta=True`` (evaluation only) makes every item a dict with its label, index and
    source path, unreadable ones included with ``x=None``; batch them with ``collate_items``.
    """
    if with_meta and train:
        raise ValueError("with_meta=True is for evaluation and encoding (train=False); training "
                         "items stay plain tensors")
    dataset = _make_dataset(source, resolution, frames, frame_stride=frame_stride, train=train,
                            seed=seed)
    dataset.with_meta = with_meta
    return dataset


def _make_dataset(source, resolution, frames, *, frame_stride, train, seed):
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if not isinstance(frames, int) or frames <= 0:
        raise ValueError(f"frames must be a positive integer (1 for images), got {frames!r}")
    if not isinstance(frame_stride, int) or frame_stride <= 0:
        raise ValueError(f"frame_stride must be a positive integer, got {frame_stride!r}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    common = dict(resolution=resolution, frames=frames, frame_stride=frame_stride, train=train,
                  seed=seed)
    if source in ("embedded", "embedded:val"):
        if frames != 1:
            raise ValueError(f"source 'embedded' holds photos; for clips of {frames} frames use "
                             f"'embedded-video' (pan/zoom clips made from the photos)")
        return EmbeddedPhotos(val=source.endswith(":val"), **common)
    if source in ("embedded-video", "embedded-video:val"):
        return EmbeddedPanZoomClips(val=source.endswith(":val"), **common)
    if source.startswith("embedded"):
        raise ValueError(f"unknown embedded source {source!r}: expected one of 'embedded', "
                         f"'embedded:val', 'embedded-video', 'embedded-video:val'")
    if "{" in source or source.endswith(".tar") or any(c in source for c in "*?["):
        shards = expand_shards(source)
        return TarShards(shards, **common)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in VIDEO_EXTS:
            raise ValueError(f"a single file source must be a video ({', '.join(VIDEO_EXTS)}), "
                             f"got {path}")
        return VideoClips([path], **common)
    if not path.is_dir():
        raise FileNotFoundError(f"data source {source!r} is neither a directory, a video file, a "
                                f"tar pattern like 'shards/{{000..099}}.tar', nor 'embedded'")
    images, videos = _scan(path, IMAGE_EXTS), _scan(path, VIDEO_EXTS)
    if frames == 1 and images:
        return ImageFolder(images, **common, **class_labels(path, images))
    if videos:
        return VideoClips(videos, **common, **class_labels(path, videos))
    if images:
        raise FileNotFoundError(
            f"{path} holds {len(images)} images but no videos ({', '.join(VIDEO_EXTS)}), and "
            f"clips of frames={frames} were asked for; use frames=1 or 'embedded-video'")
    raise FileNotFoundError(f"{path} holds no images ({', '.join(IMAGE_EXTS)}) or videos "
                            f"({', '.join(VIDEO_EXTS)}), searched recursively")


def class_labels(root: Path, files: list[Path]) -> dict:
    """``classes`` and per-file ``labels`` of a class-folder layout ``root/<class>/<file>``.

    The layout counts only when every file lies exactly one directory below ``root``; the
    class names are those directories (holding at least one file), sorted, and label k is
    the k-th name, as torchvision's ImageFolder numbers ImageNet. Otherwise there are no
    classes and every label is -1.
    """
    parts = [f.relative_to(root).parts for f in files]
    if not files or any(len(p) != 2 for p in parts):
        return {"classes": [], "labels": [-1] * len(files)}
    classes = sorted({p[0] for p in parts})
    number = {name: k for k, name in enumerate(classes)}
    return {"classes": classes, "labels": [number[p[0]] for p in parts]}


class UnreadableItem(ValueError):
    """An evaluation item whose file cannot be decoded (it is never replaced by another)."""


def collate_items(batch: list[dict]) -> dict:
    """Batch ``with_meta`` items: the readable ones stacked, the unreadable ones listed.

    Returns ``{"x": (B, ...) tensor or None when none was readable, "label": (B,) int64,
    "index": (B,) int64, "path": [B names], "skipped": [(index, path, reason), ...]}``, the
    readable items in the order they came.
    """
    good = [b for b in batch if b["x"] is not None]
    return {"x": torch.stack([b["x"] for b in good]) if good else None,
            "label": torch.tensor([b["label"] for b in good], dtype=torch.int64),
            "index": torch.tensor([b["index"] for b in good], dtype=torch.int64),
            "path": [b["path"] for b in good],
            "skipped": [(b["index"], b["path"], b["error"]) for b in batch if b["x"] is None]}


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


# -- crops: one random or central box per sample, the same box for every frame of a clip ----


def crop_box(width: int, height: int, rng: random.Random | None):
    """A square-output crop box (left, top, right, bottom) in source pixels.

    ``rng=None`` gives the evaluation crop: the central square of side min(W, H), which after
    resizing to R equals "shorter side to R, then centre crop".
    """
    if rng is None:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side
    area = width * height
    for _ in range(10):  # torchvision's RandomResizedCrop recipe
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return left, top, left + w, top + h
    return crop_box(width, height, None)


def to_tensor(images: list[Image.Image], box, resolution: int, flip: bool) -> torch.Tensor:
    """Crop ``box`` from each frame, resize to R x R (bicubic, antialiased), to [-1, 1]."""
    arrays = []
    for im in images:
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arrays.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2).float()  # (3, T, R, R)
    return x.div_(127.5).sub_(1.0)


def sample_seed(seed: int, epoch: int, index: int, purpose: int = 0) -> int:
    """A well-mixed 32-bit seed for one sample of one epoch (``purpose`` 1: shard order, 2:
    the epoch's permutation)."""
    return int(np.random.SeedSequence([seed, epoch, index, purpose]).generate_state(1)[0])


# -- map-style datasets ------------------------------------------------------------------------


class _Items(Dataset):
    """Shared logic: int or (index, seed) indexing, per-sample RNG, skip-and-count of bad items.

    ``ds[i]`` uses a fixed seed per index; the training sampler passes ``(i, seed)`` so that
    crops change every epoch. Bad items are flagged in a shared-memory tensor so that counts
    from data-loader workers reach the main process. Training replaces a bad item with the
    next readable one; evaluation never does (see the module docstring).
    """

    with_meta = False

    def __init__(self, n: int, resolution, frames, frame_stride, train, seed,
                 classes=(), labels=None):
        self.resolution, self.frames, self.frame_stride = resolution, frames, frame_stride
        self.train, self.seed = train, seed
        self.classes = list(classes)
        self.labels = list(labels) if labels is not None else [-1] * n
        self._bad = torch.zeros(n, dtype=torch.bool).share_memory_()
        self._warned: set[int] = set()

    def __len__(self):
        return len(self._bad)

    def names(self) -> list[str]:
        raise NotImplementedError

    def load(self, index: int, rng: random.Random | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """How many distinct unreadable items were skipped so far (all workers)."""
        return int(self._bad.sum())

    def skip_counts(self) -> torch.Tensor:
        """Per-item skip flags (int64); their sum is ``skipped``. Take the max over ranks."""
        return self._bad.long()

    @property
    def skipped_files(self) -> list[str]:
        names = self.names()
        return [names[i] for i in torch.nonzero(self._bad).flatten().tolist()]

    def _failed(self, i: int, e: Exception) -> str:
        self._bad[i] = True
        reason = _reason(e)
        if i not in self._warned:
            self._warned.add(i)
            warnings.warn(f"skipping unreadable item {self.names()[i]}: {reason}", stacklevel=3)
        return reason

    def __iter__(self):
        """The items in order; in evaluation, exactly the readable ones (never a substitute)."""
        for i in range(len(self)):
            try:
                item = self[i]
            except UnreadableItem:
                continue
            if self.with_meta and item["x"] is None:
                continue
            yield item

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, sample_seed(self.seed, 0, key))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        index %= n
        if not self.train:
            return self._eval_item(index)
        for attempt in range(n):
            i = (index + attempt) % n
            if self._bad[i]:
                continue
            rng = random.Random(seed) if self.train else None
            try:
                x = self.load(i, rng)
                if self.train and rng.random() < 0.5:
                    x = x.flip(-1)
                return x if self.frames > 1 else x[:, 0]
            except Exception as e:  # noqa: BLE001 -- any decode failure means "unreadable"
                self._bad[i] = True
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping unreadable item {self.names()[i]}: "
                                  f"{type(e).__name__}: {e}", stacklevel=2)
        raise RuntimeError(f"no readable item left: all {n} items failed to decode "
                           f"(first: {self.skipped_files[:3]})")

    def _eval_item(self, i: int):
        path = self.names()[i]
        try:
            x = self.load(i, None)
            x = x if self.frames > 1 else x[:, 0]
            error = None
        except Exception as e:  # noqa: BLE001 -- any decode failure means "unreadable"
            x, error = None, self._failed(i, e)
            if not self.with_meta:
                raise UnreadableItem(f"item {i} ({path}) cannot be decoded: {error}") from e
        if not self.with_meta:
            return x
        return {"x": x, "label": self.labels[i], "index": i, "path": path, "error": error}


class ImageFolder(_Items):
    """Images found recursively under a directory."""

    def __init__(self, files: list[Path], **kw):
        if kw["frames"] != 1:
            raise ValueError(f"an image folder gives single images, got frames={kw['frames']}")
        super().__init__(len(files), **kw)
        self.files = [str(f) for f in files]

    def names(self):
        return self.files

    def load(self, index, rng):
        with Image.open(self.files[index]) as im:
            im = im.convert("RGB")  # decodes fully: a truncated file raises here
        return to_tensor([im], crop_box(*im.size, rng), self.resolution, flip=False)


class VideoClips(_Items):
    """Clips of ``frames`` frames, ``frame_stride`` apart, from video files (PyAV).

    Training takes a random start; evaluation takes the clip starting at frame 0. A video
    shorter than one clip counts as unreadable (skipped and reported).
    """

    def __init__(self, files: list[Path], **kw):
        super().__init__(len(files), **kw)
        self.files = [str(f) for f in files]

    def names(self):
        return self.files

    def load(self, index, rng):
        frames = read_clip(self.files[index], self.frames, self.frame_stride, rng)
        return to_tensor(frames, crop_box(*frames[0].size, rng), self.resolution, flip=False)


def _scan(root: Path, exts) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())


def _embedded_photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    return Image.fromarray(array).convert("RGB")


class EmbeddedPhotos(_Items):
    """scikit-image's real photos: 15 for training, 3 held out (``embedded:val``)."""

    def __init__(self, val: bool, **kw):
        self.photo_names = EMBEDDED_VAL if val else EMBEDDED_TRAIN
        super().__init__(len(self.photo_names), **kw)
        self.photos = [_embedded_photo(n) for n in self.photo_names]

    def names(self):
        return [f"skimage.data.{n}" for n in self.photo_names]

    def load(self, index, rng):
        im = self.photos[index]
        return to_tensor([im], crop_box(*im.size, rng), self.resolution, flip=False)


class EmbeddedPanZoomClips(EmbeddedPhotos):
    """SYNTHETIC clips: a square window pans and zooms across one still photo.

    Each output frame is ``frame_stride`` steps of the camera path apart. Training draws a
    random start box, end box and speed; evaluation uses a fixed left-to-right pan with a
    slow zoom-in. Motion is rigid and there is no real scene dynamics: these clips are for
    smoke runs and tests, not for measuring video quality.
    """

    description = "synthetic pan/zoom clips over still photos (not real video)"

    def load(self, index, rng):
        im = self.photos[index]
        W, H = im.size
        steps = (self.frames - 1) * self.frame_stride  # path length in "source frames"
        short = min(W, H)
        if rng is None:
            s0, s1 = 0.8 * short, 0.7 * short
            c0, c1 = (s0 / 2, H / 2), (W - s1 / 2, H / 2)
        else:
            s0, s1 = rng.uniform(0.5, 1.0) * short, rng.uniform(0.5, 1.0) * short
            c0 = (rng.uniform(s0 / 2, W - s0 / 2), rng.uniform(s0 / 2, H - s0 / 2))
            c1 = (rng.uniform(s1 / 2, W - s1 / 2), rng.uniform(s1 / 2, H - s1 / 2))
        # The path covers at most 64 source frames; shorter clips see part of it, so a
        # larger stride means faster apparent motion, as in a real video.
        frac = [min(1.0, k * self.frame_stride / max(steps, 64)) for k in range(self.frames)]
        out = []
        for f in frac:
            s = s0 + f * (s1 - s0)
            cx, cy = c0[0] + f * (c1[0] - c0[0]), c0[1] + f * (c1[1] - c0[1])
            box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
            out.append(im.resize((self.resolution,) * 2, Image.Resampling.BICUBIC, box=box))
        return to_tensor(out, None, self.resolution, flip=False)


# -- WebDataset tar shards -----------------------------------------------------------------


def expand_shards(pattern: str) -> list[str]:
    """Expand ``{000..099}`` and ``{a,b}`` braces and shell globs; error if nothing exists."""
    names = _brace_expand(pattern)
    found = []
    for name in names:
        if any(c in name for c in "*?["):
            found.extend(sorted(glob.glob(os.path.expanduser(name))))
        elif os.path.isfile(os.path.expanduser(name)):
            found.append(os.path.expanduser(name))
    if not found:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file "
                                f"(expanded to {len(names)} names, e.g. {names[:2]})")
    missing = len(names) - len(found) if not any("*" in n for n in names) else 0
    if missing:
        warnings.warn(f"shard pattern {pattern!r}: {missing} of {len(names)} shards do not exist",
                      stacklevel=2)
    return found


_BRACE = re.compile(r"\{([^{}]*)\}")


def _brace_expand(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match[1], pattern[:match.start()], pattern[match.end():]
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise ValueError(f"bad range {{{body}}} in shard pattern {pattern!r}")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for opt in options for name in _brace_expand(head + opt + tail)]


class TarShards(IterableDataset):
    """WebDataset-format tar shards, streamed.

    Samples are the files of a shard grouped by key (the name up to the first dot); the
    first image (or, for clips, video) member of a sample is decoded. Training streams
    forever: each epoch shuffles the shard list with the seed and deals it out to the
    (rank, worker) streams; samples keep their order inside a shard (shuffle shards when you
    write them). Evaluation is one pass, split the same way. Rank and world size are read
    from torch.distributed at construction; ``make_loader`` sets the resume position.
    """

    def __init__(self, shards: list[str], *, resolution, frames, frame_stride, train, seed):
        self.shards = list(shards)
        self.resolution, self.frames, self.frame_stride = resolution, frames, frame_stride
        self.train, self.seed = train, seed
        self.rank, self.world = _rank_world()
        self.start_batches, self.batch_size = 0, 1
        self._bad = torch.zeros(len(self.shards), dtype=torch.int64).share_memory_()
        self.classes: list[str] = []  # a ``cls`` entry is a bare integer: no class names

    with_meta = False

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped in the shards read so far (counted once per shard)."""
        return int(self._bad.sum())

    def skip_counts(self) -> torch.Tensor:
        """Per-shard skip counts (int64); their sum is ``skipped``. Take the max over ranks."""
        return self._bad.clone()

    @property
    def skipped_files(self) -> list[str]:
        return [f"{self.shards[i]} ({int(c)} samples)" for i, c in enumerate(self._bad.tolist()) if c]

    def set_position(self, start_batches: int, batch_size: int) -> None:
        """Skip what this rank already consumed: ``start_batches`` batches of ``batch_size``."""
        self.start_batches, self.batch_size = start_batches, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream, streams = self.rank * workers + worker, self.world * workers
        if self.train and len(self.shards) < streams:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} ranks x "
                             f"{workers} workers: write at least {streams} shards or use fewer "
                             f"workers")
        # The DataLoader takes batches from its workers in turn, so worker w made batches
        # w, w + W, w + 2W, ... of those already consumed.
        done = max(0, (self.start_batches - worker + workers - 1) // workers)
        skip = done * self.batch_size
        epoch, position = 0, 0
        while True:
            order = list(range(len(self.shards)))
            if self.train:
                random.Random(sample_seed(self.seed, epoch, 0, purpose=1)).shuffle(order)
            for s in order[stream::streams]:
                for item in self._read_shard(s, epoch):
                    if self.with_meta:  # every sample, unreadable ones too, has a position
                        item["index"], position = position, position + 1
                    elif item["x"] is None:
                        continue
                    else:
                        item = item["x"]
                    if skip:
                        skip -= 1
                        continue
                    yield item
            if not self.train:
                return
            epoch += 1

    def _read_shard(self, s: int, epoch: int):
        """``{"x", "label", "path", "error"}`` per sample, ``x`` None where unreadable."""
        exts = VIDEO_EXTS if self.frames > 1 else IMAGE_EXTS
        bad = 0
        try:
            with tarfile.open(self.shards[s]) as tar:
                for j, (key, member, cls) in enumerate(_samples(tar, exts)):
                    rng = random.Random(sample_seed(self.seed, epoch, s * 1_000_003 + j)) \
                        if self.train else None
                    path = f"{self.shards[s]}/{member.name}"
                    try:
                        label = -1 if cls is None else _read_label(tar, cls)
                        data = tar.extractfile(member).read()
                        x = self._decode(data, rng)
                    except Exception as e:  # noqa: BLE001
                        bad += 1
                        if epoch == 0:
                            warnings.warn(f"skipping unreadable sample {key} in {self.shards[s]}: "
                                          f"{_reason(e)}", stacklevel=2)
                        yield {"x": None, "label": -1, "path": path, "error": _reason(e)}
                        continue
                    yield {"x": x, "label": label, "path": path, "error": None}
        except (tarfile.TarError, OSError) as e:
            bad += 1
            warnings.warn(f"skipping unreadable shard {self.shards[s]}: {e}", stacklevel=2)
            yield {"x": None, "label": -1, "path": self.shards[s], "error": _reason(e)}
        self._bad[s] = max(int(self._bad[s]), bad)

    def _decode(self, data: bytes, rng):
        if self.frames > 1:
            frames = read_clip(io.BytesIO(data), self.frames, self.frame_stride, rng)
        else:
            with Image.open(io.BytesIO(data)) as im:
                frames = [im.convert("RGB")]
        x = to_tensor(frames, crop_box(*frames[0].size, rng), self.resolution, flip=False)
        if rng is not None and rng.random() < 0.5:
            x = x.flip(-1)
        return x if self.frames > 1 else x[:, 0]


LABEL_EXTS = (".cls", ".cls.txt")  # WebDataset's class entry: the label as decimal text


def _samples(tar: tarfile.TarFile, exts):
    """(key, member, cls member or None) per sample of a shard that has a member with one of
    ``exts`` (the first such); a sample is the run of consecutive members sharing a key."""
    key, media, cls = None, None, None
    for member in tar:
        if not member.isfile():
            continue
        name = os.path.basename(member.name)
        k = os.path.join(os.path.dirname(member.name), name.split(".", 1)[0])
        ext = "." + name.split(".", 1)[1].lower() if "." in name else ""
        if k != key:
            if media is not None:
                yield key, media, cls
            key, media, cls = k, None, None
        if ext in exts and media is None:
            media = member
        elif ext in LABEL_EXTS and cls is None:
            cls = member
    if media is not None:
        yield key, media, cls


def _read_label(tar: tarfile.TarFile, member) -> int:
    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"its {os.path.basename(member.name)} entry should hold an integer "
                         f"class label, it holds {text[:20]!r}") from None


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# -- loading for training: a deterministic, resumable stream -------------------------------


class StreamSampler(Sampler):
    """An endless, deterministic stream of ``(index, sample_seed)`` for one rank.

    The global stream is epoch after epoch of seeded permutations of the dataset. It is cut
    into chunks of ``chunk`` items (one micro-batch), dealt out to ranks in turn: rank r gets
    chunks r, r + world, ... So one process with k micro-batches per step sees, in order, the
    same samples that k ranks see in one micro-batch each, and a run that resumes after
    ``start`` items of this rank continues the stream exactly.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1, chunk: int = 1,
                 start: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError(f"cannot sample from an empty dataset (n={n})")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.chunk, self.start, self.shuffle = chunk, start, shuffle

    def __len__(self):  # endless; DataLoader only asks when len(loader) is called
        raise TypeError("StreamSampler is endless")

    def global_position(self, j: int) -> int:
        """Position in the global stream of this rank's j-th item."""
        return ((j // self.chunk) * self.world + self.rank) * self.chunk + j % self.chunk

    def __iter__(self):
        perm_epoch, perm = -1, None
        j = self.start
        while True:
            g = self.global_position(j)
            epoch, offset = divmod(g, self.n)
            if epoch != perm_epoch:
                perm_epoch = epoch
                if self.shuffle:
                    gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0, purpose=2))
                    perm = torch.randperm(self.n, generator=gen).tolist()
                else:
                    perm = list(range(self.n))
            index = perm[offset]
            yield index, sample_seed(self.seed, epoch, index)
            j += 1


def make_loader(dataset, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                start_batches: int = 0, num_workers: int = 2, pin_memory: bool = False):
    """An endless DataLoader of ``batch_size`` batches for this rank, starting after
    ``start_batches`` batches it already consumed (exact resume)."""
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  drop_last=True, persistent_workers=False,
                  prefetch_factor=2 if num_workers else None)
    if isinstance(dataset, IterableDataset):
        streams = world * max(1, num_workers)
        if isinstance(dataset, TarShards) and dataset.train and len(dataset.shards) < streams:
            raise ValueError(f"{len(dataset.shards)} shards cannot feed {world} ranks x "
                             f"{max(1, num_workers)} workers: write at least {streams} shards "
                             f"or lower --num-workers")
        dataset.rank, dataset.world = rank, world
        dataset.set_position(start_batches, batch_size)
        return DataLoader(dataset, **common)
    sampler = StreamSampler(len(dataset), seed=seed, rank=rank, world=world, chunk=batch_size,
                            start=start_batches * batch_size)
    return DataLoader(dataset, sampler=sampler, **common)
