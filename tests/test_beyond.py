"""Attacks from the literature beyond the study (KnockoffNets random and adaptive, JBDA
and JBDA-TR, DFME) and the attacker pools (split, ImageFolder tree, scikit-image
crops, noise): exact query counts against the API's counter, budgets never exceeded,
the Knockoff bandit's concentration, the pools' contracts and the config's checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TinyVictim, record_queries

from mextract import config
from mextract.api import QueryBudgetExceeded, VictimAPI
from mextract.attacks import dfme, jbda, knockoff, registry
from mextract.attacks.base import AttackContext
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.experiment import live_budget, run_experiment
from mextract.metrics import evaluator, predict
from mextract.models import build_model
from mextract.pools import build_pool
from mextract.querylog import LOG_NAME
from mextract.report import display_sections, results_table
from mextract.train import TrainConfig

CPU = Compute(device="cpu", amp=False, channels_last=False)
POOL, TEST = 96, 60
SUBSTITUTE = {"arch": "vgg11", "width": 0.125}
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.05}

#: small parameters of each new strategy, and the API mode it is tested with
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "knockoff": ("soft", {"budget": 30}),
    "knockoff_adaptive": ("soft", {"budget": 30, "arms": 4, "step_size": 8, "window": 10}),
    "jbda": ("hard", {"budget": 37, "seed_size": 8, "round_epochs": 1}),
    "dfme": ("soft", {"budget": 100, "batch_size": 4, "m": 2, "d_iter": 2, "nz": 8,
                      "ngf": 4}),
}

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
            pool: torch.Tensor | None = None) -> AttackContext:
    data = env["data"]
    return AttackContext(
        pool=env["pool"] if pool is None else pool, num_classes=10,
        new_substitute=lambda: build_model("vgg11", 10, 0.125),
        train_cfg=TrainConfig.from_dict(TRAIN), compute=CPU,
        evaluate=evaluator(data["x_test"], data["y_test"], env["victim_pred"], CPU),
        seed=0, api=api, workdir=workdir, augment="none")


def params_of(strategy: str, **changes: Any) -> dict[str, Any]:
    return {**registry.get(strategy).defaults, **CASES[strategy][1], **changes}


def expected_queries(strategy: str, params: dict[str, Any]) -> int:
    if strategy == "dfme":
        return dfme.planned(params["budget"], params["batch_size"], params["m"],
                            params["g_iter"], params["d_iter"])[1]
    return int(params["budget"])


# ------------------------------------------------------------------ query counts
@pytest.mark.parametrize("strategy", list(CASES))
def test_exact_query_count_within_the_budget_and_a_rerun_asks_nothing(env, tmp_path,
                                                                       strategy):
    mode, _ = CASES[strategy]
    params = params_of(strategy)
    budget = live_budget(params)
    assert budget == params["budget"]
    api = VictimAPI(env["victim"], mode, budget=budget, compute=CPU)
    asked = record_queries(api)
    result = registry.load(strategy).run(context(env, tmp_path, api), params)
    want = expected_queries(strategy, params)
    assert api.queries == want == result.queries == sum(len(a) for a in asked)
    assert api.queries <= budget
    assert result.query_log["complete"] and result.query_log["count"] == want
    # nothing changed: the log is reused, the API is asked nothing
    again_api = VictimAPI(env["victim"], mode, budget=budget, compute=CPU)
    again = registry.load(strategy).run(context(env, tmp_path, again_api), params)
    assert again_api.queries == 0 and again.queries == want
    assert again.extra["queries_from_log"]


def test_dfme_query_formula():
    # batch * (g_iter * (m + 1) + d_iter) per iteration, floor(budget / cost) iterations
    assert dfme.planned(1000, 10, 1, 1, 5) == (14, 14 * 70)
    assert dfme.planned(69, 10, 1, 1, 5) == (0, 0)
    assert dfme.planned(20_000_000, 256, 1, 1, 5) == (11160, 11160 * 1792)


@pytest.mark.parametrize("strategy", list(CASES))
def test_a_budget_too_small_for_the_strategy_is_refused_by_the_api(env, tmp_path, strategy):
    """The API enforces the budget: an API capped below what the strategy plans refuses
    the call that would pass it, so the strategy can never exceed its budget."""
    mode, _ = CASES[strategy]
    params = params_of(strategy)
    cap = expected_queries(strategy, params) - 1
    api = VictimAPI(env["victim"], mode, budget=cap, compute=CPU)
    with pytest.raises(QueryBudgetExceeded):
        registry.load(strategy).run(context(env, tmp_path, api), params)
    assert api.queries <= cap


def test_pool_based_budgets_larger_than_the_pool_are_refused_before_asking(env, tmp_path):
    for strategy in ("knockoff", "knockoff_adaptive"):
        api = VictimAPI(env["victim"], "soft", compute=CPU)
        with pytest.raises(ValueError, match="exceeds the pool"):
            registry.load(strategy).run(context(env, tmp_path, api),
                                        params_of(strategy, budget=POOL + 1))
        assert api.queries == 0


def test_jbda_grows_by_doubling_and_cuts_the_last_augmentation(env, tmp_path):
    for variant in ("jbda", "jbda_tr"):
        api = VictimAPI(env["victim"], "hard", compute=CPU)
        asked = record_queries(api)
        work = tmp_path / variant
        result = jbda.run(context(env, work, api), params_of("jbda", variant=variant))
        # seed 8, then 8, 16 (|S| = 32), then 5 of the 32 possible
        assert [len(a) for a in asked] == [8, 8, 16, 5]
        assert result.extra["round_sizes"] == [8, 8, 16, 5]
        images = result.query_log["images"]
        assert images.dtype == torch.uint8 and len(images) == 37
        # synthetic images are new points, one step of size lambda in every pixel
        # (where not clipped) away from an answered image
        seed = images[:8].float() / 255
        step = (images[8:16].float() / 255 - seed).abs()
        inside = (seed > 0.11) & (seed < 0.89)
        assert torch.allclose(step[inside], torch.full_like(step[inside], 0.1), atol=0.003)


def test_jbda_step_sign_alternates_with_tau():
    assert [jbda.step_size(0.1, 2, r) for r in range(5)] == [0.1, 0.1, -0.1, -0.1, 0.1]
    assert jbda.step_size(0.1, 0, 7) == 0.1


def test_jbda_moves_towards_the_class_and_jbda_tr_towards_another():
    """JBDA raises the substitute's probability of the oracle's label; JBDA-TR
    raises that of a random other class."""
    torch.manual_seed(0)
    model = build_model("vgg11", 10, 0.125).eval()
    x = (torch.rand(16, 3, 32, 32) * 200 + 28).to(torch.uint8)
    with torch.no_grad():
        p0 = torch.softmax(model(x.float() / 255), 1)
    y = p0.argmax(1)
    gen = torch.Generator().manual_seed(0)
    up = jbda.augment(model, x, y, 0.02, "jbda", CPU, gen)
    with torch.no_grad():
        p1 = torch.softmax(model(up.float() / 255), 1)
    assert (p1.gather(1, y[:, None]) > p0.gather(1, y[:, None])).float().mean() > 0.8
    other = jbda.augment(model, x, y, 0.02, "jbda_tr", CPU, torch.Generator().manual_seed(0))
    shift = torch.randint(1, 10, (16,), generator=torch.Generator().manual_seed(0))
    t = (y + shift) % 10
    with torch.no_grad():
        p2 = torch.softmax(model(other.float() / 255), 1)
    assert (p2.gather(1, t[:, None]) > p0.gather(1, t[:, None])).float().mean() > 0.8


# ------------------------------------------------------------------ the bandit
def test_gradient_bandit_concentrates_on_the_rewarding_arm():
    """A synthetic 5-armed problem: arm 3 pays 1, the others 0 (plus noise)."""
    bandit = knockoff.GradientBandit(5, lr=0.5, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        arms = torch.tensor([bandit.draw() for _ in range(10)])
        rewards = (arms == 3).double() + 0.1 * torch.randn(10, generator=gen, dtype=torch.float64)
        bandit.update(arms, rewards)
    pi = bandit.policy()
    assert pi.argmax() == 3 and pi[3] > 0.9
    # an arm without images left is never drawn
    available = torch.tensor([True, True, True, False, True])
    assert bandit.policy(available)[3] == 0
    assert all(bandit.draw(available) != 3 for _ in range(50))


class BrightCertain(torch.nn.Module):
    """A synthetic victim: certain of class 0 on bright images, uniform on dark ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.mean((1, 2, 3)) > 0.5).float()
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10) \
            * 12.0 * bright[:, None]


