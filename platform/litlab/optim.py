"""Optimisers and learning-rate schedules built from the config's `optim:` section.

`build_optimizer(module, cfg)` gives one of sgd, rmsprop, adam, adamw over the parameters that
require a gradient, in two parameter groups:

* `decay`:    weight matrices / conv kernels (ndim >= 2), with `optim.weight_decay`;
* `no_decay`: biases, normalisation parameters (BatchNorm/LayerNorm/GroupNorm/... affine weight and
              bias) and any other 1-D or scalar parameter, with weight_decay = 0.
  Shrinking a bias or a norm's scale towards 0 does not make the function smoother; it only fights
  the normalisation, hence the usual rule of not decaying them.

For sgd/rmsprop/adam, weight decay is the coupled L2 form g <- g + wd * w; for adamw it is decoupled:
w <- w - lr * wd * w, applied beside the Adam update. Adam/AdamW use one fused kernel when every
parameter is on a device with fused kernels (CUDA, and the CPU since torch 2.4), SGD too; otherwise
(and for RMSprop, which has no fused kernel) the foreach implementation (`implementation()`).
Gradient clipping with a fused optimiser is done by LitlabModule.configure_gradient_clipping.

`build_scheduler(optimizer, cfg, total_steps, max_epochs)` returns a LambdaLR stepped once per
OPTIMISER STEP (the base module registers it with interval="step"). Epoch-valued settings
(step_size, warmup_epochs) are converted with steps_per_epoch = total_steps / max_epochs. The
multipliers are plain callable objects (`StepDecay`, `WarmupCosine`): step t -> lr(t) / base_lr,
testable against their closed forms. A checkpoint keeps the step reached, not the multipliers: they
come from the config (`ConfiguredLambdaLR`), so a resumed run given more epochs gets the schedule
of that length.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from litlab.config import OptimConfig, SchedulerConfig
from litlab.errors import ConfigError

# Modules whose parameters are never decayed (their weight is a per-channel scale, not a map).
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


# ---------------------------------------------------------------- optimisers
def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into [decay, no_decay] groups (empty groups are dropped).

    no_decay: every parameter of a normalisation module, every parameter named `*bias`, and every
    parameter with ndim < 2 (scalars, per-channel vectors). Shared parameters are counted once.
    """
    decay, no_decay, seen = [], [], set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, NORM_TYPES) or name.endswith("bias") or p.ndim < 2:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def fused_devices() -> tuple[str, ...]:
    """Device types with fused optimiser kernels in this torch (cuda; cpu since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # an older or newer torch: only what has always been there
        return ("cuda",)


def implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """{"fused": True} when every parameter is a dense floating-point tensor on one device type
    with fused kernels (one kernel for the whole update: on this CPU Adam's step over an MLP's
    6 tensors takes 0.15 ms fused against 0.45 ms for torch's default per-tensor loop), else
    {"foreach": True} (one kernel per operation over all tensors)."""
    kinds = {p.device.type for p in params}
    dense_float = all(p.is_floating_point() and p.layout == torch.strided for p in params)
    if len(kinds) == 1 and dense_float and kinds <= set(fused_devices()):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser named by `cfg.name` over `module`'s trainable parameters (see module doc).

    Settings another optimiser uses are ignored (e.g. momentum with adam: adam's momentum is
    betas[0]), so that a sweep over optim.name can keep one set of keys.
    """
    groups = param_groups(module, cfg.weight_decay)
    if not groups:
        raise ConfigError("model", f"{type(module).__name__} has no trainable parameters for optim.name={cfg.name!r}")
    if cfg.nesterov and (cfg.name != "sgd" or cfg.momentum <= 0):
        raise ConfigError("optim.nesterov", "needs optim.name=sgd and optim.momentum > 0")
    params = [p for g in groups for p in g["params"]]
    kernel = implementation(params)

    if cfg.name == "sgd":
        # v <- mu v + g ; w <- w - lr v   (nesterov: w <- w - lr (g + mu v))
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernel)
    if cfg.name == "rmsprop":
        # s <- alpha s + (1 - alpha) g^2 ; w <- w - lr g / (sqrt(s) + eps)   (momentum buffers the step)
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   foreach=kernel.get("foreach", True))  # torch has no fused RMSprop
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernel)
    raise ConfigError("optim.name", f"{cfg.name!r} is not allowed: choose one of sgd, rmsprop, adam, adamw")


