import pytest
import torch

from mextract.data import load_digits, make_split


def test_split_is_disjoint_covering_and_seeded():
    a = make_split(1001, 0.5, seed=3)
    b = make_split(1001, 0.5, seed=3)
    c = make_split(1001, 0.5, seed=4)
    v, p = set(a["victim"].tolist()), set(a["pool"].tolist())
    assert not v & p
    assert v | p == set(range(1001))
    assert len(v) == 500 or len(v) == 501
    assert torch.equal(a["victim"], b["victim"]) and torch.equal(a["pool"], b["pool"])
    assert not torch.equal(a["victim"], c["victim"])


def test_unshuffled_split_is_first_fraction():
    s = make_split(10, 0.3, shuffle=False)
    assert s["victim"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match="victim_fraction"):
        make_split(10, fraction)


def test_digits_shape_and_seeded_test_split():
    d = load_digits(seed=0)
    assert d["x_train"].dtype == torch.uint8 and d["x_train"].shape[1:] == (3, 32, 32)
    n = len(d["y_train"]) + len(d["y_test"])
    assert n == 1797 and abs(len(d["y_test"]) - 0.2 * n) < 2
    assert torch.equal(load_digits(seed=0)["y_test"], d["y_test"])
