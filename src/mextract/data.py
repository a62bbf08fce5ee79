"""Data sets as cached uint8 tensors, and the victim / attacker split.

Every data set is converted once into a dict of tensors::

    {"x_train": uint8 [N, 3, 32, 32], "y_train": int64 [N],
     "x_test": uint8 [M, 3, 32, 32], "y_test": int64 [M],
     "classes": list[str], "name": str}

Training code slices batches from these tensors on the compute device; nothing is
decoded per image after the conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mextract.io import load_artifact, save_artifact

IMAGE_SIZE = 32


class DatasetError(RuntimeError):
    """A data set could not be found, read or converted."""


def _to_uint8_chw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 array -> contiguous (N, C, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> dict[str, Any]:
    """scikit-learn's bundled 8x8 digits, resized to 32x32x3, seeded train/test split."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = torch.from_numpy(bunch.images).float() / 16.0  # (N, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(
        x[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.from_numpy(bunch.target).long()
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return {
        "x_train": x[idx_train].contiguous(),
        "y_train": y[idx_train].contiguous(),
        "x_test": x[idx_test].contiguous(),
        "y_test": y[idx_test].contiguous(),
        "classes": [str(c) for c in bunch.target_names],
        "name": "digits",
    }


def load_cifar10(root: str | Path, download: bool = True) -> dict[str, Any]:
    """The original CIFAR-10 release through torchvision (downloaded into ``root``)."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # offline, or no copy at root
        raise DatasetError(
            f"CIFAR-10 is not available under '{root}' and could not be downloaded ({err}). "
            "Set the config key 'dataset.root' to a directory holding an existing copy "
            "(the 'cifar-10-batches-py' folder), or use 'dataset.name: imagefolder' with "
            "'dataset.root' pointing at a train/<class>/ + test/<class>/ image tree."
        ) from err
    return {
        "x_train": _to_uint8_chw(train.data),
        "y_train": torch.tensor(train.targets, dtype=torch.long),
        "x_test": _to_uint8_chw(test.data),
        "y_test": torch.tensor(test.targets, dtype=torch.long),
        "classes": list(train.classes),
        "name": "cifar10",
    }


def _read_image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from tqdm import tqdm

    ds = ImageFolder(str(folder))  # files sorted by class, then by file name
    out = np.empty((len(ds.samples), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(ds.samples, desc=f"reading {folder.name}", unit="img")):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            out[i] = np.asarray(img)
    return _to_uint8_chw(out), torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)


def load_image_folder(root: str | Path) -> dict[str, Any]:
    """Any ``root/train/<class>/*`` + ``root/test/<class>/*`` tree of images."""
    root = Path(root)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DatasetError(
                f"'dataset.root' = '{root}' has no '{part}/' folder; an imagefolder data set "
                "needs train/<class>/* and test/<class>/*."
            )
    x_train, y_train, classes = _read_image_folder(root / "train")
    x_test, y_test, test_classes = _read_image_folder(root / "test")
    if classes != test_classes:
        raise DatasetError(f"train and test class folders differ under '{root}'")
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "classes": classes,
        "name": f"imagefolder:{root.name}",
    }


def build_dataset(name: str, root: str | Path | None, seed: int = 0, download: bool = True,
                  test_fraction: float = 0.2) -> dict[str, Any]:
    """Load the data set selected by the config key ``dataset.name``."""
    if name == "digits":
        return load_digits(seed=seed, test_fraction=test_fraction)
    if name == "cifar10":
        return load_cifar10(root or "resources/cifar10", download=download)
    if name == "imagefolder":
        if not root:
            raise DatasetError("'dataset.root' must be set for 'dataset.name: imagefolder'")
        return load_image_folder(root)
    raise DatasetError(f"unknown 'dataset.name': {name!r} (digits, cifar10, imagefolder)")


def save_dataset(data: dict[str, Any], path: str | Path) -> None:
    save_artifact(data, path)


def load_dataset(path: str | Path) -> dict[str, Any]:
    return load_artifact(path)


def make_split(n_train: int, victim_fraction: float = 0.5, seed: int = 0,
               shuffle: bool = True) -> dict[str, torch.Tensor]:
    """Indices of the victim's half and the attacker's pool within the training set.

    With ``shuffle=False`` the victim gets literally the first ``victim_fraction`` of
    the training set, as in the reference study on the original CIFAR-10 order. With
    ``shuffle=True`` the order is a seeded permutation first (needed when the files
    are sorted by class, as in an ImageFolder tree).
    """
    if not 0.0 < victim_fraction < 1.0:
        raise ValueError(f"split.victim_fraction must lie in (0, 1), got {victim_fraction}")
    if shuffle:
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n_train)
    k = int(round(n_train * victim_fraction))
    return {"victim": order[:k].sort().values, "pool": order[k:].sort().values}


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float images in [0, 1]."""
    return x.float().div_(255.0)
