"""Stage-1 soft-label strategies: random erasing and SPSG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mextract import augment as augment_mod
from mextract.api import VictimAPI
from mextract.attacks import random_erasing, registry, spsg
from mextract.attacks.base import AttackContext, cache_inputs
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.metrics import evaluator, predict
from mextract.models import build_model
from mextract.queries import collect
from mextract.train import TrainConfig

CPU = Compute(device="cpu", amp=False, channels_last=False)


class Smooth(nn.Module):
    """A small differentiable classifier (smooth activations, random weights)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(4),
            nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * self.net(x)


@pytest.fixture(scope="module")
def digits() -> dict:
    data = load_digits()
    split = make_split(len(data["x_train"]), seed=0)
    # a slice of the pool and of the test set keeps every training run to seconds
    return {**data, "pool": data["x_train"][split["pool"]][:160],
            "x_test": data["x_test"][:120], "y_test": data["y_test"][:120]}


@pytest.fixture(scope="module")
def victim() -> nn.Module:
    """An untrained tiny victim: these tests check queries and plumbing, not accuracy."""
    torch.manual_seed(0)
    return build_model("vgg11", 10, 0.125).eval()


def make_ctx(digits: dict, victim: nn.Module, workdir: Path, **kwargs) -> AttackContext:
    victim_pred = predict(victim, digits["x_test"], CPU)
    return AttackContext(
        pool=digits["pool"], num_classes=10,
        new_substitute=lambda: build_model("vgg11", 10, 0.125),
        train_cfg=TrainConfig(epochs=1, batch_size=32, lr=0.05), compute=CPU,
        evaluate=evaluator(digits["x_test"], digits["y_test"], victim_pred, CPU),
        workdir=workdir, **kwargs)


def params(name: str, **overrides) -> dict:
    return {**registry.get(name).defaults, **overrides}


