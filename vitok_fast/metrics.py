"""Reconstruction metrics: PSNR, SSIM, LPIPS, FID (images) and FVD (videos).

The protocol (docs/evaluation.md) in one place:

- Pixels in [-1, 1] are clamped and quantised to 8 bits before any metric, like an image
  written to disk: a metric must not reward values a PNG cannot hold.
- PSNR and SSIM are per image (per frame for videos) on [0, 1] values, averaged over images.
  SSIM is Wang et al. 2004's: 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
  population covariances, per channel then averaged. This equals scikit-image's
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)`` (tests check it).
- LPIPS is the lpips package's VGG variant (``vitok_fast.perceptual.load_lpips``).
- FID uses torch-fidelity's Inception-v3 ("pt_inception-2015-12-05", the TF Inception of
  the original FID code converted to PyTorch), its 2048-d pool features and its
  TF1-compatible bilinear resize to 299: the numbers of TTUR / ADM's evaluator that
  tokenizer papers report. Its weights file comes from the user (no downloads).
- FVD uses an I3D (Inception-v1 inflated to 3D, Kinetics-400) in plain PyTorch whose state
  dict matches ``i3d_pretrained_400.pt`` (the file VideoGPT / TATS use), its 400-d logits
  on clips resized to 224x224 (TF1 bilinear) and scaled to [-1, 1], like the original TF FVD.

Frechet distances are computed from streaming sums (float64), so evaluation never holds
all features, and sums all-reduce across ranks under torchrun.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitok_fast import cli

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
I3D_FILE = "i3d_pretrained_400.pt"


# -- pixels -------------------------------------------------------------------------------


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> uint8, rounding like an image written to disk."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float64 in [0, 1]."""
    return x.double() / 255.0 if x.dtype == torch.uint8 else x.double()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"expected two image batches of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(a.shape)}")


