"""Chapter 11, diffusion models: noise schedules (schedules.py), DDPM/DDIM/Langevin samplers and
classifier-free guidance (samplers.py), a small U-Net (unet.py), EMA weights (ema.py); the registered
`ddpm` (module.py) and `ncsn` (score.py) LightningModules; importing registers them."""

from litlab.chapters.diffusion import module, score  # noqa: F401
