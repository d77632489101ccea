"""Shared DataModules: splits, shapes, normalisation, the fast batch loader (HF image files: test_hf_images.py)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from litlab import registry
from litlab.config import resolve_args
from litlab.data import BlobsDataModule, DigitsDataModule, Function1DDataModule
from litlab.data.digits import RandomShift
from litlab.data.memory import TensorBatchDataset, fast_loader
from litlab.errors import ConfigError


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    """load_dataset caches Arrow files: keep them out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_cache")


def test_registered_with_valid_signatures():
    registry.load_all()
    for name in ("digits", "hf_images", "function1d", "blobs"):
        entry = registry.get_data(name)
        args = resolve_args("data", entry.cls, {"path": "x"} if name == "hf_images" else {})
        assert args["batch_size"] == 64 and args["num_workers"] == 0


# ---------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def _ids(dm, split):
    return dm.hf_splits[split]["id"]


def test_digits_info_before_setup():
    assert DigitsDataModule().info() == {"input_shape": (1, 8, 8), "num_classes": 10}
    assert DigitsDataModule(image_size=32).info()["input_shape"] == (1, 32, 32)


def test_digits_splits_sizes_disjoint_stratified(digits):
    ids = {k: set(_ids(digits, k)) for k in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == 1797 == len(set.union(*ids.values()))
    assert len(ids["test"]) == pytest.approx(0.15 * 1797, abs=2)
    assert len(ids["val"]) == pytest.approx(0.15 * 1797, abs=2)
    assert [len(digits.train_set), len(digits.val_set), len(digits.test_set)] == [len(ids[k]) for k in ("train", "val", "test")]
    counts = torch.bincount(digits.test_set.y, minlength=10)
    assert counts.min() >= 25 and counts.max() <= 29  # ~10% of 270 per class


def test_digits_split_depends_on_split_seed_only(digits):
    again = DigitsDataModule(batch_size=7, normalize=False)
    again.setup()
    other = DigitsDataModule(split_seed=1)
    other.setup()
    for k in ("train", "val", "test"):
        assert _ids(again, k) == _ids(digits, k)
    assert set(_ids(other, "test")) != set(_ids(digits, "test"))


@pytest.mark.parametrize("split_seed,val,test", [(0, 0.15, 0.15), (3, 0.1, 0.3)])
def test_digits_splits_are_the_rows_hf_train_test_split_gives(split_seed, val, test):
    """litlab.data.splits computes HF's stratified split itself (HF reads the labels row by row):
    the same rows in the same order as ds.train_test_split, test first, then val out of the rest."""
    from litlab.data.digits import digits_hf_dataset

    dm = DigitsDataModule(split_seed=split_seed, val_fraction=val, test_fraction=test, normalize=False)
    dm.setup()
    ds = digits_hf_dataset()
    first = ds.train_test_split(test_size=test, seed=split_seed, stratify_by_column="label")
    second = first["train"].train_test_split(test_size=val / (1 - test), seed=split_seed, stratify_by_column="label")
    for name, hf, served in (("train", second["train"], dm.train_set), ("val", second["test"], dm.val_set),
                             ("test", first["test"], dm.test_set)):
        assert _ids(dm, name) == hf["id"], name
        t = hf.with_format("torch", columns=["image", "label"])[:]
        assert torch.equal(served.x, t["image"].unsqueeze(1).float() / 16) and torch.equal(served.y, t["label"]), name


def test_stratified_split_is_hf_train_test_split_on_any_dataset():
    from datasets import ClassLabel, Dataset, Features, Value

    from litlab.data.splits import stratified_split

    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=301, p=[0.55, 0.25, 0.15, 0.05])  # uneven classes
    ds = Dataset.from_dict({"id": np.arange(301), "y": labels},
                           features=Features({"id": Value("int32"), "y": ClassLabel(num_classes=4)}))
    ds = ds.select(rng.permutation(301)[:250])  # an index mapping, as after a first split
    for fraction, seed in ((0.2, 0), (0.33, 7)):
        train, test = stratified_split(ds, fraction, seed, column="y")
        hf = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="y")
        assert train["id"] == hf["train"]["id"] and test["id"] == hf["test"]["id"]
    lonely = Dataset.from_dict({"y": [0, 0, 0, 1]}, features=Features({"y": ClassLabel(num_classes=2)}))
    with pytest.raises(ValueError, match="only 1 member"):
        stratified_split(lonely, 0.5, 0, column="y")


