"""Initialise a model's encoder from another run's checkpoint (BERT fine-tuning, retriever, RAG).

`pretrained` is a checkpoint file (.ckpt written by litlab / Lightning) or an MLflow run id whose
checkpoint is found as `litlab.load` finds it (the run's checkpoint dir, else its artifacts) in the
tracking store of the current run (else MLFLOW_TRACKING_URI, else the default store). The source's
vocabulary signature and encoder shape must equal the target's: a mismatch is a ConfigError naming
the key, never a silent partial load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from litlab.errors import ConfigError, UserError


def load_checkpoint(pretrained: str, tracking_uri: str | None = None, key: str = "model.pretrained") -> dict[str, Any]:
    """The checkpoint dict (state_dict, hyper_parameters, ...) of a file or a run id."""
    from litlab import checkpointing

    path = Path(pretrained).expanduser()
    trusted = False  # a path from the user: outside mlruns/ only with --allow-external-checkpoints
    if not path.is_file():
        path, trusted = checkpointing.run_checkpoint(pretrained, tracking_uri, key), True  # the run's own checkpoint
    ckpt = checkpointing.load_checkpoint(path, trusted=trusted)  # weights_only=True: no pickled code
    if "state_dict" not in ckpt:
        raise UserError(f"{key}: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def load_submodules(target: dict[str, nn.Module], ckpt: dict[str, Any], source_prefix: dict[str, str],
                    expected: dict[str, Any], key: str = "model.pretrained", arg_prefix: str = "") -> list[str]:
    """Copy the weights under `source_prefix[name]` of the checkpoint's state_dict into
    `target[name]` (strict, every parameter), after checking that the checkpoint's hyper-parameters
    agree with `expected` ({hparam name: value}; this model's argument is `arg_prefix` + name,
    except vocab_* and max_len, which the data sets). Returns the names loaded; a name whose source
    prefix is absent from the checkpoint is skipped (e.g. a pooler an MLM without NSP never had)."""
    hp = dict(ckpt.get("hyper_parameters") or {})
    for name, value in expected.items():
        if name in hp and hp[name] != value:
            if name.startswith("vocab") or name == "max_len":
                fix = "use the data settings of the checkpoint's run (passage_tokens, vocab_size, split)"
            else:
                fix = f"set model.{arg_prefix}{name}: {hp[name]!r}"
            raise ConfigError(key, f"the checkpoint has {name}={hp[name]!r} but this model has {value!r}; {fix}")
    state = ckpt["state_dict"]
    loaded = []
    for name, module in target.items():
        prefix = source_prefix[name]
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            continue
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise ConfigError(key, f"cannot load {prefix}* into {name}: {str(e).splitlines()[0]}") from None
        loaded.append(name)
    if not loaded:
        raise ConfigError(key, f"the checkpoint has none of {sorted(source_prefix.values())}")
    return loaded


def logger_tracking_uri(module) -> str | None:
    """The tracking URI of the run the module is logged to (litlab's MlflowTracker), if any."""
    trainer = getattr(module, "_trainer", None)
    for lg in (trainer.loggers if trainer is not None else []):
        uri = getattr(lg, "tracking_uri", None)  # (fast_dev_run's DummyLogger answers any name with a no-op)
        if isinstance(uri, str) and uri:
            return uri
    return None
