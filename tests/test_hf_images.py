"""hf_images: Hugging Face image datasets from local files (parquet, a parquet directory with a test
split, an image folder), lazily decoded or materialised, string labels mapped, users' mistakes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from litlab.data import HFImagesDataModule
from litlab.data.hf_images import HFImageBatches
from litlab.errors import UserError


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    """load_dataset caches Arrow files: keep them out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_cache")


def _write_parquet(path, n=60, size=(12, 10), label_names=("a", "b", "c"), image_column="img", string_labels=False):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]
    labels = [i % len(label_names) for i in range(n)]
    label_feat = datasets.ClassLabel(names=list(label_names))
    if string_labels:
        labels, label_feat = [label_names[i] for i in labels], datasets.Value("string")
    features = datasets.Features({image_column: datasets.Image(), "label": label_feat})
    datasets.Dataset.from_dict({image_column: imgs, "label": labels}, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    return _write_parquet(tmp_path_factory.mktemp("pq") / "data.parquet")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for split, n in (("train", 10), ("test", 4)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_hf_parquet_file(parquet_file):
    dm = HFImagesDataModule(path=str(parquet_file), batch_size=16)
    assert dm.info() == {"input_shape": (3, 12, 10), "num_classes": 3}  # before setup; "img" column accepted
    dm.setup()
    sizes = {k: len(s) for k, s in dm.hf_splits.items()}
    assert sizes == {"train": 48, "val": 6, "test": 6}  # no val/test split in the file: carved
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 3, 12, 10) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    xt, _ = dm.train_set.tensors()
    assert torch.allclose(xt.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(xt.std((0, 2, 3)), torch.ones(3), atol=1e-2)
    again = HFImagesDataModule(path=str(parquet_file))
    again.setup()
    assert torch.equal(again.test_set.tensors()[0], dm.test_set.tensors()[0])
    other = HFImagesDataModule(path=str(parquet_file), split_seed=3)
    other.setup()
    assert not torch.equal(other.test_set.tensors()[0], dm.test_set.tensors()[0])


def test_hf_parquet_dir_with_test_split_and_resize(tmp_path):
    _write_parquet(tmp_path / "train-00000.parquet", n=40)
    _write_parquet(tmp_path / "test-00000.parquet", n=9)
    dm = HFImagesDataModule(path=str(tmp_path), image_size=8, channels=1, normalize=False)
    assert dm.info()["input_shape"] == (1, 8, 8)
    dm.setup()
    assert len(dm.test_set) == 9 and len(dm.train_set) + len(dm.val_set) == 40
    xt, _ = dm.test_set.tensors()
    assert xt.shape == (9, 1, 8, 8) and 0 <= xt.min() and xt.max() <= 1


def test_hf_imagefolder(image_folder):
    dm = HFImagesDataModule(path=str(image_folder), image_size=6)
    assert dm.info() == {"input_shape": (1, 6, 6), "num_classes": 2}  # grayscale PNGs -> 1 channel
    assert dm.class_names == ["cat", "dog"]
    dm.setup()
    assert len(dm.test_set) == 8 and len(dm.train_set) + len(dm.val_set) == 20
    assert dm.train_set.y.unique().tolist() == [0, 1]
    rgb = HFImagesDataModule(path=str(image_folder), channels=3)
    assert rgb.info()["input_shape"] == (3, 9, 9)


def test_hf_lazy_path_matches_materialised(parquet_file, monkeypatch):
    eager = HFImagesDataModule(path=str(parquet_file))
    eager.setup()
    monkeypatch.setattr(HFImagesDataModule, "max_in_memory_mb", 0)
    lazy = HFImagesDataModule(path=str(parquet_file), batch_size=5)
    lazy.setup()
    assert isinstance(lazy.train_set, HFImageBatches)
    assert len(pickle.loads(pickle.dumps(lazy.train_set))) == len(lazy.train_set)  # spawned workers
    x, y = next(iter(lazy.val_dataloader()))
    assert torch.allclose(x, eager.val_set.tensors()[0][:5], atol=1e-5) and torch.equal(y, eager.val_set.y[:5])
    assert sum(len(y) for _, y in lazy.train_dataloader()) == len(eager.train_set)


def test_hf_string_labels_mapped(tmp_path):
    path = _write_parquet(tmp_path / "s.parquet", n=20, label_names=("zebra", "ant"), string_labels=True)
    dm = HFImagesDataModule(path=str(path))
    assert dm.info()["num_classes"] == 2 and dm.class_names == ["ant", "zebra"]
    dm.setup()
    assert sorted(dm.train_set.y.unique().tolist()) == [0, 1]


def test_hf_user_errors(parquet_file, tmp_path):
    with pytest.raises(UserError, match=r"^data\.path: is required"):
        HFImagesDataModule()
    with pytest.raises(UserError, match=r"^data\.path: no such file or directory"):
        HFImagesDataModule(path=str(tmp_path / "missing")).info()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=r"^data\.path: .*expected a \.parquet file"):
        HFImagesDataModule(path=str(tmp_path / "notes.txt")).info()
    with pytest.raises(UserError) as e:
        HFImagesDataModule(path=str(parquet_file), image_column="pixels").info()
    assert str(e.value) == "data.image_column: no column 'pixels' in dataset; columns: img, label"
    with pytest.raises(UserError, match=r"^data\.label_column: no column 'y'"):
        HFImagesDataModule(path=str(parquet_file), label_column="y").info()
    with pytest.raises(UserError, match=r"^data\.test_split: no split 'holdout'"):
        HFImagesDataModule(path=str(parquet_file), test_split="holdout").setup()