# ---------------------------------------------------------------- schedules (step -> lr multiplier)
class StepDecay:
    """lr(t) = base_lr * gamma ** floor(epoch(t) / step_size), epoch(t) = floor(t * E / T).

    Integer arithmetic for epoch(t) (T = total_steps, E = max_epochs) so that with T = E * batches
    the drop happens exactly at the first step of epoch step_size, 2 step_size, ...
    """

    def __init__(self, step_size_epochs: int, gamma: float, total_steps: int, max_epochs: int):
        self.step_size = step_size_epochs
        self.gamma = gamma
        self.total_steps = total_steps
        self.max_epochs = max_epochs

    def __call__(self, step: int) -> float:
        epoch = (step * self.max_epochs) // self.total_steps
        return self.gamma ** (epoch // self.step_size)


class WarmupCosine:
    """Linear warmup over W steps, then cosine from 1 down to r = min_lr / base_lr at step T.

        t <  W:  m(t) = (t + 1) / W                       (the first step already moves: no lr = 0 step)
        t >= W:  p = (t - W) / (T - W) clipped to [0, 1]
                 m(t) = r + (1 - r) * (1 + cos(pi p)) / 2  (m(W) = 1, m(T) = r)

    W = 0 is plain cosine annealing (SGDR without restarts, Loshchilov & Hutter 2017).
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0):
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        p = min(max(p, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


class ConfiguredLambdaLR(LambdaLR):
    """A LambdaLR whose multipliers come from the run's config, never from a checkpoint: what a
    checkpoint restores is how far the schedule has gone (last_epoch = optimiser steps taken).

    torch's LambdaLR saves its multiplier objects' fields, horizon included, and loads them back over
    the ones just built. So `litlab resume RUN trainer.max_epochs=6` of a 3-epoch cosine run kept the
    3-epoch horizon and trained its extra epochs at min_lr (0 by default). Here the resumed run's
    rate at step t is that of a run configured with the new length: lr(t) = base_lr * m_new(t). With
    the length unchanged, m_new = m_old and the resume is exact."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("lr_lambdas")
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("lr_lambdas") or [None] * len(self.lr_lambdas)  # checkpoints made before
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})
        # the restored optimiser holds the old schedule's rate for this step: set this schedule's
        for group, base_lr, multiplier in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base_lr * multiplier(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        before, now = (old[0] or {}).get("total_steps"), getattr(self.lr_lambdas[0], "total_steps", None)
        if before is not None and now is not None and before != now:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"litlab: the learning-rate schedule now spans {now} steps (it spanned {before}); "
                           f"at step {self.last_epoch} the rate is {self._last_lr[0]:.4g}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int, max_epochs: int
) -> LRScheduler | None:
    """A per-step LambdaLR for `cfg.name` (None for "none"); nonsense settings raise ConfigError."""
    key = "optim.scheduler"
    total_steps, max_epochs = int(total_steps), int(max_epochs)
    if total_steps < 1 or max_epochs < 1:
        raise ConfigError("trainer.max_epochs", f"a schedule needs >= 1 step and epoch, got {total_steps} steps, "
                                                f"{max_epochs} epochs")
    if cfg.warmup_epochs > 0 and cfg.name != "warmup_cosine":
        raise ConfigError(f"{key}.warmup_epochs", f"{cfg.warmup_epochs:g} is only used by {key}.name=warmup_cosine "
                                                  f"(got {cfg.name!r})")
    if cfg.min_lr > 0 and cfg.name in ("none", "step"):
        raise ConfigError(f"{key}.min_lr", f"{cfg.min_lr:g} is only used by {key}.name=cosine or warmup_cosine "
                                           f"(got {cfg.name!r})")
    if cfg.name == "none":
        return None

    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    if cfg.name == "step":
        if cfg.step_size >= max_epochs:
            raise ConfigError(f"{key}.step_size", f"{cfg.step_size} >= trainer.max_epochs {max_epochs}: "
                                                  "the learning rate would never decay")
        return ConfiguredLambdaLR(optimizer, [StepDecay(cfg.step_size, cfg.gamma, total_steps, max_epochs) for _ in base_lrs])

    for lr in base_lrs:
        if cfg.min_lr > lr:
            raise ConfigError(f"{key}.min_lr", f"{cfg.min_lr:g} > optim.lr {lr:g}: cosine would raise the rate")
    warmup_steps = 0
    if cfg.name == "warmup_cosine":
        if cfg.warmup_epochs >= max_epochs:
            raise ConfigError(f"{key}.warmup_epochs", f"{cfg.warmup_epochs:g} >= trainer.max_epochs {max_epochs}")
        warmup_steps = round(cfg.warmup_epochs * total_steps / max_epochs)
        if warmup_steps >= total_steps:
            raise ConfigError(f"{key}.warmup_epochs", f"{cfg.warmup_epochs:g} epochs = {warmup_steps} steps "
                                                      f">= {total_steps} training steps")
    elif cfg.name != "cosine":
        raise ConfigError(f"{key}.name", f"{cfg.name!r} is not allowed: choose one of none, step, cosine, "
                                         "warmup_cosine")
    return ConfiguredLambdaLR(optimizer, [WarmupCosine(total_steps, warmup_steps, cfg.min_lr / lr) for lr in base_lrs])