def test_digits_arrays_are_load_digits_with_or_without_its_file(monkeypatch):
    """digits_arrays reads scikit-learn's file itself; the same arrays as load_digits, and through
    load_digits (and HF's generator through `datasets`) where the files are not found."""
    import importlib.util

    from sklearn.datasets import load_digits

    from litlab.data import digits as digits_module, splits

    raw = load_digits()
    ours = digits_module.digits_arrays()
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None)
        splits.hf_stratified_index_generator.cache_clear()
        fallback = digits_module.digits_arrays(), splits.hf_stratified_index_generator()
    splits.hf_stratified_index_generator.cache_clear()
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices as hf_generator

    assert fallback[1] is hf_generator and splits.hf_stratified_index_generator() is not hf_generator
    for images, labels in (ours, fallback[0]):
        assert images.dtype == np.uint8 and labels.dtype == np.int64 and images.shape == (1797, 8, 8)
        assert np.array_equal(images, raw.images) and np.array_equal(labels, raw.target)


def test_digits_set_up_imports_neither_datasets_nor_sklearn():
    """~0.5 s and ~0.7 s of every digits run's start; hf_splits imports datasets when asked for."""
    import subprocess
    import sys

    from helpers import cli_env

    code = ("import sys; from litlab.data.digits import DigitsDataModule; d = DigitsDataModule(); d.setup(); "
            "print(sorted({'datasets', 'sklearn'} & set(sys.modules))); print(len(d.hf_splits['test']), 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "270 True"], out


def test_digits_class_names_are_the_hf_label_names(digits):
    from litlab.module import class_names

    assert class_names(digits, 10) == digits.hf_splits["train"].features["label"].names == [str(d) for d in range(10)]


def test_digits_shapes_dtypes_and_normalisation(digits):
    x, y = digits.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == ()
    xb, yb = next(iter(digits.train_dataloader()))
    assert xb.shape == (64, 1, 8, 8) and yb.shape == (64,) and yb.dtype == torch.int64
    xt, _ = digits.train_set.tensors()
    assert xt.mean().item() == pytest.approx(0, abs=1e-5) and xt.std().item() == pytest.approx(1, abs=1e-4)
    xv, _ = digits.val_set.tensors()  # train stats, so only roughly 0/1
    assert abs(xv.mean().item()) < 0.1
    raw = DigitsDataModule(normalize=False)
    raw.setup()
    xr, _ = raw.train_set.tensors()
    assert xr.min() == 0 and xr.max() == 1


def test_digits_image_size_32():
    dm = DigitsDataModule(image_size=32, batch_size=16)
    dm.setup()
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (16, 1, 32, 32)
    xt, _ = dm.train_set.tensors()
    assert xt.mean().item() == pytest.approx(0, abs=1e-5)


def test_digits_loader_covers_train_once(digits):
    ys = [y for _, y in digits.train_dataloader()]
    assert sum(map(len, ys)) == len(digits.train_set)
    assert torch.equal(torch.cat(ys).sort().values, digits.train_set.y.sort().values)


def test_digits_bad_fractions():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


def test_augment_only_on_train(digits):
    aug = DigitsDataModule(augment=True)
    aug.setup()
    assert torch.equal(aug.val_set.tensors()[0], digits.val_set.tensors()[0])
    assert torch.equal(aug.test_set.tensors()[0], digits.test_set.tensors()[0])
    torch.manual_seed(0)
    xa, ya = aug.train_set.tensors()
    assert torch.equal(ya, digits.train_set.y)
    changed = (xa != digits.train_set.x).flatten(1).any(1).float().mean().item()
    assert 0.7 < changed < 1.0  # 8 of 9 shifts move the image


def test_random_shift_moves_by_at_most_one_pixel():
    torch.manual_seed(0)
    x = torch.zeros(500, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0
    out = RandomShift(1, fill=0.0)(x)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), torch.ones(500))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 5, pos % 5
    assert rows.min() == 1 and rows.max() == 3 and cols.min() == 1 and cols.max() == 3
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 9
    edge = RandomShift(1, fill=-7.0)(torch.zeros(200, 1, 4, 4))
    assert set(edge.unique().tolist()) == {0.0, -7.0}  # borders are filled with the background