# -- PSNR and SSIM ------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) uint8 or [0, 1] images; data range 1."""
    _check_pair(a, b)
    mse = (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)  # identical images give +inf, as scikit-image does


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    # scikit-image's Gaussian SSIM: radius int(truncate * sigma + 0.5) = 5, an 11x11 window.
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) uint8 or [0, 1] images.

    scikit-image filters with reflect padding and then crops the window's radius off every
    border before the mean; a 'valid' convolution gives exactly those interior values.
    """
    _check_pair(a, b)
    x, y = _unit(a), _unit(b)
    B, C, H, W = x.shape
    g = _gaussian_window(sigma).to(x.device)
    k = g.numel()
    if H < k or W < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} pixels, got {H}x{W}")
    x, y = x.reshape(B * C, 1, H, W), y.reshape(B * C, 1, H, W)

    def blur(t):  # separable Gaussian, valid region only
        t = F.conv2d(t, g.view(1, 1, k, 1))
        return F.conv2d(t, g.view(1, 1, 1, k))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data range 1
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(B, C, -1).mean(2).mean(1)


# -- Frechet distance from streaming statistics -------------------------------------------


class FrechetStats:
    """Running count, sum and sum of outer products of feature vectors, in float64."""

    def __init__(self, dim: int, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._root = None  # cached (mu, cov, cov^(1/2)): one reference set meets many others

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().double().flatten(1)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self._root = None

    def all_reduce(self) -> None:
        """Sum the statistics of every rank (a no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.n, self.sum, self.outer):
                dist.all_reduce(t)
            self._root = None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.n.item())
        if n < 2:
            raise ValueError(f"a Frechet distance needs at least 2 samples, got {n}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)  # unbiased, like np.cov
        return mu.cpu().numpy(), cov.cpu().numpy()


def frechet_distance(a: FrechetStats, b: FrechetStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017).

    Tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a S_b, which
    equal those of the symmetric A S_b A with A = S_a^(1/2). Two symmetric
    eigendecompositions take a second at 2048-d where the general eigvals of S_a S_b
    (torch-fidelity's route, same value; a test checks) takes several on 2 CPU cores.
    """
    if a._root is None:
        mu, cov = a.mean_cov()
        w, v = np.linalg.eigh(cov)
        a._root = mu, cov, (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mu1, s1, root = a._root
    mu2, s2 = b.mean_cov()
    e = np.linalg.eigvalsh(root @ s2 @ root)
    tr_covmean = np.sqrt(np.clip(e, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# -- Inception (FID) ----------------------------------------------------------------------


def _missing_weight(what: str, file: str, given, flag: str,
                    without: str = "or leave the metric out with --metrics") -> FileNotFoundError:
    where = f"{flag} {given}" if given is not None else f"no {flag} given"
    return FileNotFoundError(
        f"{what} needs the weights file {file} and found none ({where}). Nothing is downloaded "
        f"at run time: copy the file from a machine with internet access and pass {flag} PATH"
        + (f", {without}" if without else "") + ".")


def _unreadable_weight(what: str, file: str, given, flag: str, error: Exception) -> ValueError:
    return ValueError(
        f"{flag} {given}: cannot load it as the {what} weights {file} "
        f"({type(error).__name__}: {cli.first_sentence(error)}); "
        f"the file is truncated, corrupt or another network's; copy {file} again")


def load_inception(path: str | os.PathLike | None, device="cpu",
                   features: tuple[str, ...] = ("2048",),
                   without: str = "or leave the metric out with --metrics") -> nn.Module:
    """torch-fidelity's FID Inception-v3 (2048-d pool features) from a weights file.

    The expected file is torch-fidelity's conversion of the TF FID Inception,
    ``weights-inception-2015-12-05-6726825d.pth`` (github.com/toshas/torch-fidelity
    releases v0.2.0). The module takes uint8 (B, 3, H, W) images of any size and returns
    one tensor per name in ``features`` ("2048": pool features for FID; "logits_unbiased":
    the 1008 logits the Inception Score uses). ``without`` ends the missing-file message
    with the way to do without it.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if path is None or not Path(path).is_file():
        raise _missing_weight("FID", INCEPTION_FILE, path, "--inception", without)
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                            feature_extractor_weights_path=str(path))
    except Exception as e:  # torch-fidelity parses the file itself: any failure means a bad file
        raise _unreadable_weight("FID Inception", INCEPTION_FILE, path, "--inception", e) from e
    return model.to(device)


def save_random_inception(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write random weights in the layout of INCEPTION_FILE (tests; no download possible).

    torch-fidelity's constructor always loads a state dict, so the network is built once
    with that load switched off; He-normal convolutions keep activations from vanishing
    through 90-odd random layers, so features still tell images apart.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


@torch.no_grad()
def inception_features(model: nn.Module, images_uint8: torch.Tensor) -> torch.Tensor:
    (features,) = model(images_uint8)
    return features


# -- I3D (FVD) ----------------------------------------------------------------------------


def _same_pad(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """TensorFlow's 'SAME' padding for a 3D window (the I3D weights were trained with it)."""
    pad = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME' padding, no bias) + BatchNorm + ReLU; the logits layer has a bias."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, relu=True):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=not bn)
        self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001) if bn else None

    def forward(self, x):
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        # zero padding, as in the PyTorch port the weights were checked with (inputs to
        # every pool here are post-ReLU, so zeros never win over real values anyway)
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017) returning 400-d Kinetics logits.

    Module names follow the widely used PyTorch port (piergiaj/pytorch-i3d), so
    ``load_state_dict`` accepts ``i3d_pretrained_400.pt`` directly. Input: (B, 3, T, 224,
    224) in [-1, 1] with T >= 9 (the final 2x7x7 average pool needs 2 time steps).
    """

    _MIXED = (("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
              ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
              ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
              ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
              ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
              ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
              ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
              ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
              ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
              ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
              ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)))

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        for name, a, b in self._MIXED:
            setattr(self, name, MaxPool3dSame(a, b) if name.startswith("Max") else InceptionModule(a, b))
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False)

    def forward(self, x):
        for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
                     "MaxPool3d_3a_3x3", *(m[0] for m in self._MIXED)):
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))  # (B, 400): averaged over time


def load_i3d(path: str | os.PathLike | None, device="cpu") -> I3D:
    """The FVD network from ``i3d_pretrained_400.pt`` (a state dict of the port above)."""
    if path is None or not Path(path).is_file():
        raise _missing_weight("FVD", I3D_FILE, path, "--i3d")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many classes
        raise _unreadable_weight("FVD I3D", I3D_FILE, path, "--i3d", e) from e
    model = I3D()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"--i3d {path} is not an I3D state dict in the layout of {I3D_FILE}: "
                         f"{str(e).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model.eval().to(device)


@torch.no_grad()
def i3d_features(model: I3D, clips_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) uint8 clips -> (B, 400) I3D logits, preprocessed as the TF FVD does:
    TF1 bilinear resize (align_corners=False) of every frame to 224x224, then to [-1, 1]."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    if clips_uint8.dtype != torch.uint8 or clips_uint8.ndim != 5:
        raise ValueError(f"expected uint8 clips (B, 3, T, H, W), got {clips_uint8.dtype} of shape "
                         f"{tuple(clips_uint8.shape)}")
    B, C, T, H, W = clips_uint8.shape
    if T < 9:
        raise ValueError(f"FVD's I3D needs clips of at least 9 frames (16 by protocol), got {T}")
    param = next(model.parameters())
    frames = clips_uint8.transpose(1, 2).reshape(B * T, C, H, W).to(param.device, torch.float32)
    frames = interpolate_bilinear_2d_like_tensorflow1x(frames, size=(224, 224), align_corners=False)
    x = (2 * frames / 255 - 1).reshape(B, T, C, 224, 224).transpose(1, 2)
    return model(x.to(param.dtype)).float()


def dequantize(u: torch.Tensor) -> torch.Tensor:
    """uint8 -> float pixels in [-1, 1]."""
    return u.float() / 127.5 - 1.0

