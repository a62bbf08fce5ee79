"""Adaptive pool-based selection: MARICH (soft) and hard-label active learning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mextract.api import VictimAPI
from mextract.attacks import registry, selection
from mextract.attacks.base import AttackContext
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.experiment import run_experiment
from mextract.metrics import evaluator, predict
from mextract.models import build_model, feature_extractor
from mextract.train import TrainConfig

CPU = Compute("cpu", amp=False)


def sharp(model: torch.nn.Module, scale: float = 20.0) -> torch.nn.Module:
    """A randomly initialised model whose outputs differ between images: scaling the
    last layer spreads the softmax (an untrained net is near-uniform everywhere)."""
    _, head = feature_extractor(model)
    with torch.no_grad():
        head.weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> dict:
    data = load_digits()
    split = make_split(len(data["x_train"]))
    return {**data, "pool": data["x_train"][split["pool"]], "split": split}


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    torch.manual_seed(1)
    return sharp(build_model("vgg11", 10, 0.125))


def test_round_sizes_spend_the_budget():
    assert selection.round_sizes(300, 50, 4) == [50, 63, 63, 62, 62]
    assert sum(selection.round_sizes(4785, 500, 8)) == 4785
    assert selection.round_sizes(10, 8, 5) == [8, 1, 1]
    assert selection.round_sizes(5, 50, 3) == [5]


def test_round_robin_nearest_takes_each_anchors_nearest_in_turn():
    # anchor 0 is nearest to 2 then 0; anchor 1 nearest to 2 then 3
    dist = np.array([[1.0, 5.0, 0.0, 9.0], [7.0, 8.0, 0.0, 1.0]])
    assert selection.round_robin_nearest(dist, 1).tolist() == [2]
    assert selection.round_robin_nearest(dist, 3).tolist() == [2, 0, 3]
    assert selection.round_robin_nearest(dist, 10).tolist() == [2, 0, 3, 1]


@pytest.mark.parametrize("kind", ["badge", "entropy"])
def test_gradient_embedding_matches_autograd(kind):
    torch.manual_seed(0)
    model = sharp(build_model("vgg11", 10, 0.125), 5.0)
    body, head = feature_extractor(model)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = body(x)
        probs = torch.softmax(head(feats), 1)
    closed = (selection.badge_embedding(probs, feats) if kind == "badge"
              else selection.entropy_gradient_embedding(probs, feats))
    for i in range(len(x)):
        head.zero_grad()
        z = head(feats[i:i + 1])
        if kind == "badge":
            loss = F.cross_entropy(z, z.argmax(1))
        else:
            p = torch.softmax(z, 1)
            loss = -(p * p.log()).sum()
        loss.backward()
        assert torch.allclose(closed[i], head.weight.grad.flatten(), atol=1e-5, rtol=1e-4)
        assert closed[i].abs().sum() > 0


def test_marich_first_selection_has_higher_entropy_than_random(digits, victim):
    pool = digits["pool"]
    torch.manual_seed(0)
    sub = sharp(build_model("vgg11", 10, 0.125), 10.0)
    queried = torch.arange(40)
    answers = VictimAPI(victim, "soft", compute=CPU).query(pool[queried])
    cand = torch.arange(40, len(pool))
    probs, feats = selection.substitute_outputs(sub, pool[cand], CPU)
    state = selection.RoundState(sub, pool, cand, probs, feats, queried, answers, CPU, 0)
    k = 60
    picked = selection.marich_select(state, k, gamma1=0.8, gamma2=0.8, clusters=10,
                                     embed_dim=16)
    assert len(torch.unique(picked)) == k
    assert not np.isin(picked.numpy(), queried.numpy()).any()
    ent = selection.entropy(probs)
    chosen = ent[torch.searchsorted(cand, picked)].mean()
    rand = ent[torch.randperm(len(cand), generator=torch.Generator().manual_seed(0))[:k]].mean()
    assert chosen > rand


def _context(digits: dict, victim: torch.nn.Module, mode: str, budget: int,
             workdir: Path) -> AttackContext:
    """A context as run_experiment builds it, with a fresh API (counter at 0)."""
    vpred = predict(victim, digits["x_test"], CPU)
    return AttackContext(
        pool=digits["pool"], num_classes=10,
        new_substitute=lambda: build_model("vgg11", 10, 0.125),
        train_cfg=TrainConfig(epochs=1, batch_size=64, lr=0.05), compute=CPU,
        evaluate=evaluator(digits["x_test"], digits["y_test"], vpred, CPU), seed=0,
        api=VictimAPI(victim, mode, budget=budget, compute=CPU), workdir=workdir,
    )


@pytest.mark.parametrize("strategy,mode", [("marich", "soft"), ("active_learning", "hard")])
def test_strategy_runs_within_budget_and_reuses_its_query_log(digits, victim, tmp_path,
                                                              monkeypatch, strategy, mode):
    params = {"budget": 90, "initial": 30, "rounds": 2, "round_epochs": 1, "embed_dim": 8,
              "candidates": 0 if strategy == "marich" else 400}
    kwargs = dict(strategy=strategy, params=params, data=digits, split=digits["split"],
                  victim_test_pred=predict(victim, digits["x_test"], CPU),
                  substitute={"arch": "vgg11", "width": 0.125},
                  train_cfg={"epochs": 1, "batch_size": 64, "lr": 0.05}, compute=CPU, seed=0,
                  workdir=tmp_path, victim=victim, api_cfg={"mode": mode})
    calls = []
    query = VictimAPI.query

    def counted(self: VictimAPI, images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return query(self, images)

    monkeypatch.setattr(VictimAPI, "query", counted)
    result, metrics = run_experiment(**kwargs)
    assert result.queries == metrics["queries"] == sum(calls) == 90
    assert calls == [30, 30, 30]
    log = result.query_log
    assert log["count"] == 90 and log["complete"]
    assert len(torch.unique(log["indices"])) == 90
    rounds = [r for r in result.history if r["phase"] == "round"]
    assert [r["queries"] for r in rounds] == [30, 60]
    assert all("fidelity" in r and "test_accuracy" in r for r in rounds)
    assert (tmp_path / "query_log.pt").exists()

    # the same experiment again: the complete log is reused, the API is never called
    calls.clear()
    again, metrics = run_experiment(**kwargs)
    assert calls == []
    assert again.queries == metrics["queries"] == 90
    assert again.extra["queries_from_log"] and again.extra["logged_queries"] == 90
    assert torch.equal(again.query_log["indices"], log["indices"])

    # other parameters, another victim: the log is not reused
    full = {**registry.get(strategy).defaults, **params}
    ctx = _context(digits, victim, mode, 90, tmp_path)
    round_cfg = TrainConfig(**log["key"]["depends"]["round_cfg"])

    def reusable(p: dict) -> bool:
        return selection.round_log_store(ctx, strategy, p, round_cfg).reuse() is not None

    assert reusable(full)
    for change in ({"budget": 80}, {"initial": 20}):
        assert not reusable({**full, **change})
    torch.manual_seed(2)
    ctx.api = VictimAPI(sharp(build_model("vgg11", 10, 0.125)), mode, compute=CPU)
    assert not reusable(full)
