"""The stage-2 discriminator: StyleGAN-style residual blocks with blurred downsampling.

[authors' code] a StyleGAN(2)-like residual discriminator, LeakyReLU(0.2), no adaptive
weight. [ours] the exact widths: 64 channels at full resolution, doubling each halving up
to 512; a minibatch-free head (conv, flatten, two Linear layers) at 4x4. Videos are judged
frame by frame (the caller folds T into the batch, ``losses.frames_as_images``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BlurDown(nn.Module):
    """Blur with the separable [1, 3, 3, 1] filter, then keep every second pixel: the
    StyleGAN anti-aliased downsampling (halves H and W)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k)
        self.register_buffer("kernel", (k / k.sum())[None, None], persistent=False)

    def forward(self, x):
        c = x.shape[1]
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.kernel.to(x.dtype).expand(c, 1, 4, 4), stride=2, groups=c)


class ResBlock(nn.Module):
    """conv3x3 -> LReLU -> blur-down -> conv3x3 -> LReLU, plus a blurred 1x1 skip; the sum
    is scaled by 1/sqrt(2) to keep the variance (StyleGAN2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.down = BlurDown()
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(self.down(h)), 0.2)
        return (h + self.skip(self.down(x))) / math.sqrt(2)


class Discriminator(nn.Module):
    """Images ``(B, 3, R, R)`` in [-1, 1] -> one logit per image ``(B,)``."""

    def __init__(self, resolution: int, base_channels: int = 64, max_channels: int = 512):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"the discriminator needs a power-of-two resolution >= 8, got {resolution}")
        self.resolution = resolution
        ch = lambda res: min(base_channels * resolution // res, max_channels)
        self.from_rgb = nn.Conv2d(3, ch(resolution), 1)
        blocks, res = [], resolution
        while res > 4:
            blocks.append(ResBlock(ch(res), ch(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c = ch(4)
        self.final_conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)

    def forward(self, x):
        if x.ndim != 4 or x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"expected images (B, 3, {self.resolution}, {self.resolution}), "
                             f"got shape {tuple(x.shape)}")
        h = F.leaky_relu(self.from_rgb(x), 0.2)
        h = self.blocks(h)
        h = F.leaky_relu(self.final_conv(h), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        return self.out(h).squeeze(1)