@pytest.mark.parametrize("lr", [3.0, 1e-9])
def test_knockoff_adaptive_bandit_concentrates_on_the_rewarding_arm(env, tmp_path, lr):
    """A pool of two arms, bright and dark images; the victim is certain on the bright
    ones only, so the certainty reward pays there. With a learning rate the bandit asks
    mostly bright images; with none it stays uniform."""
    gen = torch.Generator().manual_seed(0)
    bright = torch.randint(170, 256, (60, 3, 32, 32), generator=gen, dtype=torch.uint8)
    dark = torch.randint(0, 80, (60, 3, 32, 32), generator=gen, dtype=torch.uint8)
    pool = torch.cat([bright, dark])
    api = VictimAPI(BrightCertain(), "soft", compute=CPU)
    params = params_of("knockoff_adaptive", budget=60, arms=2, step_size=5, reward="cert",
                       bandit_lr=lr)
    result = knockoff.run(context(env, tmp_path, api, pool), params)
    share = float((result.query_log["indices"] < 60).float().mean())
    assert api.queries == 60
    if lr > 1:
        assert share > 0.8 and max(result.extra["arm_policy"]) > 0.95
    else:
        assert 0.35 < share < 0.65


def test_rewards_are_the_papers():
    y = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    pred = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    history = torch.tensor([[0.5, 0.5, 0.0]])
    r = knockoff.rewards(y, pred, history)
    assert torch.allclose(r["cert"], torch.tensor([0.5, 0.0]))
    assert torch.allclose(r["div"], torch.tensor([0.3, 0.2]))
    assert torch.allclose(r["loss"], -(y * pred.log()).sum(1))