# ------------------------------------------------------------------- random erasing
class ForbiddenAPI(VictimAPI):
    def query(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - must not run
        raise AssertionError("random erasing queried the API during training")


def test_random_erasing_never_sends_erased_images(digits, victim, tmp_path, monkeypatch):
    api = VictimAPI(victim, "soft", compute=CPU)
    cache = collect(api, digits["pool"], "pool")
    # every image the victim answered is an untouched pool image
    assert torch.equal(cache_inputs(make_ctx(digits, victim, tmp_path), cache), digits["pool"])
    erased: list[float] = []

    def spy(x, gen, **kw):
        out = augment_mod.random_erasing(x, gen, **kw)
        erased.append((out != x).flatten(1).any(1).float().mean().item())
        return out

    monkeypatch.setattr(random_erasing, "random_erasing", spy)
    ctx = make_ctx(digits, victim, tmp_path, cache=cache,
                   api=ForbiddenAPI(victim, "soft", compute=CPU))
    result = random_erasing.run(ctx, params("random_erasing"))
    assert erased, "training never applied random erasing"
    # p = 0.5: about half of each batch is erased, never all of it
    assert 0.2 < sum(erased) / len(erased) < 0.8
    assert result.queries == cache["count"] == api.queries == len(digits["pool"])
    assert {"queries", "test_accuracy", "fidelity"} <= set(result.history[-1])


def test_random_erasing_rejects_inverted_scale(digits, victim, tmp_path):
    ctx = make_ctx(digits, victim, tmp_path)
    with pytest.raises(ValueError, match="scale_min"):
        random_erasing.erasing_augment(ctx, 0.5, (0.4, 0.1))


# ----------------------------------------------------------------------------- SPSG
def test_spsg_gradient_estimate_matches_true_pooled_gradient(digits):
    model = Smooth().eval()
    api = VictimAPI(model, "soft", compute=CPU)
    images = digits["pool"][:6]
    seg = spsg.superpixels(images, 16, 10.0)
    counts = spsg.segment_counts(seg)
    assert counts.min() >= 4
    eps, temp = 0.1, 3.0
    p_base, p_pert = spsg.ask(api, images, seg, eps)
    assert api.queries == int((1 + counts).sum())
    k_max = p_pert.shape[1]
    _, sign = spsg.perturb(images, seg, eps, k_max)
    est = spsg.estimate_gradients(p_base, p_pert, sign, counts, eps, temp)

    # true gradient of softmax(z / T), summed over each superpixel's pixels and channels
    x = (images.float() / 255).requires_grad_(True)
    q = torch.softmax(model(x) / temp, 1)
    masks = nn.functional.one_hot(seg.long(), k_max).permute(0, 3, 1, 2).float()
    true = torch.stack([
        torch.einsum("nchw,nkhw->nk", torch.autograd.grad(q[:, c].sum(), x,
                                                          retain_graph=True)[0], masks)
        for c in range(q.shape[1])], dim=2)
    cos = nn.functional.cosine_similarity(est.flatten(1), true.flatten(1), dim=1)
    assert cos.min() > 0.5, cos
    pure = spsg.purify(est, 0.1)
    assert pure.abs().amax((1, 2)).allclose(torch.ones(len(images)))
    assert nn.functional.cosine_similarity(pure.flatten(1), true.flatten(1), dim=1).min() > 0.5


def test_spsg_gradient_loss_is_low_for_the_victim_itself(digits):
    """The substitute-side pooled gradient uses the same perturbations: a substitute
    equal to the victim scores a far lower gradient loss than an unrelated model."""
    model = Smooth().eval()
    api = VictimAPI(model, "soft", compute=CPU)
    images = digits["pool"][:8]
    seg = spsg.superpixels(images, 16, 10.0)
    counts = spsg.segment_counts(seg)
    p_base, p_pert = spsg.ask(api, images, seg, 0.1)
    _, sign = spsg.perturb(images, seg, 0.1, p_pert.shape[1])
    target = spsg.purify(spsg.estimate_gradients(p_base, p_pert, sign, counts, 0.1, 3.0), 0.1)
    gen = torch.Generator().manual_seed(0)
    same = spsg.gradient_loss(model, images, seg, target, 0.1, 3.0, gen)
    other = spsg.gradient_loss(build_model("vgg11", 10, 0.125).eval(), images, seg, target,
                               0.1, 3.0, torch.Generator().manual_seed(0))
    assert same.item() < 0.3 < other.item()
    other.backward()  # differentiable in the substitute's parameters


def test_spsg_runs_within_budget_and_reuses_its_log(digits, victim, tmp_path):
    budget = 150
    api = VictimAPI(victim, "soft", budget=budget, compute=CPU)
    ctx = make_ctx(digits, victim, tmp_path, api=api)
    p = params("spsg", budget=budget, rounds=2)
    result = spsg.run(ctx, p)
    assert 0 < result.queries == api.queries <= budget
    assert result.queries == budget  # what probes leave over buys plain base images
    log = result.query_log
    assert log is not None and (tmp_path / "query_log.pt").exists()
    assert log["count"] == api.queries
    assert api.queries == int((1 + spsg.probe_counts(log["segments"], log["probed"])).sum())
    assert torch.equal(log["images"], digits["pool"][log["indices"]])
    rows = result.history
    assert rows[0]["round"] == 1 and rows[-1]["round"] == 2
    assert all({"queries", "test_accuracy", "fidelity"} <= set(r) for r in rows)
    assert rows[0]["queries"] < rows[-1]["queries"] == result.queries

    # a rerun with the same parameters answers from the log, never calling the API
    fresh = VictimAPI(victim, "soft", budget=0, compute=CPU)
    again = spsg.run(make_ctx(digits, victim, tmp_path, api=fresh), p)
    assert fresh.queries == 0 and again.extra["queries_from_log"]
    assert again.queries == result.queries


def test_spsg_splits_its_budget_between_probes_and_plain_images(digits, victim, tmp_path):
    """probe_share of the budget buys probed base images (1 + K queries each), the rest
    plain base images (1 query each); plain images carry no gradient target."""
    budget, share = 200, 0.3
    api = VictimAPI(victim, "soft", budget=budget, compute=CPU)
    ctx = make_ctx(digits, victim, tmp_path, api=api)
    log = spsg.collect(ctx, params("spsg", budget=budget, rounds=2, probe_share=share))
    probed = log["probed"]
    cost = 1 + spsg.probe_counts(log["segments"], probed)
    assert int(cost.sum()) == api.queries == budget
    probe_queries = int(cost[probed].sum())
    assert 0 < probe_queries <= share * budget  # the probes' share is never exceeded
    assert share * budget - probe_queries < 2 * (1 + 16)  # one image per slice at most
    assert int((~probed).sum()) == budget - probe_queries  # the rest: one query each
    assert not log["perturbed_answers"][~probed].any()
    inputs, batch = spsg.training_set(log, 2, params("spsg", probe_share=share))
    assert len(inputs) == api.queries  # every answer is a KD example
    has_target = batch["target"].flatten(1).abs().sum(1) > 0
    assert not has_target[:len(probed)][~probed].any()
    assert has_target[:len(probed)][probed].float().mean() > 0.5
    assert len(torch.unique(log["indices"])) == len(log["indices"])  # distinct images
