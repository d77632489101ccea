"""The hand-written side of benchmarks/throughput.py: the PyTorch loop a careful user writes for
the same experiment config (tensors indexed by hand, `opt.zero_grad(); loss.backward();
opt.step(); sched.step()`), timed by the same EpochClock as the litlab side."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bench_clock import EpochClock

if TYPE_CHECKING:
    from throughput import Bench


def hand_side(cfg, bench: Bench, clock: EpochClock, device: torch.device, compile_net: bool) -> dict:
    for _ in hand_epochs(cfg, bench, clock, device, compile_net):
        pass
    return {}


def hand_epochs(cfg, bench: Bench, clock: EpochClock, device: torch.device, compile_net: bool):
    """The loop a careful user writes by hand for the same config: same net (built by the same
    registered class from the same seed), same data tensors and augmentation, same optimiser.
    A generator: yields after each epoch (--paired runs its epochs between litlab's)."""
    import lightning as L

    from litlab import registry
    from litlab.optim import param_groups

    L.seed_everything(cfg.seed, verbose=False)
    dm = registry.get_data(cfg.data["name"]).cls(**{k: v for k, v in cfg.data.items() if k != "name"})
    dm.setup("fit")
    module = registry.get_model(cfg.model["name"]).cls(**{k: v for k, v in cfg.model.items() if k != "name"})
    net = module.net.to(device)
    ds = dm.train_set
    x_all, y_all, transform = ds.x.to(device), ds.y.to(device), ds.transform
    channels_last = device.type == "cuda" and x_all.ndim == 4
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    bf16 = cfg.trainer.precision == "bf16-mixed"
    o = cfg.optim
    groups = param_groups(net, o.weight_decay)
    kernel = optimizer_kernel(device)  # the fastest torch has, as litlab picks it
    if o.name == "sgd":
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **kernel)
    else:
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kernel)
    steps_per_epoch = math.ceil(len(x_all) / dm.batch_size)
    total = steps_per_epoch * cfg.trainer.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0))))
    clip = cfg.trainer.gradient_clip_val
    if compile_net:  # as litlab does it (trainer.compile=true): the forward, static shapes
        net.forward = torch.compile(net.forward, dynamic=False)
    step_fn = net

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = step_fn(x)
        if bench.kind == "lm":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return F.cross_entropy(logits.float(), y)

    net.train()
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.trainer.max_epochs):
        perm = torch.randperm(len(x_all), generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * dm.batch_size:(i + 1) * dm.batch_size]
            x, y = x_all[idx], y_all[idx]
            if transform is not None:
                x = transform(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if i == 0:
                clock.start(epoch, device)
            loss = loss_of(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip, foreach=True)
            opt.step()
            sched.step()
            clock.step(x.numel() if bench.kind == "lm" else len(x))  # tokens or samples, as the litlab side
        clock.stop(device)
        yield epoch


def optimizer_kernel(device: torch.device) -> dict:
    """{"fused": True} where torch has fused optimiser kernels for the device (CUDA; CPU from 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused = device.type in _get_fused_kernels_supported_devices()
    except ImportError:
        fused = device.type == "cuda"
    return {"fused": True} if fused else {"foreach": True}
