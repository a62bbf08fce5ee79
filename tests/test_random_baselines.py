"""The equal-budget random baselines: ``random`` (uniform pool images, soft or hard
answers) and ``random_boundary`` (boundary probing's pairs and budget, random points)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyVictim, record_queries

from mextract.api import QueryBudgetExceeded, VictimAPI
from mextract.attacks import boundary, random_boundary, random_queries, registry
from mextract.attacks.base import AttackContext
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.experiment import run_experiment
from mextract.metrics import evaluator, predict
from mextract.models import build_model
from mextract.queries import collect
from mextract.train import TrainConfig

CPU = Compute(device="cpu", amp=False, channels_last=False)
POOL, TEST = 64, 60
SUBSTITUTE = {"arch": "vgg11", "width": 0.125}
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.05}

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    data = load_digits()
    data = {**data, "x_test": data["x_test"][:TEST], "y_test": data["y_test"][:TEST]}
    split = make_split(len(data["y_train"]), 0.5, seed=0)
    split["pool"] = split["pool"][:POOL]
    victim = TinyVictim().eval()
    return {"data": data, "split": split, "pool": data["x_train"][split["pool"]],
            "victim": victim, "victim_pred": predict(victim, data["x_test"], CPU)}


def context(env: dict[str, Any], workdir: Path, api: VictimAPI,
            cache: dict[str, Any] | None = None, seed: int = 0) -> AttackContext:
    data = env["data"]
    return AttackContext(
        pool=env["pool"], num_classes=10,
        new_substitute=lambda: build_model("vgg11", 10, 0.125),
        train_cfg=TrainConfig.from_dict(TRAIN), compute=CPU,
        evaluate=evaluator(data["x_test"], data["y_test"], env["victim_pred"], CPU),
        seed=seed, cache=cache, api=api, workdir=workdir)


def experiment(env: dict[str, Any], strategy: str, params: dict[str, Any], workdir: Path,
               api_cfg: dict[str, Any], cache: dict[str, Any] | None = None
               ) -> tuple[Any, dict[str, Any]]:
    return run_experiment(strategy=strategy, params=params, data=env["data"],
                          split=env["split"], victim_test_pred=env["victim_pred"],
                          substitute=SUBSTITUTE, train_cfg=TRAIN, compute=CPU, seed=0,
                          workdir=workdir, cache=cache, victim=env["victim"], api_cfg=api_cfg)


def check_history(history: list[dict[str, Any]], queries: int) -> None:
    assert history
    for row in history:
        assert row["queries"] == queries
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["fidelity"] <= 1.0


# ----------------------------------------------------------------------- random
@pytest.mark.parametrize("mode", ["soft", "hard", "honey"])
def test_random_follows_the_apis_answers_and_counts_exactly(env, tmp_path, mode):
    """registry answers="any": the experiment runner accepts a soft or a hard API."""
    assert registry.get("random").answers == "any"
    budget = 20
    result, metrics = experiment(env, "random", {"budget": budget}, tmp_path, {"mode": mode})
    assert result.queries == metrics["queries"] == budget == result.query_log["count"]
    assert metrics["answers"] == ("soft" if mode == "soft" else "hard")
    answers = result.query_log["answers"]
    if mode == "soft":
        assert answers.dtype == torch.float32 and answers.shape == (budget, 10)
        torch.testing.assert_close(answers.sum(1), torch.ones(budget))
    else:
        assert answers.dtype == torch.int64 and answers.shape == (budget,)
    check_history(result.history, budget)


def test_random_draws_distinct_uniform_pool_images(env, tmp_path, capsys):
    api = VictimAPI(env["victim"], "hard", compute=CPU)
    asked = record_queries(api)
    params = {**registry.get("random").defaults, "budget": 40}
    result = random_queries.run(context(env, tmp_path, api), params)
    idx = result.query_log["indices"]
    assert len(idx) == 40 and len(torch.unique(idx)) == 40
    assert torch.equal(torch.cat(asked), env["pool"][idx])  # the images sent
    assert result.queries == api.queries == 40
    # seeded by the experiment's seed; another seed draws other images
    assert torch.equal(idx, random_queries.draw(POOL, 40, 0))
    assert not torch.equal(random_queries.draw(POOL, 40, 1), idx)
    # uniform: every pool image is drawn about equally often over many seeds
    hits = torch.bincount(torch.cat([random_queries.draw(POOL, 16, s) for s in range(400)]),
                          minlength=POOL).float()
    assert hits.min() > 0.5 * hits.mean() and hits.max() < 1.5 * hits.mean()
    # a budget beyond the pool: every pool image once, with a warning in the job's log
    # and the budget asked for in the metrics (as the selection strategies it matches)
    big = random_queries.run(context(env, tmp_path / "big", VictimAPI(env["victim"], "soft",
                                                                      compute=CPU)),
                             {**params, "budget": POOL + 1})
    assert big.queries == POOL and big.extra["budget_requested"] == POOL + 1
    assert f"params.budget = {POOL + 1} exceeds the attacker pool of {POOL}" in \
        capsys.readouterr().err


def test_random_never_exceeds_its_budget(env, tmp_path):
    params = {**registry.get("random").defaults, "budget": 25}
    exact = VictimAPI(env["victim"], "soft", budget=25, compute=CPU)
    assert random_queries.run(context(env, tmp_path / "a", exact), params).queries == 25
    short = VictimAPI(env["victim"], "soft", budget=24, compute=CPU)
    with pytest.raises(QueryBudgetExceeded, match="budget of 24"):
        random_queries.run(context(env, tmp_path / "b", short), params)
    assert short.queries == 0


# -------------------------------------------------------------- random_boundary
@pytest.fixture(scope="module")
def cache(env) -> dict[str, Any]:
    return collect(VictimAPI(env["victim"], "hard", compute=CPU), env["pool"], "pool")


def test_random_boundary_asks_random_points_on_boundarys_pairs(env, tmp_path, cache):
    pairs, steps = 8, 4
    params = {**registry.get("random_boundary").defaults, "pairs": pairs, "steps": steps,
              "pair_seed": 3}
    api = VictimAPI(env["victim"], "hard", compute=CPU)
    asked = record_queries(api)
    result = random_boundary.run(context(env, tmp_path / "rb", api, cache), params)
    log = result.query_log
    assert [len(a) for a in asked] == [pairs] * steps  # one batched call per step, as boundary asks
    assert api.queries == log["count"] == pairs * steps
    assert result.queries == cache["count"] + pairs * steps

    # the same pairs boundary probing draws (and the pairs of an actual boundary run)
    labels = cache["answers"].long()
    assert torch.equal(log["pairs"], boundary.sample_pairs(labels, pairs, 3))
    b_api = VictimAPI(env["victim"], "hard", compute=CPU)
    b_params = {k: params[k] for k in ("pairs", "steps", "pair_seed")}
    probed = boundary.run(context(env, tmp_path / "b", b_api, cache), b_params)
    assert torch.equal(probed.query_log["pairs"], log["pairs"])
    assert b_api.queries == api.queries  # the same budget

    # the points: t ~ U(0, 1) per pair and step, on the segments, answered by the API
    t = log["t"]
    assert t.shape == (steps, pairs) and bool(((t > 0) & (t < 1)).all())
    assert len(torch.unique(t)) == t.numel()  # no search: independent draws
    xa, xb = env["pool"][log["pairs"][:, 0]], env["pool"][log["pairs"][:, 1]]
    expected = torch.cat([boundary.interpolate(xa, xb, t[s]) for s in range(steps)])
    assert torch.equal(log["images"], expected)
    assert torch.equal(VictimAPI(env["victim"], "hard", compute=CPU).query(log["images"]),
                       log["labels"])
    check_history(result.history, result.queries)


def test_random_boundary_budget_and_experiment_count(env, tmp_path, cache):
    params = {**registry.get("random_boundary").defaults, "pairs": 5, "steps": 3}
    exact = VictimAPI(env["victim"], "hard", budget=15, compute=CPU)
    result = random_boundary.run(context(env, tmp_path / "a", exact, cache), params)
    assert exact.queries == 15 and result.queries == cache["count"] + 15
    short = VictimAPI(env["victim"], "hard", budget=14, compute=CPU)
    with pytest.raises(ValueError, match="budget"):
        random_boundary.run(context(env, tmp_path / "b", short, cache), params)
    assert short.queries == 0
    # the experiment runner: the API's budget is pairs x steps, the count checked
    res, metrics = experiment(env, "random_boundary", {"pairs": 5, "steps": 3},
                              tmp_path / "c", {"mode": "hard"}, cache)
    assert res.queries == metrics["queries"] == cache["count"] + 15
    assert metrics["random_points"] == 15
    # it needs hard labels
    with pytest.raises(ValueError, match="hard"):
        experiment(env, "random_boundary", {"pairs": 5, "steps": 3}, tmp_path / "d",
                   {"mode": "soft"}, cache)


def test_experiment_replays_the_log_with_its_watermark_evidence(env, tmp_path):
    """A rerun reuses the log: the API is asked nothing, the count is checked against
    the replayed log, and the defender's DAWN evidence is that of the job that asked."""
    from mextract.io import load_artifact

    api_cfg = {"mode": "hard", "defences": [{"type": "dawn", "key": "k3y", "rate": 0.2}]}
    first, m1 = experiment(env, "random", {"budget": 20}, tmp_path, api_cfg)
    wm1 = load_artifact(tmp_path / "watermark.pt")
    assert m1["queries"] == 20 and not m1["queries_from_log"]
    assert wm1["seen"] == 20 and len(wm1["labels"]) > 0
    again, m2 = experiment(env, "random", {"budget": 20}, tmp_path, api_cfg)
    wm2 = load_artifact(tmp_path / "watermark.pt")
    assert m2["queries"] == 20 and m2["queries_from_log"] and m2["replayed_queries"] == 20
    assert wm2["seen"] == 20 and torch.equal(wm2["images"], wm1["images"])
