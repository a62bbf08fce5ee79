"""Defence layers of the victim API: DAWN's keyed watermark, layer order, honest cost."""

import hashlib
import hmac
import math

import pytest
import torch
from torch import nn

from mextract.api import VictimAPI
from mextract.compute import Compute
from mextract.defences import DawnWatermark, HoneyLabels, build_defences
from mextract.experiment import api_honest_accuracy, make_api
from mextract.watermark import dawn_digests, dawn_marks

CPU = Compute(device="cpu", amp=False, channels_last=False)
RATE = 0.05
N = 20_000


def linear_victim(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))


def random_images(n: int = N, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 4), generator=gen, dtype=torch.uint8)


def dawn_api(key: str = "secret", rate: float = RATE, **kw) -> VictimAPI:
    return VictimAPI(linear_victim(), "hard", compute=CPU,
                     defences=[DawnWatermark(key=key, rate=rate)], **kw)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_images()


@pytest.fixture(scope="module")
def top1(images) -> torch.Tensor:
    return VictimAPI(linear_victim(), "hard", compute=CPU).query(images)


def test_digest_is_hmac_sha256_of_the_image_bytes(images):
    d = dawn_digests(images[:3], "secret")
    for i in range(3):
        want = hmac.new(b"secret", images[i].numpy().tobytes(), hashlib.sha256).digest()
        assert d[i].tobytes() == want


def test_same_input_same_answer_every_time(images):
    api = dawn_api()
    first = api.query(images)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    again = api.query(images[perm])  # other batches, other order
    assert torch.equal(again, first[perm])
    fresh = dawn_api().query(images[:1000])  # a restarted API answers the same
    assert torch.equal(fresh, first[:1000])
    floats = dawn_api().query(images[:1000].float() / 255)  # the API hashes 8-bit images
    assert torch.equal(floats, first[:1000])


def test_marks_close_to_rate_with_wrong_labels_and_logs_them(images, top1):
    api = dawn_api()
    served = api.query(images)
    marked = served != top1
    sd = math.sqrt(N * RATE * (1 - RATE))
    assert abs(int(marked.sum()) - N * RATE) < 3 * sd, int(marked.sum())
    log = api.watermark_log()
    assert len(log["labels"]) == int(marked.sum())  # every marked answer is logged
    assert log["seen"] == N and log["rate"] == RATE and log["num_classes"] == 10
    idx = marked.nonzero().flatten()
    assert torch.equal(log["images"], images[idx])
    assert torch.equal(log["labels"], served[idx])
    assert torch.equal(log["victim_labels"], top1[idx])
    assert (log["labels"] != log["victim_labels"]).all()
    # wrong labels are spread over the other classes, not one fixed shift
    assert len(((log["labels"] - log["victim_labels"]) % 10).unique()) == 9
    api.query(images[idx])  # asked again: answered the same, not logged twice
    assert len(api.watermark_log()["labels"]) == len(idx)


def test_marked_set_depends_on_the_key(images, top1):
    a = dawn_api("secret").query(images) != top1
    b = dawn_api("another key").query(images) != top1
    overlap = int((a & b).sum())
    # independent keys overlap in about N * r^2 = 50 of about 1,000 marked queries
    assert overlap < 0.15 * int(a.sum()), (overlap, int(a.sum()))
    with pytest.raises(ValueError, match="non-empty"):
        DawnWatermark(key="")


def test_honey_then_dawn_composes(images, top1):
    victim = linear_victim()
    honey_only = VictimAPI(victim, "honey", compute=CPU).query(images)
    both = VictimAPI(victim, "hard", compute=CPU, defences=build_defences(
        [{"type": "honey", "margin": 1.5}, {"type": "dawn", "rate": RATE, "key": "secret"}]))
    served = both.query(images)
    marked = dawn_marks(dawn_digests(images, "secret"), RATE)
    assert 0 < marked.sum() < N
    assert torch.equal(served[~marked], honey_only[~marked])
    assert (served[marked] != top1[marked]).all()


def test_dawn_must_be_the_last_layer():
    with pytest.raises(ValueError, match="last"):
        build_defences([{"type": "dawn", "key": "k"}, {"type": "honey"}])
    with pytest.raises(ValueError, match="last"):
        VictimAPI(linear_victim(), "honey", compute=CPU,
                  defences=[DawnWatermark("k"), HoneyLabels()])
    with pytest.raises(ValueError, match="unknown defence type 'telepathy'"):
        build_defences([{"type": "telepathy"}])


def test_no_dawn_layer_gives_an_empty_log(images):
    api = VictimAPI(linear_victim(), "honey", compute=CPU)
    api.query(images[:100])
    log = api.watermark_log()
    assert not api.watermarked and len(log["labels"]) == 0 and log["seen"] == 100


def test_honest_accuracy_is_the_accuracy_of_served_answers(images):
    victim = linear_victim()
    y = random_images(N, seed=5)[:, 0, 0, 0].long() % 10
    y[:N // 2] = VictimAPI(victim, "hard", compute=CPU).query(images[:N // 2])
    cfg = {"mode": "hard", "defences": [{"type": "honey", "margin": 1.5}]}
    got = api_honest_accuracy(victim, cfg, images, y, CPU)
    served = make_api(victim, cfg, CPU).query(images)
    plain = make_api(victim, {"mode": "hard"}, CPU).query(images)
    assert got["api_honest_accuracy"] == pytest.approx((served == y).float().mean().item())
    assert got["api_victim_accuracy"] == pytest.approx((plain == y).float().mean().item())
    assert got["api_honest_accuracy"] < got["api_victim_accuracy"]  # honey costs accuracy
    assert got["api_changed_answers"] == pytest.approx((served != plain).float().mean().item())
