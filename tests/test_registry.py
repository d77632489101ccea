"""Every registered model: builds from its smoke config, forward, backward, no NaN, one real
optimisation step in a Trainer. New models are covered the moment they are registered."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from litlab import registry
from litlab.config import OptimConfig, resolve_args

registry.load_all()
MODEL_NAMES = sorted(registry.MODELS)


def _build(name: str, **model_overrides):
    entry = registry.MODELS[name]
    smoke = entry.smoke
    assert smoke.get("data", {}).get("name"), f"{name}: register it with smoke={{'data': {{'name': ...}}}}"
    data_entry = registry.get_data(smoke["data"]["name"])
    data_args = resolve_args("data", data_entry.cls, {k: v for k, v in smoke["data"].items() if k != "name"})
    dm = data_entry.cls(**data_args)
    info = {k: list(v) if isinstance(v, tuple) else v for k, v in dm.info().items()}
    model_args = resolve_args("model", entry.cls, {**smoke.get("model", {}), **model_overrides}, provided=info)
    L.seed_everything(0, verbose=False)
    model = entry.cls(**model_args)
    model.optim_config = OptimConfig()
    return entry, dm, model


def test_registry_is_populated_with_metadata():
    assert {"mlp", "perceptron", "uat", "lenet5", "resnet_small"} <= set(MODEL_NAMES)
    for name in MODEL_NAMES:
        e = registry.MODELS[name]
        assert e.chapter and e.description and "\n" not in e.description
    assert {"digits", "hf_images", "function1d", "blobs"} <= set(registry.DATA)


def test_the_source_index_knows_every_registered_name_and_its_arguments():
    """`litlab run` checks model/data names and argument names from the source before importing
    Lightning (model_index.check_names_and_arguments): the same names and the same arguments, in
    order, as config.resolve_args reads from each class (None only where __init__ is inherited),
    and each argument's type as typing.get_type_hints gives it, or Any (left to resolve_args) where
    the source does not tell it: at most 1 argument in 20."""
    import typing

    from litlab.config import signature_schema
    from litlab.model_index import registered_arguments

    index = registered_arguments()
    assert index is not None, "a registering file cannot be read from the source"
    typed = unread = 0
    for kind, table in (("model", registry.MODELS), ("data", registry.DATA)):
        # the package's own (not those a test or a benchmark registered in this process)
        table = {n: e for n, e in table.items() if e.cls.__module__.startswith("litlab.")}
        assert set(index[kind]) == set(table), kind
        for name, entry in table.items():
            if "__init__" not in vars(entry.cls):
                assert index[kind][name] is None, (kind, name)
                continue
            schema = signature_schema(entry.cls)
            assert list(index[kind][name]) == list(schema), (kind, name)
            for arg, (hint, _default) in schema.items():
                read = index[kind][name][arg]
                assert read == hint or read is typing.Any, (kind, name, arg, read, hint)
                typed += hint is not typing.Any
                unread += read is typing.Any and hint is not typing.Any
    assert unread <= typed / 20, (unread, typed)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_no_nan(name):
    entry, dm, model = _build(name)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model.train()
    # A model whose forward is not `model(batch[0])` (seq2seq, detectors) says how in smoke_forward.
    out = model.smoke_forward(batch) if hasattr(model, "smoke_forward") else model(batch[0])
    assert torch.isfinite(out).all(), f"{name}: non-finite forward output"
    if model.automatic_optimization:
        loss = model.training_step(batch, 0)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no gradient reached the parameters"
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_training_step_in_a_trainer(name, tmp_path):
    entry, dm, model = _build(name)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: one step changed nothing"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_lean_step_trains_what_lightnings_loop_trains(name, tmp_path):
    """litlab's lean training step (trainer.fast_loop, the default) on every registered model: three
    steps leave the same weights and buffers, bit for bit, as the same three steps of Lightning's
    own loop. Under manual optimisation (GANs, RL) the lean step stands aside."""
    from litlab import fast_loop

    states = []
    for lean in (True, False):
        entry, dm, model = _build(name)
        trainer = L.Trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, default_root_dir=tmp_path / str(lean))
        if lean:
            assert fast_loop.install(trainer)
        trainer.fit(model, datamodule=dm)
        if lean:  # the lean path ran (automatic optimisation) or stood aside (manual)
            assert trainer.fit_loop.epoch_loop.lean_epoch == model.automatic_optimization, name
        states.append(model.state_dict())
    lean_state, lightning_state = states
    assert lean_state.keys() == lightning_state.keys()
    different = [k for k in lean_state if not torch.equal(lean_state[k], lightning_state[k])]
    assert not different, f"{name}: {different[:5]}"


def test_models_are_listed_in_course_order_not_as_strings(capsys):
    """Chapters sorted as strings put 10, 11, 12 between 1-2 and 3."""
    from litlab.cli import main
    from litlab.model_index import chapter_order, registered_models

    chapters = list(dict.fromkeys(e.chapter for e in registered_models()))
    numbers = [int(c.split()[0].split("-")[0]) for c in chapters]
    assert numbers == sorted(numbers) and numbers[0] == 1 and numbers[-1] >= 10, chapters
    assert sorted(["10 GNNs", "3 CNNs", "1-2 MLPs", "11 Diffusion", "5-6 Transformers", "appendix"],
                  key=chapter_order) == ["1-2 MLPs", "3 CNNs", "5-6 Transformers", "10 GNNs", "11 Diffusion", "appendix"]
    assert main(["models"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert [int(n.split("-")[0]) for n in listed] == sorted(int(n.split("-")[0]) for n in listed)
    assert [e.name for e in registered_models(chapter="graph")] == ["gat", "gcn", "gnn_depth_sweep",
                                                                   "graph_classifier", "graphsage"]


def test_an_unknown_chapter_is_one_line_listing_the_chapters(capsys):
    """`litlab models --chapter nosuch` printed an empty table with exit status 0."""
    from litlab.cli import main
    from litlab.errors import UserError
    from litlab.model_index import registered_models

    with pytest.raises(UserError, match=r"--chapter 'nosuch': no model's chapter contains it; chapters: "
                                        r"1-2 MLPs and optimisation, 3 Convolutional networks, .*, 10 "):
        registered_models(chapter="nosuch")
    assert main(["models", "--chapter", "nosuch"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("litlab models: error: --chapter 'nosuch': no model's chapter contains it")