# ------------------------------------------------------------------ DFME parts
def test_dfme_logits_and_gradient_estimate(env):
    p = torch.softmax(torch.tensor([[2.0, 0.0, -1.0]]), 1)
    assert torch.allclose(dfme.victim_logits(p), torch.tensor([[2.0, 0.0, -1.0]]) - 1 / 3,
                          atol=1e-5)
    # forward differences of D along random directions correlate with the true gradient
    # of a smooth disagreement (a linear student against the API's recovered logits)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x = torch.rand(2, 3, 32, 32) * 0.5 + 0.25
    api = VictimAPI(env["victim"], "soft", compute=CPU)
    grad, d = dfme.estimate_gradient(x, student, api, CPU, m=200, eps=2.0,
                                     gen=torch.Generator().manual_seed(0))
    assert api.queries == 2 * 201 and grad.shape == x.shape and d.shape == (2,)
    xr = x.clone().requires_grad_(True)
    with torch.no_grad():
        target = dfme.victim_logits(api.query(x))
    (student(xr) - target).abs().mean(1).mean().backward()
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), xr.grad.flatten(), dim=0)
    # m random directions in d dimensions recover cos ~ sqrt(m / d) = 0.26 of the true
    # gradient; an unrelated (or sign-flipped) estimate gives ~0 (or below)
    assert cos > 0.5 * (200 / (3 * 32 * 32)) ** 0.5


