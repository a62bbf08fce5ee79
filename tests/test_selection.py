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


# one intra-op thread: two made the substitute's forward passes here 20x slower on the
# shared 2-core machine (measured: 0.5 s vs 0.02 s for 40 images)
pytestmark = pytest.mark.usefixtures("single_thread")


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


def reference_round_robin(dist: np.ndarray, k: int) -> list[int]:
    """round_robin_nearest by its definition, one column at a time."""
    order = np.argsort(dist, axis=1, kind="stable")
    chosen: list[int] = []
    for rank in range(dist.shape[1]):
        for row in order:
            if len(chosen) < k and int(row[rank]) not in chosen:
                chosen.append(int(row[rank]))
    return chosen


def test_round_robin_nearest_follows_its_definition_on_random_distances():
    # against the loop above, with ties (small integer distances) and more anchors than
    # candidates; fails when the argsort is read anchor-major (every pick from the
    # first anchor), when the distinct columns come out sorted instead of in selection
    # order, or when fewer than min(k, candidates) come back
    rng = np.random.default_rng(0)
    for anchors, n, k in [(3, 20, 7), (5, 12, 12), (4, 9, 30), (1, 15, 6), (7, 5, 3),
                          (6, 40, 40), (2, 30, 11)]:
        for dist in (rng.random((anchors, n)), rng.integers(0, 4, (anchors, n)) * 1.0):
            got = selection.round_robin_nearest(dist, k)
            assert got.dtype == np.int64
            assert got.tolist() == reference_round_robin(dist, k)
            assert len(set(got.tolist())) == len(got) == min(k, n)
    assert selection.round_robin_nearest(np.empty((0, 5)), 3).size == 0
    assert selection.round_robin_nearest(rng.random((2, 5)), 0).size == 0


@pytest.fixture(scope="module")
def substitute() -> torch.nn.Module:
    torch.manual_seed(0)
    return sharp(build_model("vgg11", 10, 0.125), 10.0)


