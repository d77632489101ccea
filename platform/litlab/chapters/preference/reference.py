"""The DPO reference policy pi_ref: loaded from an `sft` run, or fitted in-run when none is given.

`load_reference_state(reference, expected, tracking_uri)`: `reference` is a checkpoint file (.ckpt)
or an MLflow run id (its best-*.ckpt in the run's checkpoint dir, else its last.ckpt, as
`litlab.load` finds it). Returns the GPT weights (`net.*` of the checkpoint's state_dict: an `sft`
or a `dpo` run). The checkpoint's hyper-parameters must equal `expected` (the architecture and the
data it was fitted on): a mismatch is a ConfigError naming the key to set.

`train_sft(net, train_set, steps, lr, batch_size)`: the in-run fallback, the same SFT objective as
the `sft` model (completion-token NLL on BOTH completions of each pair), plain AdamW.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from litlab.chapters.preference.losses import sft_loss
from litlab.checkpointing import load_checkpoint, run_checkpoint
from litlab.errors import ConfigError, UserError

KEY = "model.reference"


def load_reference_state(reference: str, expected: dict[str, Any], tracking_uri: str | None = None) -> dict:
    """The reference GPT's state_dict (keys without the `net.` prefix)."""
    path = Path(reference).expanduser()
    trusted = False  # a path from the user: outside mlruns/ only with --allow-external-checkpoints
    if not path.is_file():
        path, trusted = run_checkpoint(reference, tracking_uri, KEY), True  # the run's own checkpoint
    ckpt = load_checkpoint(path, trusted=trusted)  # weights_only=True: tensors and plain data only
    if "state_dict" not in ckpt:
        raise UserError(f"{KEY}: {path} is not a Lightning checkpoint (no state_dict)")
    hp = dict(ckpt.get("hyper_parameters") or {})
    for name, value in expected.items():
        if name in hp and hp[name] != value:
            section = "data" if name in ("alphabet", "property", "prompt_len", "max_len", "vocab_size",
                                         "block_size") else "model"
            raise ConfigError(KEY, f"the reference has {name}={hp[name]!r} but this model {value!r}: "
                                   f"set {section}.{name}: {hp[name]!r} (or use another reference)")
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not state:
        raise ConfigError(KEY, f"{path} has no `net.*` weights: use the checkpoint of an sft (or dpo) run")
    return state


def train_sft(net: torch.nn.Module, train_set, steps: int, lr: float, batch_size: int,
              generator: torch.Generator | None = None) -> list[float]:
    """Fit `net` on both completions of random training pairs for `steps` AdamW steps; returns the
    per-step losses. train_set: a PreferencePairs (chosen, chosen_mask, rejected, rejected_mask)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    device = next(net.parameters()).device
    was_training = net.training
    net.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(train_set), (batch_size,), generator=generator)
        chosen, chosen_mask, rejected, rejected_mask = (t.to(device) for t in train_set.__getitems__(idx))
        loss = sft_loss(net, torch.cat([chosen, rejected]), torch.cat([chosen_mask, rejected_mask]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    net.train(was_training)
    net.zero_grad(set_to_none=True)
    return [float(x) for x in torch.stack(losses)] if losses else []