def test_generator_makes_images_in_the_unit_interval():
    g = dfme.Generator(nz=8, ngf=4, image_size=32)
    with torch.no_grad():
        x = g(torch.randn(5, 8))
    assert x.shape == (5, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1


# ------------------------------------------------------------------ pools
def test_pools_shapes_dtypes_and_determinism(env):
    split_pool = env["pool"]
    same, text = build_pool(None, image_size=32, split_pool=split_pool)
    assert same is split_pool and text.startswith("split")
    for spec in ({"source": "noise", "count": 7}, {"source": "skimage", "count": 7}):
        a, text = build_pool(spec, image_size=32, count=99, seed=0)
        b, _ = build_pool(spec, image_size=32, count=99, seed=0)
        c, _ = build_pool({**spec, "seed": 1}, image_size=32, count=99)
        assert a.shape == (7, 3, 32, 32) and a.dtype == torch.uint8
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert text.startswith(spec["source"])
    # the count falls back to the caller's (the split pool's size)
    noise, _ = build_pool({"source": "noise"}, image_size=16, count=5)
    assert noise.shape == (5, 3, 16, 16)
    assert noise.float().std() > 60  # uniform on 0..255: sd ~74


def test_skimage_pool_is_offline_natural_and_varied():
    crops, text = build_pool({"source": "skimage", "count": 40}, image_size=32)
    assert "15 images" in text
    # natural crops: neighbouring pixels correlate (noise would not), and they differ
    x = crops.float()
    dx = (x[..., 1:] - x[..., :-1]).abs().mean()
    assert dx < 0.5 * (x - x.mean()).abs().mean()
    assert len({tuple(c.flatten()[:64].tolist()) for c in crops}) == 40


def test_imagefolder_pool(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    images, text = build_pool({"source": "imagefolder", "root": str(tmp_path)},
                              image_size=32)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert text == f"imagefolder:{tmp_path.name} (6 images)"
    some, _ = build_pool({"source": "imagefolder", "root": str(tmp_path), "count": 4},
                         image_size=32)
    again, _ = build_pool({"source": "imagefolder", "root": str(tmp_path), "count": 4},
                          image_size=32)
    assert some.shape[0] == 4 and torch.equal(some, again)
    with pytest.raises(FileNotFoundError):
        build_pool({"source": "imagefolder", "root": str(tmp_path / "missing")},
                   image_size=32)


# ------------------------------------------------------------------ config
def _config(**experiment: Any) -> dict[str, Any]:
    return {"apis": {"soft": {"mode": "soft"}, "hard": {"mode": "hard"}},
            "experiments": {"x": {"stage": 1, **experiment}}}


def test_config_refuses_a_non_split_pool_for_a_cached_strategy():
    with pytest.raises(config.ConfigError, match=r"experiments\.x\.pool"):
        config.prepare(_config(strategy="kd", api="soft", pool={"source": "noise"}))
    with pytest.raises(config.ConfigError, match=r"experiments\.x\.pool"):
        config.prepare(_config(strategy="control", pool={"source": "skimage"}))
    with pytest.raises(config.ConfigError, match=r"experiments\.x\.pool"):  # a pool cache
        config.prepare(_config(strategy="boundary", api="hard", pool={"source": "noise"}))
    with pytest.raises(config.ConfigError, match=r"experiments\.x\.pool"):  # no root
        config.prepare(_config(strategy="knockoff", api="soft",
                               pool={"source": "imagefolder"}))
    cfg = config.prepare(_config(strategy="knockoff_adaptive", api="soft",
                                 pool={"source": "skimage", "count": 500}))
    assert cfg["experiments"]["x"]["pool"]["source"] == "skimage"
    # the equal-budget random baseline draws from the same pool
    assert cfg["experiments"]["x-random"]["pool"] == cfg["experiments"]["x"]["pool"]
    assert config.attack_settings(cfg, "x", 0)["pool"]["source"] == "skimage"
    # a split pool adds nothing to the settings (no existing experiment reruns)
    plain = config.prepare(_config(strategy="kd", api="soft"))
    assert plain["experiments"]["x"]["pool"]["source"] == "split"
    assert "pool" not in config.attack_settings(plain, "x", 0)


def test_config_checks_the_new_strategies_parameters():
    with pytest.raises(config.ConfigError, match=r"params\.step"):
        config.prepare(_config(strategy="jbda", api="hard", params={"step": 2.0}))
    with pytest.raises(config.ConfigError, match=r"needs soft answers"):
        config.prepare(_config(strategy="dfme", api="hard"))
    ok = config.prepare(_config(strategy="jbda", api="hard", params={"variant": "jbda_tr"}))
    assert "x-random" not in ok["experiments"]  # JBDA and DFME select no pool images


def test_results_table_shows_a_pool_column_only_where_a_stage_has_another_pool():
    def run(name: str, stage: int, pool: str, **more: Any) -> dict[str, Any]:
        return {"experiment": name, "stage": stage, "strategy": name, "queries": 10,
                "fidelity": 0.5, "test_accuracy": 0.5, "pool": pool, **more}

    metrics = [run("control", 1, "split (96 images)", queries=0),
               run("knockoff_adaptive", 1, "skimage (40 crops of 15 images)"),
               run("control", 2, "split (96 images)", queries=0, experiment="control-s2"),
               run("jbda", 2, "split (96 images)")]
    df = results_table(metrics)
    assert list(df["pool"].fillna("-")) == ["-", "skimage (40 crops of 15 images)", "-", "-"]
    (_, _, s1), (_, _, s2) = display_sections(df)
    assert "pool" in s1.columns and "pool" not in s2.columns
    assert list(s1["pool"])[1] == "skimage (40 crops of 15 images)"


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("strategy", list(CASES))
def test_run_experiment_end_to_end(env, tmp_path, strategy):
    mode, _ = CASES[strategy]
    pool = {"source": "skimage", "count": 40, "seed": 0} if strategy != "dfme" else None
    result, metrics = run_experiment(
        strategy=strategy, params=copy.deepcopy(CASES[strategy][1]), data=env["data"],
        split=env["split"], victim_test_pred=env["victim_pred"], substitute=SUBSTITUTE,
        train_cfg=TRAIN, compute=CPU, seed=0, workdir=tmp_path, victim=env["victim"],
        api_cfg={"mode": mode}, pool=pool)
    params = params_of(strategy)
    assert metrics["queries"] == expected_queries(strategy, params)
    assert metrics["pool"] == ("skimage (40 crops of 15 images)" if pool else "split (96 images)")
    assert 0.0 <= metrics["fidelity"] <= 1.0 and (tmp_path / LOG_NAME).exists()
