"""DCGAN (Radford et al. 2016) for square faces at 32, 64 or 128 px: plain torch, no Ray.

As the study: latent size 100, base widths 64, weights from N(0, 0.02) and batch-norm
scales from N(1, 0.02), ReLU + tanh in G, LeakyReLU 0.2 in D, sigmoid cross-entropy
on D's logits, Adam with beta1 0.5. 128 px has one more up/down-sampling block than
64 px; 32 px (one fewer) exists for fast tests.

`gan_step` is the whole per-batch update; the Ray Train loop only feeds it batches.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

RESOLUTIONS = (32, 64, 128)
ARCH = "dcgan_generator"


def check_resolution(resolution: int) -> int:
    """Number of stride-2 blocks between 4x4 and `resolution`; ValueError if unsupported."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution} not supported: use 32, 64 or 128 (data.resolution)")
    return int(math.log2(resolution)) - 2


class Generator(nn.Module):
    """z (N, latent_dim) or (N, latent_dim, 1, 1) -> images (N, 3, R, R) in [-1, 1]."""

    def __init__(self, resolution: int = 64, latent_dim: int = 100, width: int = 64):
        super().__init__()
        blocks = check_resolution(resolution)
        self.resolution, self.latent_dim, self.width = resolution, latent_dim, width
        channels = [width * 2 ** i for i in reversed(range(blocks))]  # e.g. 512, 256, 128, 64
        layers = [nn.ConvTranspose2d(latent_dim, channels[0], 4, 1, 0, bias=False),
                  nn.BatchNorm2d(channels[0]), nn.ReLU(True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(channels[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """images (N, 3, R, R) in [-1, 1] -> logits (N,): positive means "real"."""

    def __init__(self, resolution: int = 64, width: int = 64):
        super().__init__()
        blocks = check_resolution(resolution)
        self.resolution, self.width = resolution, width
        channels = [width * 2 ** i for i in range(blocks)]  # e.g. 64, 128, 256, 512
        layers = [nn.Conv2d(3, channels[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels[-1], 1, 4, 1, 0, bias=False))  # 4x4 -> 1x1 logit
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's initialisation."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build(resolution: int, latent_dim: int = 100, g_width: int = 64,
          d_width: int = 64) -> tuple[Generator, Discriminator]:
    return Generator(resolution, latent_dim, g_width), Discriminator(resolution, d_width)


def optimizers(G: nn.Module, D: nn.Module, lr: float = 2e-4, beta1: float = 0.5):
    return (torch.optim.Adam(G.parameters(), lr=lr, betas=(beta1, 0.999)),
            torch.optim.Adam(D.parameters(), lr=lr, betas=(beta1, 0.999)))


def generator_meta(resolution: int, latent_dim: int, g_width: int) -> dict:
    return {"arch": ARCH, "resolution": resolution, "latent_dim": latent_dim, "g_width": g_width}


def generator_from_meta(meta: dict) -> Generator:
    """The generator described by an exported model.json (no weights)."""
    if meta.get("arch") != ARCH:
        raise ValueError(f"model arch is {meta.get('arch')!r}, expected {ARCH!r}")
    return Generator(int(meta["resolution"]), int(meta["latent_dim"]), int(meta["g_width"]))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """G's output in [-1, 1] (N, 3, H, W) -> uint8 NHWC on the CPU."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def gan_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer,
             opt_d: torch.optim.Optimizer, real: torch.Tensor, z: torch.Tensor,
             amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One DCGAN update: D on a real and a fake batch, then G (non-saturating loss).

    Returns detached 0-d tensors (no host sync here, so GPU steps stay asynchronous):
    d_loss, g_loss, d_real = mean D(x) and d_fake = mean D(G(z)) as probabilities,
    both measured before D's update, as in the DCGAN tutorial.
    """
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    autocast = (torch.autocast(real.device.type, dtype=amp_dtype) if amp_dtype
                else contextlib.nullcontext())
    with autocast:
        fake = G(z)
        real_logits = D(real)
        fake_logits = D(fake.detach())
        d_loss = (loss_fn(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
                  + loss_fn(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32)))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    # G's loss flows through D, whose own weights' gradients are not wanted here (D's next
    # step zeroes them): not computed, and under DDP not all-reduced either
    no_sync = getattr(D, "no_sync", contextlib.nullcontext)
    d_weights = [p for p in D.parameters() if p.requires_grad]
    for p in d_weights:
        p.requires_grad_(False)
    try:
        with no_sync(), autocast:
            g_logits = D(fake)
            g_loss = loss_fn(g_logits.float(), torch.ones_like(g_logits, dtype=torch.float32))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
    finally:
        for p in d_weights:
            p.requires_grad_(True)
    opt_g.step()
    return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
            "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean()}
