"""The model table a run prints before training: Lightning's, less what is not the model.

Lightning's table lists every child of the LightningModule, so an MLP showed four rows of litlab's
score keeping (torchmetrics metrics and epoch accumulators: no parameters) above its one network,
and it ends with "Total FLOPs: 0" for every model without an `example_input_array` (Lightning counts
FLOPs only by running one). Here those rows are left out, the FLOPs column and line appear only when
counted, and the table goes to stderr with the progress lines (stdout keeps the run's results).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from torch import nn
from torchmetrics import Metric


def keeps_score(module: nn.Module) -> bool:
    """A metric, or a container holding only metrics, with no parameters: bookkeeping, not model."""
    if any(True for _ in module.parameters()):
        return False
    if isinstance(module, Metric):
        return True
    children = list(module.children())
    return isinstance(module, (nn.ModuleDict, nn.ModuleList)) and bool(children) and all(map(keeps_score, children))


class RunModelSummary(ModelSummary):
    def on_fit_start(self, trainer, pl_module) -> None:
        self._summarize_kwargs["hidden"] = {name for name, child in pl_module.named_children() if keeps_score(child)}
        super().on_fit_start(trainer, pl_module)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  hidden: set[str] = frozenset(), **summarize_kwargs: Any) -> None:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        columns = dict(summary_data)  # {"Name": [...], "Type": [...], "Params": [...], "FLOPs": [...], ...}
        if not total_flops:
            columns.pop("FLOPs", None)
        columns.pop(" ", None)  # Lightning's row numbers: they would skip the hidden rows
        keep = [i for i, name in enumerate(columns["Name"]) if name.split(".")[0] not in hidden]
        console = Console(stderr=True)
        # a log file (no terminal) gets plain ASCII lines, like the one-line-per-epoch progress
        table = Table(header_style="bold magenta", box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
        for title in columns:
            table.add_column(title, justify="left" if title in ("Name", "Type", "Mode") else "right")
        for i in keep:
            table.add_row(*(values[i] for values in columns.values()))
        frozen = total_parameters - trainable_parameters
        count = lambda n: get_human_readable_count(int(n)).strip()  # noqa: E731 (Lightning pads it)
        totals = (f"params: {count(trainable_parameters)} trainable, {count(frozen)} frozen "
                  f"({get_formatted_model_size(model_size)} MB)")
        if total_flops:
            totals += f"; FLOPs of one forward pass: {count(total_flops)}"
        console.print(table)
        console.print(totals)
