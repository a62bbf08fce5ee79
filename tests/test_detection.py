"""PRADA (mextract.detection): the algorithm against a direct transcription of the
paper's Algorithm 1, detection of a JBDA-like stream, the false-positive rate on honest
clients sending natural images (scikit-learn digits), the query cap, the seeded
simulation, and independence from batching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from mextract import detection
from mextract.data import load_digits
from mextract.detection import Prada, benign_fpr, detection_report, queries_to_flag

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as 3x32x32 uint8 images (the honest clients' natural images)."""
    d = load_digits()
    return torch.cat([d["x_train"], d["x_test"]]), torch.cat([d["y_train"], d["y_test"]])


def jbda_like(images: torch.Tensor, labels: torch.Tensor, per_class: int = 2, rounds: int = 6,
              step: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Jacobian-augmentation-like stream (Papernot et al., AsiaCCS 2017): ``per_class``
    seed images of each class, then ``rounds`` rounds that each perturb every image so far
    by ``step`` times a sign vector (random here, the sign of a Jacobian there), keeping
    its class; the set doubles each round. 20 * 2**6 = 1,280 queries by default."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    cur, cls = images[idx].float() / 255, labels[idx]
    stream, classes = [images[idx]], [cls]
    for _ in range(rounds):
        sign = torch.randint(0, 2, cur.shape, generator=gen).float() * 2 - 1
        new = (cur + step * sign).clamp(0, 1)
        stream.append((new * 255).round().to(torch.uint8))
        classes.append(cls)
        cur, cls = torch.cat([cur, new]), torch.cat([cls, cls])
    return torch.cat(stream), torch.cat(classes)


def direct_prada(images: torch.Tensor, classes: torch.Tensor, delta: float,
                 min_distances: int, check_every: int) -> dict:
    """The paper's Algorithm 1, query by query with Python lists and np.linalg.norm."""
    flat = images.reshape(len(images), -1).double().numpy() / 255
    sets: dict[int, list[np.ndarray]] = {}
    joined: dict[int, list[float]] = {}
    thr: dict[int, float] = {}
    d_all: list[float] = []
    flagged = None
    for k, (x, c) in enumerate(zip(flat, classes.tolist(), strict=True), start=1):
        if c not in sets:
            sets[c], joined[c], thr[c] = [x], [0.0], 0.0
        else:
            dmin = min(float(np.linalg.norm(x - y)) for y in sets[c])
            d_all.append(dmin)
            if dmin > thr[c]:
                sets[c].append(x)
                joined[c].append(dmin)
                thr[c] = max(thr[c], float(np.mean(joined[c]) - np.std(joined[c])))
        if flagged is None and k % check_every == 0 and len(d_all) >= min_distances:
            d = np.asarray(d_all)
            d = d[np.abs(d - d.mean()) < 3 * d.std()]
            if stats.shapiro(d).statistic < delta:
                flagged = k
    return {"sets": sets, "joined": joined, "threshold": thr, "distances": d_all,
            "flagged_at": flagged}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["sets"].keys() == b["sets"].keys()
    for c in a["sets"]:
        assert torch.equal(a["sets"][c]["members"], b["sets"][c]["members"])
        assert a["sets"][c]["joined"] == b["sets"][c]["joined"]
        assert a["sets"][c]["threshold"] == b["sets"][c]["threshold"]
    np.testing.assert_array_equal(a["distances"], b["distances"])
    np.testing.assert_array_equal(a["positions"], b["positions"])
    for key in ("queries_seen", "flagged_at", "last_w", "tests"):
        assert a[key] == b[key], key


def mixed_stream(n_noise: int = 150, n_dup: int = 150, seed: int = 0):
    """Random 3x4x4 images of three classes, then near-duplicates of the first ten
    (+-3 grey levels): the first part grows the sets, the second part mostly does not
    join them and its small distances skew D."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n_noise, 3, 4, 4), generator=gen, dtype=torch.uint8)
    base = noise[torch.randint(0, 10, (n_dup,), generator=gen)].int()
    jitter = torch.randint(-3, 4, base.shape, generator=gen, dtype=torch.int32)
    dups = (base + jitter).clamp(0, 255).to(torch.uint8)
    images = torch.cat([noise, dups])
    classes = torch.randint(0, 3, (len(images),), generator=gen)
    return images, classes


def test_matches_a_direct_transcription_of_the_algorithm():
    images, classes = mixed_stream()
    want = direct_prada(images, classes, delta=0.9, min_distances=30, check_every=3)
    det = Prada(delta=0.9, min_distances=30, check_every=3)
    for start in range(0, len(images), 64):
        det.observe(images[start:start + 64], classes[start:start + 64])
    got = det.state()
    np.testing.assert_allclose(got["distances"], want["distances"], rtol=1e-12, atol=1e-12)
    for c, members in want["sets"].items():
        assert len(got["sets"][c]["members"]) == len(members)
        expected = torch.from_numpy(np.stack(members) * 255).round().to(torch.uint8)
        assert torch.equal(got["sets"][c]["members"], expected)
        np.testing.assert_allclose(got["sets"][c]["joined"], want["joined"][c], rtol=1e-12)
        assert got["sets"][c]["threshold"] == pytest.approx(want["threshold"][c], rel=1e-12)
    # the case is not trivial: some queries were kept out of their sets, and it flagged
    assert sum(len(m) for m in want["sets"].values()) < len(images) - 50
    assert want["flagged_at"] is not None
    assert got["flagged_at"] == want["flagged_at"]
    assert det.queries_seen == len(images)


def test_flags_a_jbda_like_stream(digits):
    attack, classes = jbda_like(*digits)
    at = queries_to_flag(attack, classes)
    # 20 seeds open 10 class sets; D reaches the 101 distances of the first test at
    # query 111, and the perturbation rounds' distances fail the test right there.
    assert at == 111
    det = Prada()
    det.observe(attack[:at], classes[:at])
    assert det.flagged_at == at and det.last_w < det.delta
    # 111 natural digits pass the same first test: the perturbations trigger the flag,
    # not the count
    assert queries_to_flag(digits[0][:at], digits[1][:at]) is None


def test_honest_clients_on_natural_images_are_rarely_flagged(digits):
    # measured: 0 of 20 clients flagged (300 queries each, default delta 0.9); the
    # digits' W stays around 0.95-0.97, so a delta of 0.99 flags nearly everyone
    got = benign_fpr(*digits, clients=20, queries_per_client=300, seed=0)
    assert got == {"clients": 20, "flagged": got["flagged"], "fpr": got["flagged"] / 20,
                   "queries_per_client": 300}
    assert got["fpr"] <= 0.05
    strict = benign_fpr(*digits, clients=5, queries_per_client=300, seed=0, delta=0.99,
                        check_every=10)
    assert strict["fpr"] >= 0.8


def test_max_queries_caps_the_work(digits, monkeypatch):
    attack, classes = jbda_like(*digits)
    seen: list[int] = []
    observe = Prada.observe

    def counting(self, images, labels):
        seen.append(len(images))
        return observe(self, images, labels)

    monkeypatch.setattr(Prada, "observe", counting)
    assert queries_to_flag(attack, classes, max_queries=110) is None  # one short of a test
    assert sum(seen) == 110
    seen.clear()
    assert queries_to_flag(attack, classes, max_queries=111) == 111
    assert sum(seen) == 111
    seen.clear()
    # uncapped, it stops at the end of the batch in which it flagged
    assert queries_to_flag(attack, classes, batch_size=64) == 111
    assert sum(seen) == 128 < len(attack)


def test_benign_fpr_is_seeded_and_draws_distinct_images(digits, monkeypatch):
    kw = dict(clients=4, queries_per_client=150, seed=3, check_every=10)
    assert benign_fpr(*digits, **kw) == benign_fpr(*digits, **kw)

    # what each client sends: images that carry their own index in two pixels
    n = 1000
    tagged = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    tagged[:, 0, 0, 0], tagged[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    sent: list[torch.Tensor] = []

    def record(imgs, classes, **prada_kwargs):
        assert prada_kwargs == {"check_every": 10}
        index = imgs[:, 0, 0, 0].long() + 256 * imgs[:, 0, 0, 1].long()
        assert torch.equal(classes, index)  # each image's class travels with it
        sent.append(index)
        return None

    monkeypatch.setattr(detection, "queries_to_flag", record)
    got = benign_fpr(tagged, torch.arange(n), **kw)
    assert got == {"clients": 4, "flagged": 0, "fpr": 0.0, "queries_per_client": 150}
    first = list(sent)
    sent.clear()
    benign_fpr(tagged, torch.arange(n), **kw)
    assert all(torch.equal(a, b) for a, b in zip(first, sent, strict=True))
    sent.clear()
    benign_fpr(tagged, torch.arange(n), **{**kw, "seed": 4})
    assert not any(torch.equal(a, b) for a, b in zip(first, sent, strict=True))
    for client in first:
        assert len(client) == 150 and len(torch.unique(client)) == 150  # no repeats
        assert not torch.equal(client, torch.sort(client).values)  # random order
    assert not torch.equal(first[0], first[1])  # each client its own draw


@pytest.mark.parametrize("split", [1, 37, 200, 299])
def test_stream_order_not_batching_decides_the_state(split):
    images, classes = mixed_stream()
    whole = Prada(delta=0.9, min_distances=30)
    whole.observe(images, classes)
    parts = Prada(delta=0.9, min_distances=30)
    parts.observe(images[:split], classes[:split])
    parts.observe(images[split:], classes[split:])
    assert whole.flagged_at is not None
    assert_same_state(whole.state(), parts.state())
    ones = Prada(delta=0.9, min_distances=30)
    for i in range(len(images)):
        ones.observe(images[i:i + 1], classes[i:i + 1])
    assert_same_state(whole.state(), ones.state())


def test_rejects_bad_input_and_reports_its_parameters():
    det = Prada()
    with pytest.raises(ValueError, match="uint8"):
        det.observe(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        det.observe(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    det.observe(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="values"):
        det.observe(torch.zeros(1, 3, 5, 5, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="delta"):
        Prada(delta=0.0)
    spec = Prada(delta=0.8, min_distances=50, check_every=5).spec()
    assert json.loads(json.dumps(spec)) == spec
    assert (spec["delta"], spec["min_distances"], spec["check_every"]) == (0.8, 50, 5)


def test_identical_queries_are_not_testable():
    # D all zeros has no shape: W counts as 1, as scipy's shapiro would return
    det = Prada(min_distances=10)
    det.observe(torch.full((50, 3, 2, 2), 7, dtype=torch.uint8), torch.zeros(50, dtype=torch.long))
    assert det.flagged_at is None and det.last_w == 1.0 and det.tests == 40


def test_detection_report_combines_both_sides(digits):
    attack, classes = jbda_like(*digits, rounds=4)
    report = detection_report(attack, classes, *digits, clients=2, queries_per_client=150,
                              seed=0, check_every=10)
    assert json.loads(json.dumps(report)) == report
    assert report["attack"] == {"queries": len(attack), "flagged_at": 120, "detected": True}
    assert report["benign"]["clients"] == 2 and report["detector"]["check_every"] == 10