# ---------------------------------------------------------------- the fast batch loader
def test_fast_loader_each_sample_once_shuffled():
    ds = TensorBatchDataset(torch.arange(103).float()[:, None], torch.arange(103))
    loader = fast_loader(ds, batch_size=10, shuffle=True)
    epochs = []
    for epoch in range(2):
        loader.batch_sampler.sampler.set_epoch(epoch)  # Lightning calls it at every epoch start
        batches = list(loader)
        assert [len(y) for _, y in batches] == [10] * 10 + [3]
        assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)
        order = torch.cat([y for _, y in batches])
        assert torch.equal(order.sort().values, torch.arange(103))
        assert not torch.equal(order, torch.arange(103))
        epochs.append(order)
    assert not torch.equal(*epochs)
    again = torch.cat([y for _, y in loader])  # the order is a function of (seed, epoch) alone
    assert torch.equal(again, epochs[1])
    seq = torch.cat([y for _, y in fast_loader(ds, batch_size=10, shuffle=False)])
    assert torch.equal(seq, torch.arange(103))


def test_fast_loader_ddp_sharding():
    """What Lightning does under DDP: inject a DistributedSampler and rebuild the loader."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    ds = TensorBatchDataset(torch.arange(103).float()[:, None], torch.arange(103))
    loader = fast_loader(ds, batch_size=8, shuffle=True)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sharded = _update_dataloader(loader, sampler)
        batches = list(sharded)
        assert type(sharded.batch_sampler).__name__ == "ResumableBatchSampler" and sharded.batch_sampler.batch_size == 8
        assert [len(y) for _, y in batches] == [8] * 6 + [4]
        assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)
        seen.append(torch.cat([y for _, y in batches]))
    assert torch.cat(seen).unique().numel() == 103  # 104 = 103 + 1 padding sample


def test_datasets_pickle_for_spawned_workers(digits):
    aug = DigitsDataModule(augment=True)
    aug.setup()
    for ds in (digits.train_set, aug.train_set):
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds)


# ---------------------------------------------------------------- synthetic
@pytest.mark.parametrize("fn, xs, ys", [
    ("sin", [0.0, math.pi / 2], [0.0, 1.0]),
    ("abs", [-2.0, 3.0], [2.0, 3.0]),
    ("step", [-0.1, 0.0, 2.0], [0.0, 1.0, 1.0]),
    ("cubic", [-2.0, 1.5], [-8.0, 3.375]),
    ("sawtooth", [0.0, math.pi / 2 - 1e-3, math.pi / 2, math.pi], [0.0, 1.0, -1.0, 0.0]),
])
def test_function1d_targets(fn, xs, ys):
    dm = Function1DDataModule(fn=fn)
    assert dm.info() == {"input_dim": 1, "output_dim": 1}
    assert torch.allclose(dm.target_fn(torch.tensor(xs)), torch.tensor(ys), atol=2e-3)


def test_function1d_data():
    dm = Function1DDataModule(fn="abs", n_train=100, n_val=20, n_test=30, noise=0.1, x_low=-1, x_high=2, seed=3)
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [100, 20, 30]
    x, y = dm.train_set[0]
    assert x.shape == (1,) and y.shape == (1,) and x.dtype == y.dtype == torch.float32
    xt, yt = dm.train_set.tensors()
    assert xt.min() >= -1 and xt.max() <= 2
    assert 0.05 < (yt - dm.target_fn(xt)).std() < 0.2  # noisy train
    xv, yv = dm.val_set.tensors()
    assert torch.equal(yv, dm.target_fn(xv))  # clean val
    same = Function1DDataModule(fn="abs", n_train=100, n_val=20, n_test=30, noise=0.1, x_low=-1, x_high=2, seed=3)
    same.setup()
    assert torch.equal(same.train_set.x, xt)
    with pytest.raises(ConfigError, match="data.x_low"):
        Function1DDataModule(x_low=1, x_high=1)


def test_blobs_binary_perceptron_separable():
    from sklearn.linear_model import Perceptron

    dm = BlobsDataModule(n_samples=400, separation=0.3, seed=1)
    assert dm.info() == {"input_shape": (2,), "num_classes": 2}
    dm.setup()
    x, y = dm.train_set.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1] == 2
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 400
    xa, ya = dm.generate()
    assert torch.bincount(ya).tolist() == [200, 200]
    clf = Perceptron(fit_intercept=False, max_iter=1000, tol=None).fit(xa.numpy(), ya.numpy())
    assert clf.score(xa.numpy(), ya.numpy()) == 1.0


@pytest.mark.parametrize("num_classes, n_features", [(2, 1), (4, 2), (5, 3)])
def test_blobs_margin_guaranteed(num_classes, n_features):
    dm = BlobsDataModule(n_samples=500, n_features=n_features, num_classes=num_classes, separation=0.25)
    x, y = dm.generate()
    c = dm.centers
    scores = x @ c.T - 0.5 * (c * c).sum(1)  # the linear nearest-centre classifier
    assert torch.equal(scores.argmax(1), y)
    # distance to the boundary with every other class j: (s_y - s_j) / |c_y - c_j|
    own = scores.gather(1, y[:, None])
    dist = (own - scores) / (c[y][:, None, :] - c[None]).norm(dim=2).clamp_min(1e-12)
    dist[torch.arange(len(y)), y] = float("inf")
    assert dist.min() >= 0.25 - 1e-4


def test_fast_loader_resumes_mid_epoch_with_the_same_batches_and_augmentation():
    """state_dict() after k batches + load_state_dict() in a fresh loader: the rest of the epoch is
    the same batches with the same random augmentation, whatever the global RNG did meanwhile."""
    x = torch.rand(103, 1, 4, 4)
    ds = TensorBatchDataset(x, torch.arange(103), transform=lambda b: b + torch.rand(len(b), 1, 1, 1))
    first = fast_loader(ds, batch_size=10, shuffle=True)
    first.batch_sampler.sampler.set_epoch(3)
    it = iter(first)
    seen = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 3, "consumed": 4}
    rest = list(it)
    torch.manual_seed(12345)  # a different global RNG state must not matter
    second = fast_loader(ds, batch_size=10, shuffle=True)
    second.load_state_dict(state)
    resumed = list(second)
    assert len(seen) + len(resumed) == 11 and len(resumed) == len(rest)
    for (xa, ya), (xb, yb) in zip(rest, resumed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert second.state_dict() == {"epoch": 3, "consumed": 11}
    # a state saved at the end of an epoch resumes at the start of the next one
    third = fast_loader(ds, batch_size=10, shuffle=True)
    third.load_state_dict({"epoch": 3, "consumed": 11})
    assert third.batch_sampler.sampler.epoch == 4 and len(list(third)) == 11


def test_augmented_batches_do_not_depend_on_worker_processes():
    """Each batch's augmentation is seeded by (seed, epoch, batch): 0 or 2 workers, same batches."""
    ds = TensorBatchDataset(torch.rand(50, 1, 4, 4), torch.arange(50), transform=_add_noise)
    runs = []
    for workers in (0, 2):
        loader = fast_loader(ds, batch_size=8, shuffle=True, num_workers=workers)
        loader.batch_sampler.sampler.set_epoch(1)
        runs.append(list(loader))
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def _add_noise(x):  # module level: picklable for worker processes
    return x + torch.rand_like(x)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A save killed half-way (here: torch.save raising mid-write) leaves the previous last.ckpt intact."""
    from litlab.checkpointing import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_midway(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
