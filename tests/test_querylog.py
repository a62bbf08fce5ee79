"""The one query-log store (mextract.querylog) of every strategy that asks the live API:
a log is reused only for the same strategy, parameters, seed, pool, dependencies and
API fingerprint (victim weights, mode, every defence setting); partial logs resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyVictim
from torch import nn

from mextract.api import QueryBudgetExceeded, VictimAPI
from mextract.attacks import registry
from mextract.attacks.base import AttackContext, AttackResult
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.defences import DawnWatermark, HoneyLabels
from mextract.io import checksum_path, load_artifact
from mextract.metrics import evaluator, predict
from mextract.models import build_model
from mextract.queries import collect
from mextract.querylog import LOG_NAME, QueryLogStore
from mextract.train import TrainConfig

CPU = Compute(device="cpu", amp=False, channels_last=False)
KEY, OTHER_KEY = "owner secret 7f3a", "another secret 91c2"
POOL, TEST = 64, 60

#: mode of the API each strategy is tested with, and small parameters
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "marich": ("soft", {"budget": 24, "initial": 12, "rounds": 1, "round_epochs": 1,
                        "clusters": 3, "embed_dim": 4}),
    "active_learning": ("hard", {"budget": 24, "initial": 12, "rounds": 1, "round_epochs": 1,
                                 "shortlist": 2.0, "embed_dim": 4, "candidates": 0}),
    "spsg": ("soft", {"budget": 30, "rounds": 1}),
    "boundary": ("hard", {"pairs": 6, "steps": 3}),
    "random": ("hard", {"budget": 20}),
    "random_boundary": ("hard", {"pairs": 6, "steps": 3}),
    "knockoff": ("hard", {"budget": 20}),
    "knockoff_adaptive": ("soft", {"budget": 20, "arms": 3, "step_size": 5, "window": 10}),
    "jbda": ("hard", {"budget": 20, "seed_size": 6, "round_epochs": 1}),
    "dfme": ("soft", {"budget": 60, "batch_size": 4, "d_iter": 2, "nz": 8, "ngf": 4}),
}

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    data = load_digits()
    split = make_split(len(data["y_train"]), 0.5, seed=0)
    victim = TinyVictim().eval()
    x_test, y_test = data["x_test"][:TEST], data["y_test"][:TEST]
    return {"pool": data["x_train"][split["pool"]][:POOL], "x_test": x_test,
            "y_test": y_test, "victim": victim,
            "victim_pred": predict(victim, x_test, CPU)}


def make_api(victim: nn.Module, mode: str, key: str = KEY,
             budget: int | None = None) -> VictimAPI:
    """Soft APIs take no layers; hard ones get honey labels and a DAWN watermark."""
    layers = [] if mode == "soft" else [HoneyLabels(1.5), DawnWatermark(key, rate=0.2)]
    return VictimAPI(victim, mode, budget=budget, defences=layers, compute=CPU)


def context(env: dict[str, Any], workdir: Path, api: VictimAPI,
            cache: dict[str, Any] | None = None) -> AttackContext:
    return AttackContext(
        pool=env["pool"], num_classes=10,
        new_substitute=lambda: build_model("vgg11", 10, 0.125),
        train_cfg=TrainConfig(epochs=1, batch_size=32, lr=0.05), compute=CPU,
        evaluate=evaluator(env["x_test"], env["y_test"], env["victim_pred"], CPU),
        seed=0, cache=cache, api=api, workdir=workdir)


def perturbed(victim: nn.Module) -> nn.Module:
    """The victim after a (tiny) retraining step: one weight moved by 1e-3."""
    out = copy.deepcopy(victim)
    with torch.no_grad():
        next(out.parameters()).view(-1)[0] += 1e-3
    return out


@pytest.mark.parametrize("strategy", list(CASES))
def test_log_is_reused_only_for_the_same_victim_and_defences(env, tmp_path, strategy):
    mode, small = CASES[strategy]
    params = {**registry.get(strategy).defaults, **small}
    # boundary and random_boundary train on the shared pool cache as well: one cache,
    # answered once, so that only the live API changes below
    cache = (collect(make_api(env["victim"], "hard"), env["pool"], "pool")
             if registry.get(strategy).cache else None)
    cached = cache["count"] if cache else 0
    run = registry.load(strategy).run

    def attack(victim: nn.Module, key: str = KEY) -> tuple[VictimAPI, AttackResult]:
        api = make_api(victim, mode, key)
        return api, run(context(env, tmp_path, api, cache), params)

    def assert_key_not_in_log() -> None:
        raw = (tmp_path / LOG_NAME).read_bytes() + checksum_path(tmp_path / LOG_NAME).read_bytes()
        for secret in (KEY, OTHER_KEY):
            assert secret.encode() not in raw

    api, first = attack(env["victim"])
    asked = api.queries
    assert asked > 0 and first.queries == cached + asked == cached + first.query_log["count"]
    assert not first.extra["queries_from_log"] and first.query_log["complete"]
    assert_key_not_in_log()

    # (a) nothing changed: the API is asked nothing, the same count is reported
    api, again = attack(env["victim"])
    assert api.queries == 0 and again.extra["queries_from_log"]
    assert again.queries == first.queries and again.extra["replayed_queries"] == asked

    if mode == "hard":
        # (c) the defender's DAWN key changed: same victim, another API -> asked again
        api, rekeyed = attack(env["victim"], OTHER_KEY)
        assert api.queries == asked and not rekeyed.extra["queries_from_log"]
        assert rekeyed.queries == first.queries
        assert_key_not_in_log()
        assert rekeyed.query_log["watermark"]["key_id"] != first.query_log["watermark"]["key_id"]

    # (b) the victim was retrained (weights perturbed): asked again
    api, retrained = attack(perturbed(env["victim"]), OTHER_KEY if mode == "hard" else KEY)
    assert api.queries == asked and not retrained.extra["queries_from_log"]
    assert retrained.queries == first.queries


def test_partial_log_resumes_and_keeps_the_watermark_evidence(env, tmp_path):
    """A job killed after round 1 (here: by the API's budget) leaves a partial log; the
    rerun asks only the round left, reports the full count, and its watermark log
    covers every query of both jobs."""
    mode, small = CASES["active_learning"]
    params = {**registry.get("active_learning").defaults, **small,
              "budget": 30, "initial": 10, "rounds": 2}
    run = registry.load("active_learning").run
    killed = make_api(env["victim"], mode, budget=20)  # initial 10 + round 1: 10
    with pytest.raises(QueryBudgetExceeded):
        run(context(env, tmp_path, killed), params)
    partial = load_artifact(tmp_path / LOG_NAME)
    assert partial["complete"] is False and partial["count"] == 20
    assert partial["watermark"]["seen"] == 20

    api = make_api(env["victim"], mode)
    result = run(context(env, tmp_path, api), params)
    assert api.queries == 10 and result.queries == 30
    assert result.extra["replayed_queries"] == 20 and result.extra["resumed_log"]
    assert not result.extra["queries_from_log"]
    log = result.query_log
    assert log["complete"] and "resume" not in log
    assert torch.equal(log["indices"][:20], partial["indices"])
    assert len(torch.unique(log["indices"])) == 30
    assert log["watermark"]["seen"] == 30
    assert [r["queries"] for r in result.history if r["phase"] == "round"] == [10, 20]

    # a partial log of other parameters is not resumed
    store = QueryLogStore.for_context(context(env, tmp_path, make_api(env["victim"], mode)),
                                      "active_learning", {**params, "budget": 29})
    assert store.resume() is None and store.reuse() is None


def test_corrupt_or_missing_log_counts_as_absent(env, tmp_path):
    params = {**registry.get("random").defaults, "budget": 10}
    run = registry.load("random").run
    api = make_api(env["victim"], "soft")
    run(context(env, tmp_path, api), params)
    path = tmp_path / LOG_NAME
    path.write_bytes(path.read_bytes()[:100])  # truncated: its checksum fails
    api = make_api(env["victim"], "soft")
    again = run(context(env, tmp_path, api), params)
    assert api.queries == 10 and not again.extra["queries_from_log"]
    path.write_bytes(b"garbage")
    checksum_path(path).unlink()
    api = make_api(env["victim"], "soft")
    run(context(env, tmp_path, api), params)
    assert api.queries == 10
    path.unlink()
    api = make_api(env["victim"], "soft")
    run(context(env, tmp_path, api), params)
    assert api.queries == 10
