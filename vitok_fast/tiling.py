"""Tiled encode and decode for inputs too big for one pass.

Attention memory and time grow with the token count, so a 2048x2048 image (16k tokens at
p=16) or a long video is cut into overlapping tiles (space) and chunks (time), each run on
its own, and the outputs are blended with linear ramps across the overlaps: every output
position is a weighted mean of the tiles that cover it, with weights falling towards each
tile's inner edges, which hides the seams a hard cut would leave. [ours: the paper only
evaluates at fixed 256p/512p/128p sizes.]

Sizes are in pixels and frames for both directions: ``tile=512, overlap=128`` means 512x512
pixel tiles overlapping by 128 pixels, whether encoding pixels or decoding latents. Videos
take ``tile=(frames, height, width)``; an int tiles space only.
"""

from __future__ import annotations

import itertools

import torch


def _as_triple(value, name: str, video: bool):
    if isinstance(value, int) and not isinstance(value, bool):
        return (None, value, value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        if len(value) == 2:
            return (None, *value)
        if len(value) == 3 and video:
            return tuple(value)
    raise ValueError(f"{name} must be an int (pixels) or (height, width)"
                     f"{' or (frames, height, width)' if video else ''}, got {value!r}")


def _plan(cfg, shape, tile, overlap, video: bool):
    """Per axis (T, H, W) in pixel/frame units: (tile, overlap, unit), tile None = whole axis."""
    units = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
    tile = _as_triple(tile, "tile", video)
    if overlap is None:  # default: a quarter of the tile, on the axis' grid
        overlap = tuple(None if t is None else (t // 4) // u * u for t, u in zip(tile, units))
    else:
        overlap = _as_triple(overlap, "overlap", video)
    plan = []
    for axis, size, t, o, u in zip("THW", shape, tile, overlap, units):
        if t is None or t >= size:
            plan.append((size, 0, u))
            continue
        o = o or 0
        if t < u or t % u or o % u or not 0 <= o < t:
            raise ValueError(
                f"tile and overlap along {axis} must be multiples of {u} with 0 <= overlap < tile, "
                f"got tile {t} and overlap {o}")
        plan.append((t, o, u))
    return plan


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]  # the last tile ends flush with the input


def _ramp(n: int, left: int, right: int) -> torch.Tensor:
    """Weights over one axis of a tile: rise over `left`, fall over `right`, 1 between."""
    i = torch.arange(1, n + 1, dtype=torch.float32)
    w = torch.ones(n)
    if left > 0:
        w = torch.minimum(w, i / (left + 1))
    if right > 0:
        w = torch.minimum(w, i.flip(0) / (right + 1))
    return w


def _run_tiled(fn, x, plan, scale):
    """Apply fn to tiles of x's last three dims and blend; scale[i] = output/input size ratio."""
    sizes = x.shape[-3:]
    axes = []
    for size, (tile, overlap, unit) in zip(sizes, plan):
        starts = _starts(size, tile, overlap)
        axes.append([(s, min(tile, size), starts[k - 1] + tile - s if k else 0,
                      s + tile - starts[k + 1] if k + 1 < len(starts) else 0)
                     for k, s in enumerate(starts)])
    out = weight = None
    for pieces in itertools.product(*axes):
        index = tuple(slice(s, s + n) for s, n, _, _ in pieces)
        y = fn(x[(..., *index)])
        if out is None:
            out_sizes = [round(n * f) for n, f in zip(sizes, scale)]
            out = torch.zeros(*y.shape[:-3], *out_sizes, dtype=torch.float32, device=y.device)
            weight = torch.zeros(out_sizes, dtype=torch.float32, device=y.device)
        w = torch.ones((), device=y.device)
        for d, ((s, n, left, right), f) in enumerate(zip(pieces, scale)):
            r = _ramp(round(n * f), round(left * f), round(right * f)).to(y.device)
            w = w.unsqueeze(-1) * r
        out_index = tuple(slice(round(s * f), round((s + n) * f)) for (s, n, _, _), f in zip(pieces, scale))
        out[(..., *out_index)] += y.float() * w
        weight[out_index] += w
    return (out / weight).to(y.dtype)


def tiled_encode(model, x: torch.Tensor, tile, overlap=None):
    """model.encode over overlapping tiles; returns the blended posterior, of the type
    ``model.encode`` returns (a DiagonalGaussian: this module does not import the model)."""
    model._check_pixels(x)
    cfg, video = model.config, x.ndim == 5
    v = x if video else x.unsqueeze(2)
    plan = _plan(cfg, v.shape[2:], tile, overlap, video)
    c = cfg.channels
    posterior_type = None

    def encode(piece):
        nonlocal posterior_type
        post = model.encode(piece if video else piece.squeeze(2))
        posterior_type = type(post)
        m = torch.cat([post.mean, post.logvar], dim=1)
        return m if video else m.unsqueeze(2)

    scale = (1 / cfg.tubelet_size, 1 / cfg.patch_size, 1 / cfg.patch_size)
    moments = _run_tiled(encode, v, plan, scale)
    if not video:
        moments = moments.squeeze(2)
    return posterior_type(moments[:, :c], moments[:, c:])


def tiled_decode(model, z: torch.Tensor, tile, overlap=None):
    """model.decode over overlapping latent tiles; tile and overlap are in pixels/frames."""
    model._check_latent(z)
    cfg, video = model.config, z.ndim == 5
    v = z if video else z.unsqueeze(2)
    units = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
    pixel_shape = [n * u for n, u in zip(v.shape[2:], units)]
    plan = _plan(cfg, pixel_shape, tile, overlap, video)
    plan = [(t // u, o // u, 1) for t, o, u in plan]  # the same tiles in latent units

    def decode(piece):
        out = model.decode(piece if video else piece.squeeze(2))
        return out if video else out.unsqueeze(2)

    pixels = _run_tiled(decode, v, plan, units)
    return pixels if video else pixels.squeeze(2)
