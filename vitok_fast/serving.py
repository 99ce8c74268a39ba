"""The encoder and the decoder as ``torch.export`` programs, with dynamic batch, height and
width (and frames for video models): what ``python -m vitok_fast.export`` writes.

    from vitok_fast.serving import export_encoder, export_decoder
    program = export_encoder(model)            # torch.export.ExportedProgram
    mean, logvar = program.module()(pixels)    # any batch, any H, W multiple of the patch

The encoder program maps pixels ``(B, 3, H, W)`` (videos ``(B, 3, T, H, W)``) to the
posterior's ``(mean, logvar)``; the decoder program maps a latent to pixels. Both are the
model's own forward, traced once: on the kernel path the fused ops stay in the graph as
``vitok::`` custom ops (kernels/*.py registers them on import), on the reference path the
graph holds only ATen ops. Attention runs through ``F.scaled_dot_product_attention`` with
PyTorch's own backend choice (an ``sdpa_kernel`` restriction is not part of a program), so
models are exported with ``attention_backend="sdpa"``: then the program's outputs equal
eager's bit for bit (tests/test_export.py).

Loading: ``torch.export.load(path).module()`` in any process with torch; a kernel-path
program also needs ``import vitok_fast.kernels`` first (its ops must be registered), a
reference-path program needs nothing of ours. An AOTInductor package (CUDA only here)
loads with ``torch._inductor.aoti_load_package(path)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from vitok_fast.model import ViTok


class EncodeMoments(nn.Module):
    """``pixels -> (mean, logvar)`` of the posterior: ViTok.encode as a plain tensor function."""

    def __init__(self, model: ViTok):
        super().__init__()
        self.model = model

    def forward(self, x):
        posterior = self.model.encode(x)
        return posterior.mean, posterior.logvar


class DecodeLatent(nn.Module):
    """``latent -> pixels``: ViTok.decode."""

    def __init__(self, model: ViTok):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model.decode(z)


def _token_dims(config):
    """Dynamic sizes in tokens: batch, (frames,) height, width; pixels are multiples. A side
    of one token is outside the range: export specialises a size of 1 (views and
    contiguity of a size-1 dim differ), so each side is 2 tokens or more (16 px at p = 8)."""
    dims = {"batch": Dim("batch", min=1), "h": Dim("h_tokens", min=2), "w": Dim("w_tokens", min=2)}
    if config.is_video:
        dims["t"] = Dim("t_tokens", min=2)
    return dims


def example_pixels(config, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A small input to trace with: batch 2, a 2 x 3 token grid (2 tubelets for videos).
    Sizes 0 and 1 would be specialised by export, so none of them is 1."""
    p, q = config.patch_size, config.tubelet_size
    shape = (2, 3, 2 * q, 2 * p, 3 * p) if config.is_video else (2, 3, 2 * p, 3 * p)
    return torch.rand(shape, device=device, dtype=dtype) * 2 - 1


def _check_model(model: ViTok) -> None:
    backend = model.config.attention_backend
    if backend != "sdpa":
        raise ValueError(f"export needs a model with attention_backend='sdpa' (an exported program "
                         f"keeps PyTorch's own SDPA backend choice), got {backend!r}; load it with "
                         f"attention_backend='sdpa'")


def _export(module, example, shapes):
    with torch.no_grad():
        return torch.export.export(module.eval(), (example,), dynamic_shapes=shapes)


def export_encoder(model: ViTok, example: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of pixels -> (mean, logvar) with dynamic batch, (frames,) height, width."""
    _check_model(model)
    cfg = model.config
    param = next(model.parameters())
    x = example_pixels(cfg, param.device, param.dtype) if example is None else example
    d = _token_dims(cfg)
    if cfg.is_video:
        shapes = {0: d["batch"], 2: cfg.tubelet_size * d["t"], 3: cfg.patch_size * d["h"],
                  4: cfg.patch_size * d["w"]}
    else:
        shapes = {0: d["batch"], 2: cfg.patch_size * d["h"], 3: cfg.patch_size * d["w"]}
    return _export(EncodeMoments(model), x, {"x": shapes})


def export_decoder(model: ViTok, example: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of latent -> pixels with dynamic batch, (frames,) height, width."""
    _check_model(model)
    cfg = model.config
    if example is None:
        with torch.no_grad():
            param = next(model.parameters())
            example = model.encode(example_pixels(cfg, param.device, param.dtype)).mean
    d = _token_dims(cfg)
    shapes = ({0: d["batch"], 2: d["t"], 3: d["h"], 4: d["w"]} if cfg.is_video
              else {0: d["batch"], 2: d["h"], 3: d["w"]})
    return _export(DecodeLatent(model), example, {"z": shapes})


def custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The ``vitok::`` ops a program calls (empty for the reference path), in graph order."""
    return [str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("vitok.")]


def aoti_package(program: torch.export.ExportedProgram, path) -> str:
    """Compile a program ahead of time with AOTInductor into a ``.pt2`` package at ``path``."""
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path))
