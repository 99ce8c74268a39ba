"""Image and video files, and pixels for a model: the one place that reads and writes them.

Arrays are uint8 and channels-last: images (H, W, 3), videos (T, H, W, 3); pixels for the model
are float (3, H, W) or (3, T, H, W) in [-1, 1] (:func:`to_pixels`, :func:`to_array`).
Videos are read and written with PyAV: :func:`read_video` (every frame, for reconstruction),
:func:`read_clip` (``frames`` frames ``stride`` apart at a random or the first start, for the
data pipeline, vitok_fast/data.py), :func:`write_video` (H.264 MP4). Used by the data
pipeline, ``python -m vitok_fast.reconstruct``, ``decode``, ``sample`` and ``plots``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vitok_fast.fileio import atomic_write


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e})") from None
    except Exception as e:  # noqa: BLE001 -- a decoder's own failure: this file is unreadable
        raise ValueError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from e


def read_video(path: Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """All frames (or the first max_frames) as (T, H, W, 3) uint8, and the frame rate."""
    import av

    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 25)
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot read {path} as a video ({e})") from None
    except Exception as e:  # noqa: BLE001 -- a decoder's own failure (a corrupt file can make
        # PyAV raise UnicodeDecodeError on its metadata, or anything mid-stream): this file
        # is unreadable, the others of a batch are not
        raise ValueError(f"cannot read {path} as a video ({type(e).__name__}: {e})") from e
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames), fps


def write_image(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def write_video(path: Path, frames: np.ndarray, fps: float = 25.0) -> None:
    """(T, H, W, 3) uint8 -> H.264 MP4 (MPEG-4 part 2 where libx264 is not built in)."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=round(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}  # near-lossless: the file is for looking at
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def to_pixels(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, H, W), or (T, H, W, 3) -> (3, T, H, W), in [-1, 1]."""
    t = torch.from_numpy(array)
    t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(3, 0, 1, 2)
    return t.float() / 127.5 - 1.0


def to_array(pixels_u8: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) or (3, T, H, W) -> channels-last numpy."""
    t = pixels_u8.permute(1, 2, 0) if pixels_u8.ndim == 3 else pixels_u8.permute(1, 2, 3, 0)
    return t.contiguous().cpu().numpy()



def read_clip(file, frames: int, stride: int, rng: random.Random | None) -> list:
    """Decode ``frames`` frames ``stride`` apart from a video (a path or a file object), as
    PIL images; the clip starts at ``rng``'s choice, or at frame 0 without one."""
    import av

    span = (frames - 1) * stride + 1
    with av.open(file) as container:
        stream = container.streams.video[0]
        total = stream.frames
        if total <= 0:  # some containers (webm) carry no frame count: count packets instead
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        if total < span:
            raise ValueError(f"video has {total} frames, a clip of {frames} frames with stride "
                             f"{stride} needs {span}")
        start = rng.randrange(total - span + 1) if rng is not None else 0
        wanted = set(range(start, start + span, stride))
        out = []
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out.append(frame.to_image())
                if len(out) == frames:
                    return out
    raise ValueError(f"video decoded to fewer frames than its header says ({len(out)} of "
                     f"{frames} wanted from start {start})")


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_sample_grid(path, pixels: torch.Tensor, rows: int, labels=None, captions=None) -> None:
    """A PNG of (N, 3, H, W) samples (videos: their first frames; float in [-1, 1] or uint8)
    in ``rows`` rows; ``labels`` names each row (a strip on the left: the class), ``captions``
    each cell (a strip under it: e.g. its PSNR)."""
    from PIL import Image, ImageDraw

    if pixels.ndim == 5:
        pixels = pixels[:, :, 0]
    if pixels.dtype != torch.uint8:
        pixels = to_uint8(pixels)
    cols = len(pixels) // rows
    H, W = pixels.shape[2:]
    grid = pixels[:rows * cols].reshape(rows, cols, *pixels.shape[1:])
    grid = grid.permute(2, 0, 3, 1, 4).reshape(3, rows * H, cols * W)
    image = Image.fromarray(grid.permute(1, 2, 0).cpu().numpy())
    if labels is not None or captions is not None:
        left = 8 + 6 * max((len(str(t)) for t in labels), default=0) if labels is not None else 0
        below = 12 if captions is not None else 0
        canvas = Image.new("RGB", (left + cols * W, rows * (H + below)), "white")
        draw = ImageDraw.Draw(canvas)
        for r in range(rows):
            top = r * (H + below)
            canvas.paste(image.crop((0, r * H, cols * W, (r + 1) * H)), (left, top))
            if labels is not None:
                draw.text((4, top + H // 2 - 5), str(labels[r]), fill="black")
            for c in range(cols):
                if captions is not None and r * cols + c < len(captions):
                    draw.text((left + c * W + 2, top + H), str(captions[r * cols + c]), fill="black")
        image = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# -- pixels for a model ---------------------------------------------------------------------


@torch.no_grad()
def reconstruct_pixels(model, x: torch.Tensor, tile=None, overlap=None) -> torch.Tensor:
    """(B, 3, [T,] H, W) -> the model's reconstruction from the posterior mean, clamped."""
    z = model.encode(x, tile=tile, overlap=overlap).mode()
    return model.decode(z, tile=tile, overlap=overlap).clamp(-1, 1)


def fit_to_model(x: torch.Tensor, cfg, resolution: int | None, path) -> torch.Tensor:
    """Resize/centre-crop (3, [T,] H, W) pixels to a size the model takes, or say why not."""
    import torch.nn.functional as F

    H, W = x.shape[-2:]
    p = cfg.patch_size
    if resolution is not None:
        if resolution % p:
            raise ValueError(f"--resolution must be a multiple of the patch size {p}, got {resolution}")
        s = resolution / min(H, W)
        size = (max(resolution, round(H * s)), max(resolution, round(W * s)))
        flat = x.reshape(-1, 3, H, W) if x.ndim == 3 else x.transpose(0, 1)
        flat = F.interpolate(flat, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = (flat[0] if x.ndim == 3 else flat.transpose(0, 1)).clamp(-1, 1)
        H, W, h, w = *size, resolution, resolution
    else:
        if H < p or W < p:
            raise ValueError(f"{path} is {H}x{W} pixels, smaller than one {p}x{p} patch of "
                             f"{cfg.name}: expected at least {p}x{p}")
        h, w = H // p * p, W // p * p
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]