def split_pool(n_pool: int, n_queried: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(queried, candidates): a random, unsorted set of asked pool indices and the
    sorted rest, as the round loop has them (so that a position in the candidates, a
    position in the queried images and a pool index are three different numbers)."""
    perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))
    return perm[:n_queried], perm[n_queried:].sort().values


GROUPS, MEMBERS = 6, 8


def grouped_state(digits: dict, model: torch.nn.Module) -> tuple[selection.RoundState,
                                                                   torch.Tensor]:
    """A round whose GROUPS x MEMBERS highest-entropy candidates form GROUPS tight groups
    of near-duplicates: within a group the same predicted class (the group's number),
    softmax and penultimate features up to 1e-3 noise; group 0 has the highest entropy,
    then group 1, ...; 200 further candidates have low entropy. Returns the state and
    each candidate's group (-1: not in a group), scattered over the candidates."""
    gen = torch.Generator().manual_seed(0)
    queried, cand = split_pool(len(digits["pool"]), 40)
    cand = cand[:GROUPS * MEMBERS + 200]
    n, dim = len(cand), 16
    group = torch.full((n,), -1)
    group[torch.randperm(n, generator=gen)[:GROUPS * MEMBERS]] = (
        torch.arange(GROUPS).repeat_interleave(MEMBERS))
    centres = torch.rand(GROUPS, dim, generator=gen) * 2
    logits = 8.0 * F.one_hot(torch.randint(10, (n,), generator=gen), 10)
    feats = torch.rand(n, dim, generator=gen) * 2
    for g in range(GROUPS):
        members = group == g
        logits[members] = (2.0 + 0.5 * g) * F.one_hot(torch.tensor(g), 10).float()
        feats[members] = centres[g]
    logits = logits + 1e-3 * torch.randn(n, 10, generator=gen)
    feats = feats + 1e-3 * torch.rand(n, dim, generator=gen)
    probs = torch.softmax(logits, 1)
    answers = VictimAPI(model, "soft", compute=CPU).query(digits["pool"][queried])
    state = selection.RoundState(model, digits["pool"], cand, probs, feats, queried,
                                 answers, CPU, 0)
    return state, group


def groups_of(state: selection.RoundState, group: torch.Tensor,
              picked: torch.Tensor) -> list[int]:
    return sorted(group[torch.searchsorted(state.candidates, picked)].tolist())


def test_gradient_kmeans_spreads_the_picks_over_groups_of_near_duplicates(digits,
                                                                          substitute):
    """Pure entropy sampling takes GROUPS copies of the top group; the k-means step on
    gradient embeddings (MARICH's EntropyGradientSampling, BADGE's k-means) takes one
    image of each group, i.e. of each predicted class (measured: exactly one per
    group for both). Fails when the k-means step is skipped (all picks from group 0),
    when its distance matrix is transposed, when the round robin takes one centroid's
    nearest images before the other centroids' or keeps a repeated column's last
    occurrence, or when the shortlist is the lowest-entropy candidates."""
    state, group = grouped_state(digits, substitute)
    top = state.candidates[selection.top_entropy(state.probs, GROUPS)]
    assert groups_of(state, group, top) == [0] * GROUPS  # the redundant baseline

    # MARICH, shortlist k / gamma1 = all 48 grouped candidates; gamma2 = 1: the loss
    # step keeps every image the gradient step chose
    picked = selection.marich_select(state, GROUPS, gamma1=1 / MEMBERS, gamma2=1.0,
                                     clusters=GROUPS, embed_dim=8)
    assert groups_of(state, group, picked) == list(range(GROUPS))
    # BADGE shortlist k x 8 = the same 48 candidates
    picked = selection.badge_kmeans_select(state, GROUPS, shortlist=MEMBERS, embed_dim=8)
    assert groups_of(state, group, picked) == list(range(GROUPS))
    pred = state.probs[torch.searchsorted(state.candidates, picked)].argmax(1)
    assert sorted(pred.tolist()) == list(range(GROUPS))


def test_marich_loss_sampling_takes_the_images_nearest_the_worst_answered_one(digits,
                                                                              substitute):
    """The substitute agrees with every answer but one (answers = its own softmax, loss
    <= 3e-8; one image answered with its least likely class, loss 4.80): with one
    cluster, LossSampling must keep the k shortlisted candidates nearest (input-space
    L2) to that image. Fails when the anchors are the lowest-loss images, when the
    loss ignores the answers (e.g. the substitute's entropy), when an anchor's
    position among the queried images is used as a pool index, when the distances
    are taken between other vectors than the two images, or when the picks leave the
    entropy shortlist."""
    pool = digits["pool"]
    queried, cand = split_pool(len(pool), 40, seed=1)
    probs, feats = selection.substitute_outputs(substitute, pool[cand], CPU)
    answers, _ = selection.substitute_outputs(substitute, pool[queried], CPU)
    worst = 17
    answers[worst] = F.one_hot(answers[worst].argmin(), 10).float()
    state = selection.RoundState(substitute, pool, cand, probs, feats, queried, answers,
                                 CPU, 0)
    k = 10
    # gamma1 = 1: the gradient step keeps the whole shortlist of k / gamma2 = 40
    picked = selection.marich_select(state, k, gamma1=1.0, gamma2=0.25, clusters=1,
                                     embed_dim=8)

    ent = -(probs * probs.log()).sum(1)
    shortlist = cand[ent.argsort(descending=True)[:40]]
    flat = pool.flatten(1).float() / 255
    dist = (flat[shortlist] - flat[queried[worst]]).norm(dim=1)
    expected = shortlist[dist.argsort()[:k]]
    assert sorted(picked.tolist()) == sorted(expected.tolist())
    # a rule of its own: the top-k entropy images are others (measured: 1 of 10 shared;
    # the picks lie at most 15.3 from the anchor, the shortlist's median is 17.7)
    assert int(torch.isin(picked, shortlist[:k]).sum()) < k // 2


@pytest.mark.parametrize("k", [1, 7, 40])
def test_selections_return_k_distinct_unasked_candidates(digits, victim, substitute, k):
    """Whatever k (also all the candidates, and shortlists longer than the candidates),
    both rules return k distinct candidates, never an asked image. Fails on duplicates
    from the round robin, on positions returned instead of pool indices, or on a round
    robin that stops after as many picks as anchors."""
    pool = digits["pool"]
    queried, cand = split_pool(len(pool), 60, seed=2)
    cand = cand[:40]
    probs, feats = selection.substitute_outputs(substitute, pool[cand], CPU)
    answers = VictimAPI(victim, "soft", compute=CPU).query(pool[queried])
    state = selection.RoundState(substitute, pool, cand, probs, feats, queried, answers,
                                 CPU, 0)
    for picked in (selection.marich_select(state, k, gamma1=0.8, gamma2=0.8, clusters=10,
                                           embed_dim=8),
                   selection.badge_kmeans_select(state, k, shortlist=4.0, embed_dim=8)):
        assert picked.dtype == torch.int64 and len(picked) == k
        assert len(torch.unique(picked)) == k
        assert bool(torch.isin(picked, cand).all())
        assert not bool(torch.isin(picked, queried).any())


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
    # each answer tagged with the step that asked it (0: the initial random batch)
    assert torch.equal(log["round"], torch.arange(3).repeat_interleave(30))
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
