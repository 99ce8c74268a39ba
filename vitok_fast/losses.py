"""Training losses of both stages (docs/design.md section 2) and the PSNR shown while training.

Stage 1 [paper, Section 2.3]: ``MSE + eta * LPIPS + beta * KL`` with eta = 1, beta = 1e-3.
Stage 2 adds a GAN term for the decoder: hinge loss for the discriminator and ``-D(fake)``
for the generator [authors' code]. Videos are scored frame by frame by LPIPS and by the
discriminator [paper].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frames_as_images(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, T, H, W)`` -> ``(B*T, 3, H, W)``; images pass through unchanged."""
    if x.ndim == 4:
        return x
    return x.transpose(1, 2).flatten(0, 1)


def reconstruction_loss(x, recon, posterior, lpips=None, *, lpips_weight: float = 1.0,
                        kl_weight: float = 1e-3):
    """Stage-1 loss. Returns ``(total, parts)`` with parts ``mse``, ``lpips``, ``kl`` (floats
    as 0-d tensors, detached) for logging."""
    mse = F.mse_loss(recon.float(), x.float())
    if lpips_weight > 0:
        if lpips is None:
            raise ValueError("lpips_weight > 0 needs an LPIPS module (vitok_fast.perceptual.load_lpips)")
        perceptual = lpips(frames_as_images(recon), frames_as_images(x)).float().mean()
    else:
        perceptual = torch.zeros((), device=x.device)
    kl = posterior.kl()
    total = mse + lpips_weight * perceptual + kl_weight * kl
    return total, {"mse": mse.detach(), "lpips": perceptual.detach(), "kl": kl.detach()}


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``relu(1 - D(real)) + relu(1 + D(fake))``, batch means."""
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def g_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (decoder's) GAN loss, ``-D(fake)`` [authors' code]."""
    return -logits_fake.float().mean()


@torch.no_grad()
def psnr(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample of pixels in [-1, 1] (peak-to-peak 2), reconstructions clamped;
    equal to PSNR on [0, 1] pixels. Videos: one value over all frames of a clip."""
    err = (recon.float().clamp(-1, 1) - x.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / err.clamp_min(1e-10))
