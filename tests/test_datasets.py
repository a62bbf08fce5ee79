import numpy as np
import pytest
import torch
from PIL import Image

from mextract.data import DatasetError, build_dataset, load_cifar10


def make_tree(root, classes=("cat", "dog"), per_class=3, size=(32, 32)):
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / part / c / f"{i:04d}.png")


def test_imagefolder_tree_becomes_uint8_tensors(tmp_path):
    make_tree(tmp_path)
    d = build_dataset("imagefolder", tmp_path)
    assert d["x_train"].shape == (6, 3, 32, 32) and d["x_train"].dtype == torch.uint8
    assert d["classes"] == ["cat", "dog"]
    assert d["y_train"].tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(Image.open(tmp_path / "train" / "cat" / "0000.png"))
    assert torch.equal(d["x_train"][0], torch.from_numpy(first).permute(2, 0, 1))


def test_imagefolder_resizes_other_sizes(tmp_path):
    make_tree(tmp_path, size=(40, 48))
    assert build_dataset("imagefolder", tmp_path)["x_test"].shape == (6, 3, 32, 32)


def test_imagefolder_without_test_folder_names_the_key(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="dataset.root"):
        build_dataset("imagefolder", tmp_path)


def test_missing_cifar10_names_the_key_to_set(tmp_path):
    with pytest.raises(DatasetError, match="dataset.root"):
        load_cifar10(tmp_path / "nothing-here", download=False)
