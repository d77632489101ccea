"""Lightning internals made to return what they return, faster (installed by litlab.fast_loop)."""

from __future__ import annotations

import torch


def skip_needless_moves() -> None:
    """Every `self.log` call runs `_ResultMetric.to(value.device)`, which rebuilds the result's
    attribute dict through apply_to_collection (deep-copying its metadata dataclass): ~0.3 ms on a
    laptop CPU even when every tensor is on that device already. Return at once in that case (a
    move of tensors that are where they should be does nothing); any other case is Lightning's."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric

    original = _ResultMetric.to
    if getattr(original, "_litlab", False):
        return

    def to(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.device) and _all_on(self.__dict__, args[0]):
            return self
        return original(self, *args, **kwargs)

    to._litlab = True
    _ResultMetric.to = to


def _all_on(attributes: dict, device: torch.device) -> bool:
    """Every tensor among the values (and the values of dict values) is on `device`; False if a
    value could hold tensors deeper down (a Metric, a list, ...)."""
    for value in attributes.values():
        if isinstance(value, torch.Tensor):
            if value.device != device:
                return False
        elif isinstance(value, dict):
            for inner in value.values():
                if isinstance(inner, torch.Tensor):
                    if inner.device != device:
                        return False
                elif isinstance(inner, (torch.nn.Module, list, tuple, dict)):
                    return False
        elif isinstance(value, (torch.nn.Module, list, tuple)):
            return False
    return True


def log_numbers_without_copies() -> None:
    """`self.log(name, 0.5)` makes its tensor with torch.tensor(value, device=module.device): on a GPU
    a blocking host-to-device copy, so a host sync per logged number per step (an RL module logging
    its exploration rate stalls every step). torch.full fills the same 0-dim tensor on the device
    (the number travels as a kernel argument). Python int/float/bool only; anything else, tensors
    included, is Lightning's."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.trainer.connectors.logger_connector.result import _get_default_dtype

    original = LightningModule._LightningModule__to_tensor
    if getattr(original, "_litlab", False):
        return

    def to_tensor(self, value, name: str) -> torch.Tensor:
        if type(value) in (float, int, bool):
            return torch.full((), value, device=self.device, dtype=_get_default_dtype())
        return original(self, value, name)

    to_tensor._litlab = True
    LightningModule._LightningModule__to_tensor = to_tensor


def defer_progress_bar_reads(trainer) -> None:
    """After every training batch Lightning's logger connector converts each value logged with
    on_step=True and prog_bar=True to a Python number for the progress bar: a host sync per value
    per step on a GPU (a module's `self.log("train/loss", loss, prog_bar=True)` stalls every step).
    Nothing reads those numbers from where they are kept in the meantime: the progress bar asks for
    `trainer.progress_bar_metrics`, which computes them afresh (litlab's bar every 50 steps). So in
    a training batch that is not the last of its epoch loop, only the callback and logger dicts are
    updated (tensors, as Lightning keeps them); the last one, and every other batch (validation,
    test), runs Lightning's own on_batch_end, which leaves the three dicts as Lightning leaves them."""
    connector = trainer._logger_connector
    lightning_on_batch_end = connector.on_batch_end

    def on_batch_end() -> None:
        results = trainer._results
        if (results is None or not trainer.training or trainer.fit_loop.epoch_loop.done
                or not any(item.meta.on_step and item.meta.prog_bar for item in results.values())):
            return lightning_on_batch_end()
        log, callback = _step_metrics_without_progress_bar(results)
        connector._callback_metrics.update(callback)
        connector._logged_metrics.update(log)
        results.batch = results.batch_size = None

    connector.on_batch_end = on_batch_end


def log_step_values_without_reads(trainer) -> None:
    """Every log_every_n_steps training steps Lightning's update_train_step_metrics gathers the
    values logged with on_step=True (results.metrics(on_step=True), which turns each prog_bar one
    into a Python number, a host sync each, with or without a logger to send them to) and its
    log_metrics turns each into a number before the loggers see them (a sync each again). A YOLO or
    GAN module's `self.log("train/loss", loss, on_step=True, prog_bar=True)` stalled every 10th
    step. Here: with no logger, nothing (Lightning's log_metrics returns at once); with loggers that
    all take device tensors (litlab's MlflowTracker.log_tensor_metrics copies them to the host
    asynchronously), the tensors, at the step and with the epoch Lightning gives them; with any
    other logger, Lightning's log_metrics of the same values (its conversion: a read per value)."""
    connector = trainer._logger_connector

    def update_train_step_metrics() -> None:
        if trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
            return
        if not (connector.should_update_logs or trainer.fast_dev_run) or not trainer.loggers:
            return
        log, _ = _step_metrics_without_progress_bar(trainer._results)
        if not log:
            return
        if "step" in log or not all(hasattr(logger, "log_tensor_metrics") for logger in trainer.loggers):
            return connector.log_metrics(log)
        connector._logged_metrics.update(log)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # what Lightning's log_metrics uses
        for logger in trainer.loggers:
            logger.log_tensor_metrics({"epoch": trainer.current_epoch, **log}, step)

    connector.update_train_step_metrics = update_train_step_metrics


def _step_metrics_without_progress_bar(results) -> tuple[dict, dict]:
    """_ResultCollection.metrics(on_step=True)'s "log" and "callback" dicts (a training collection),
    without its "pbar" dict, the one that converts tensors to numbers."""
    log, callback = {}, {}
    for _, item in results.valid_items():
        value = results._get_cache(item, True)
        if not isinstance(value, torch.Tensor):
            continue
        name, forked_name = results._forked_name(item, True)
        if item.meta.logger:
            log[forked_name] = value
        if results.training:
            callback[name] = callback[forked_name] = value
    return log, callback
