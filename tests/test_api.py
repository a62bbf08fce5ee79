import pytest
import torch
from torch import nn

from mextract.api import QueryBudgetExceeded, VictimAPI, quantize
from mextract.compute import Compute
from mextract.defences import HoneyLabels

CPU = Compute(device="cpu", amp=False, channels_last=False)


class FixedLogits(nn.Module):
    """A 'model' whose logits are a fixed function of the first pixel, so tests can
    build inputs with known logits."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x[:, 0, 0, 0] * 255).round().long()
        return self.table[idx]


def images_for(rows: list[int]) -> torch.Tensor:
    x = torch.zeros(len(rows), 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(rows, dtype=torch.uint8)
    return x


@pytest.fixture
def table() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(256, 10) * 3


def test_soft_rows_sum_to_one(table):
    api = VictimAPI(FixedLogits(table), "soft", compute=CPU)
    p = api.query(images_for(list(range(50))))
    assert p.shape == (50, 10)
    torch.testing.assert_close(p.sum(1), torch.ones(50))
    torch.testing.assert_close(p, torch.softmax(table[:50], 1))


def test_hard_is_argmax(table):
    api = VictimAPI(FixedLogits(table), "hard", compute=CPU)
    assert torch.equal(api.query(images_for(list(range(256)))), table.argmax(1))


def test_honey_flips_exactly_low_margin_rows(table):
    rows = list(range(256))
    api = VictimAPI(FixedLogits(table), "honey", compute=CPU)
    served = api.query(images_for(rows))
    top2 = table.topk(2, dim=1)
    low = (top2.values[:, 0] - top2.values[:, 1]) < 1.5
    assert 0 < low.sum() < 256  # the test data has both kinds of rows
    assert torch.equal(served[low], top2.indices[low, 1])
    assert torch.equal(served[~low], top2.indices[~low, 0])


def test_honey_layer_margin_is_configurable(table):
    layer = HoneyLabels(margin=0.0)
    labels = table.argmax(1)
    assert torch.equal(layer(None, table, labels), labels)


def test_counter_is_exact_and_budget_raises(table):
    api = VictimAPI(FixedLogits(table), "hard", budget=100, compute=CPU)
    api.query(images_for(list(range(60))))
    api.query(images_for(list(range(40))))
    assert api.queries == 100
    with pytest.raises(QueryBudgetExceeded, match="budget of 100"):
        api.query(images_for([1]))
    assert api.queries == 100  # a refused query is not counted


def test_api_answers_8bit_images():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2)
    assert quantize(x).tolist() == [[[[0, 128], [255, 255]]]]


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="'probabilities'"):
        VictimAPI(nn.Identity(), "probabilities", compute=CPU)


class SmallConv(nn.Module):
    """A small conv net with random weights: its logits use the full float32 range, so
    bf16 arithmetic (~3 significant digits) visibly changes the softmax."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * self.net(x)


def test_soft_answers_are_float32_even_with_amp_on():
    """The API never answers under the training recipe's bf16 autocast: soft labels
    with amp forced on equal the float32 ones (bf16 would differ by ~1e-2)."""
    amp = Compute(device="cpu", amp=True, channels_last=False)
    assert amp.amp is True  # forced on, even on a CPU without native bf16
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    victim = SmallConv().eval()
    want = VictimAPI(victim, "soft", compute=CPU).query(images)
    got = VictimAPI(victim, "soft", compute=amp).query(images)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5
    # the test would catch bf16: the same net under autocast answers differently
    with torch.inference_mode(), amp.autocast():
        rounded = torch.softmax(victim(images.float() / 255).float(), 1)
    assert (rounded - want).abs().max().item() > 1e-4


def test_fingerprint_follows_weights_mode_and_every_defence_setting(table):
    from mextract.defences import DawnWatermark

    def api(mode="hard", layers=(), model=None):
        return VictimAPI(model or FixedLogits(table), mode, compute=CPU, defences=layers)

    base = api(layers=[HoneyLabels(1.5), DawnWatermark("owner key", 0.01)])
    same = api(layers=[HoneyLabels(1.5), DawnWatermark("owner key", 0.01)])
    assert base.fingerprint == same.fingerprint and len(base.fingerprint) == 64
    others = [api(layers=[HoneyLabels(1.0), DawnWatermark("owner key", 0.01)]),
              api(layers=[HoneyLabels(1.5), DawnWatermark("other key", 0.01)]),
              api(layers=[HoneyLabels(1.5), DawnWatermark("owner key", 0.02)]),
              api(layers=[HoneyLabels(1.5)]), api(), api("soft"),
              api(layers=[HoneyLabels(1.5), DawnWatermark("owner key", 0.01)],
                  model=FixedLogits(table + 1e-3))]
    prints = {base.fingerprint, *(o.fingerprint for o in others)}
    assert len(prints) == 1 + len(others)
    assert api("honey").fingerprint == api(layers=[HoneyLabels()]).fingerprint
    # weights changed in place change it too; the key never appears in clear
    before = same.fingerprint
    with torch.no_grad():
        same.model.table.add_(1e-6)
    assert same.fingerprint != before
    assert "owner key" not in repr(base.spec())
