"""Probability-layer defences of the victim API (mextract.defences): each layer's
contract, the API pipeline (probability layers, then label layers), the fingerprint,
building layers from config entries, and the defence models' training helpers.
CPU only, synthetic tensors and tiny models (seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, TinyVictim
from torch import nn

from mextract import config as mc
from mextract import defence_specs as ds
from mextract.api import VictimAPI
from mextract.compute import Compute
from mextract.defence_models import (
    load_defence_model,
    misinformation_loss,
    save_defence_model,
    train_defence_model,
    victim_probs,
)
from mextract.defences import (
    MAD,
    AdaptiveMisinformation,
    HoneyLabels,
    Noise,
    ReverseSigmoid,
    Rounding,
    TopK,
    answer_distortion,
    build_defences,
    check_order,
    gradient_cosine,
    mad_perturb,
    model_probs,
    top_label,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = Compute(device="cpu", amp=False, channels_last=False)
N, K = 512, 10


def images(n: int = N, seed: int = 0, size: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def small_net(seed: int, scale: float = 4.0) -> nn.Module:
    """A small MLP whose last module is a linear layer (MAD's gradient layer)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, K))
    with torch.no_grad():
        net[-1].weight.mul_(scale)
    return net.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return images()


@pytest.fixture(scope="module")
def logits(x) -> torch.Tensor:
    with torch.no_grad():
        return small_net(0)(x.float() / 255)


@pytest.fixture(scope="module")
def probs(logits) -> torch.Tensor:
    return torch.softmax(logits, dim=1)


# ------------------------------------------------------------- top-k, rounding
def test_topk_serves_the_k_largest_unrenormalised_and_keeps_the_label(x, logits, probs):
    for k in (1, 3, K + 2):
        served = TopK(k)(x, logits, probs)
        assert served.dtype == torch.float32
        assert ((served > 0).sum(dim=1) <= min(k, K)).all()
        kept = served > 0
        assert torch.equal(served[kept], probs[kept])  # kept values unchanged
        # the kept entries are the k largest
        kth = probs.topk(min(k, K), dim=1).values[:, -1:]
        assert (probs[kept] >= kth.expand_as(probs)[kept]).all()
        assert torch.equal(served.argmax(dim=1), probs.argmax(dim=1))
    top1 = TopK(1)(x, logits, probs)
    assert torch.allclose(top1.sum(dim=1), probs.max(dim=1).values)  # no renormalisation
    with pytest.raises(ValueError):
        TopK(0)


def test_rounding_rounds_and_keeps_the_label(x, logits, probs):
    served = Rounding(2)(x, logits, probs)
    assert served.dtype == torch.float32
    assert torch.allclose(served * 100, (served * 100).round(), atol=1e-4)
    assert (served - probs).abs().max() <= 0.005 + 1e-6
    top1 = probs.argmax(dim=1)
    assert torch.equal(top_label(served, top1), top1)
    ties = (served == served.max(dim=1, keepdim=True).values).sum(dim=1) > 1
    assert ties.any()  # the case top_label is for: argmax alone could pick another class
    assert (served.gather(1, top1[:, None])[:, 0] == served.max(dim=1).values).all()


def test_reverse_sigmoid_follows_the_formula_and_keeps_the_label(x, logits, probs):
    beta, gamma = 0.7, 0.4
    served = ReverseSigmoid(beta, gamma)(x, logits, probs)
    y = probs.double().clamp(1e-9, 1 - 1e-9)  # ART's formula, written out
    r = beta * (1 / (1 + torch.exp(gamma * torch.log((1 - y) / y))) - 0.5)
    want = (probs.double() - r).clamp(0, 1)
    want = want / want.sum(dim=1, keepdim=True)
    assert torch.allclose(served.double(), want, atol=1e-6)
    assert (served - probs).abs().sum(dim=1).mean() > 0.05  # it does perturb
    for beta, gamma in ((1.0, 0.1), (3.0, 2.0), (0.2, 5.0), (10.0, 0.5)):
        served = ReverseSigmoid(beta, gamma)(x, logits, probs)
        assert served.dtype == torch.float32 and (served >= 0).all()
        assert torch.allclose(served.sum(dim=1), torch.ones(N), atol=1e-5)
        assert torch.equal(served.argmax(dim=1), probs.argmax(dim=1)), (beta, gamma)


# ------------------------------------------------------------------------ noise
@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_noise_rows_sum_to_one_keep_the_label_and_repeat_per_image(x, logits, probs,
                                                                     distribution):
    layer = Noise(distribution, scale=0.2, keep_argmax=True, seed=3)
    served = layer(x, logits, probs)
    assert served.dtype == torch.float32 and (served >= 0).all()
    assert torch.allclose(served.sum(dim=1), torch.ones(N), atol=1e-5)
    assert torch.equal(served.argmax(dim=1), probs.argmax(dim=1))
    assert (served - probs).abs().sum(dim=1).mean() > 0.1
    # the same image gets the same answer in another batch, order and layer instance
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    again = Noise(distribution, scale=0.2, keep_argmax=True, seed=3)(
        x[perm][:100], logits[perm][:100], probs[perm][:100])
    assert torch.equal(again, served[perm][:100])
    other_seed = Noise(distribution, scale=0.2, keep_argmax=True, seed=4)(x, logits, probs)
    assert not torch.equal(other_seed, served)
    # without keep_argmax this much noise does change labels (so the swap matters)
    free = Noise(distribution, scale=0.2, keep_argmax=False, seed=3)(x, logits, probs)
    assert (free.argmax(dim=1) != probs.argmax(dim=1)).any()


def test_noise_has_the_configured_distribution():
    layer = Noise("gaussian", scale=1.0, seed=0)
    z = layer.standard_noise(images(4000, seed=5), 10).flatten()
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    z = Noise("laplace", scale=1.0, seed=0).standard_noise(images(4000, seed=5), 10).flatten()
    assert abs(z.mean()) < 0.05 and abs(z.abs().mean() - 1) < 0.03  # E|Laplace(0, 1)| = 1


# -------------------------------------------------------------------------- MAD
def last_layer_gradients(model: nn.Module, x: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """Per-row autograd gradient of CE(model(x), soft target) w.r.t. the last linear
    layer's weight and bias, flattened (N, D)."""
    head = model[-1]
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1].float() / 255)
        loss = -(targets[i:i + 1].double() * F.log_softmax(out.double(), dim=1)).sum()
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        rows.append(torch.cat([gw.flatten(), gb.flatten()]))
    return torch.stack(rows)


def test_mad_stays_in_budget_and_deviates_the_attackers_gradient(x, logits, probs):
    surrogate = small_net(1)
    eps = 0.5
    served = MAD(surrogate, epsilon=eps)(x, logits, probs)
    assert served.dtype == torch.float32 and (served >= 0).all()
    assert torch.allclose(served.sum(dim=1), torch.ones(N), atol=1e-5)
    l1 = (served.double() - probs.double()).abs().sum(dim=1)
    assert (l1 <= eps + 1e-5).all() and l1.mean() > 0.3 * eps

    # the closed form (cosine of p_s - y' and p_s - y) is the real gradient's cosine
    m = 40
    g_clean = last_layer_gradients(surrogate, x[:m], probs[:m])
    g_served = last_layer_gradients(surrogate, x[:m], served[:m])
    cos_autograd = F.cosine_similarity(g_served, g_clean, dim=1).double()
    ps = model_probs(surrogate, x[:m])
    assert torch.allclose(gradient_cosine(served[:m].double(), probs[:m].double(),
                                          ps.double()), cos_autograd, atol=1e-4)
    # MAD's deviation beats the unperturbed answer (0) and a random move of the same
    # L1 size towards a random vertex, on every row
    angle = torch.rad2deg(torch.acos(cos_autograd.clamp(-1, 1)))
    gen = torch.Generator().manual_seed(0)
    vertex = F.one_hot(torch.randint(0, K, (m,), generator=gen), K).double()
    step = (eps / (vertex - probs[:m].double()).abs().sum(dim=1)).clamp(max=1)[:, None]
    rand = probs[:m].double() + step * (vertex - probs[:m].double())
    cos_rand = F.cosine_similarity(last_layer_gradients(surrogate, x[:m], rand),
                                   g_clean).double()
    angle_rand = torch.rad2deg(torch.acos(cos_rand.clamp(-1, 1)))
    assert angle.mean() > 20
    assert (angle >= angle_rand - 1e-3).all() and angle.mean() > angle_rand.mean() + 5


def test_mad_keep_argmax_keeps_the_label_within_budget(x, logits, probs):
    served = MAD(small_net(1), epsilon=1.0, keep_argmax=True)(x, logits, probs)
    assert torch.equal(served.argmax(dim=1), probs.argmax(dim=1))
    assert ((served.double() - probs.double()).abs().sum(dim=1) <= 1.0 + 1e-5).all()
    assert (served - probs).abs().sum(dim=1).mean() > 0.05
    free = MAD(small_net(1), epsilon=1.0)(x, logits, probs)
    assert (free.argmax(dim=1) != probs.argmax(dim=1)).any()
    assert torch.equal(MAD(small_net(1), epsilon=0.0)(x, logits, probs), probs)


def test_mad_perturb_picks_the_best_vertex():
    y = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    ps = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    out = mad_perturb(y, ps, epsilon=0.4)
    best = min((gradient_cosine(y + min(1, 0.4 / (2 * (1 - y[0, k]))) *
                                (F.one_hot(torch.tensor([k]), 3) - y), y, ps).item(), k)
               for k in range(3))
    k = best[1]
    step = min(1.0, 0.4 / (2 * (1 - y[0, k].item())))
    want = y + step * (F.one_hot(torch.tensor([k]), 3).double() - y)
    assert torch.allclose(out, want)


# ----------------------------------------------------- adaptive misinformation
def test_adaptive_misinformation_is_truthful_above_tau_only(x, logits, probs):
    misinfo = small_net(2)
    score = probs.max(dim=1).values
    tau = float(score.median())
    served = AdaptiveMisinformation(misinfo, tau=tau)(x, logits, probs)
    high = score >= tau
    assert high.any() and (~high).any()
    assert torch.equal(served[high], probs[high])  # exactly the true answer
    mis = model_probs(misinfo, x)
    assert torch.allclose(served[~high], mis[~high], atol=1e-6)
    assert ((served[~high] - probs[~high]).abs().sum(dim=1) > 1e-3).all()
    # smooth switch: blend by sigmoid(nu (tau - score)) everywhere
    nu = 20.0
    smooth = AdaptiveMisinformation(misinfo, tau=tau, nu=nu)(x, logits, probs)
    a = torch.sigmoid(nu * (tau - score.double()))[:, None]
    assert torch.allclose(smooth.double(), (1 - a) * probs.double() + a * mis.double(),
                          atol=1e-6)


# -------------------------------------------------------------------- pipeline
def test_probability_layers_must_precede_label_layers():
    noise = Noise(scale=0.1)
    check_order([noise, HoneyLabels()])
    with pytest.raises(ValueError, match=r"noise\(gaussian.*number 2 of 2.*honey"):
        check_order([HoneyLabels(), noise])
    with pytest.raises(ValueError, match="probability layer"):
        VictimAPI(TinyVictim(), "hard", defences=[HoneyLabels(), noise], compute=CPU)
    with pytest.raises(ValueError, match="honey"):
        VictimAPI(TinyVictim(), "soft", defences=[noise, HoneyLabels()], compute=CPU)
    api = VictimAPI(TinyVictim(), "honey", defences=[noise], compute=CPU)
    assert [d.acts_on for d in api.defences] == ["probs", "labels"]  # honey after noise


def test_soft_api_with_layers_answers_float32_counts_and_fingerprints():
    victim = TinyVictim()
    q = images(300, size=32)
    mad_model = small_net(3)
    mad_net = nn.Sequential(nn.AdaptiveAvgPool2d(8), *mad_model)  # takes 32x32 images

    def api(scale: float = 0.05, budget: int | None = None) -> VictimAPI:
        layers = [Noise(scale=scale, seed=1), MAD(mad_net, epsilon=0.3), Rounding(3)]
        return VictimAPI(victim, "soft", budget=budget, defences=layers, compute=CPU)

    a = api(budget=500)
    out = a.query(q)
    assert out.dtype == torch.float32 and out.shape == (300, 10)
    assert torch.allclose(out.sum(dim=1), torch.ones(300), atol=0.02)
    assert a.queries == 300
    assert torch.equal(a.query(q[:100]), out[:100])  # deterministic answers
    assert a.queries == 400
    with pytest.raises(Exception, match="budget"):
        a.query(q[:101])
    assert a.queries == 400
    assert a.description == "soft+" + "+".join(d.name for d in a.defences)
    clean = VictimAPI(victim, "soft", compute=CPU).query(q)
    assert not torch.equal(out, clean)

    base = api().fingerprint
    assert api().fingerprint == base
    assert api(scale=0.06).fingerprint != base  # a layer's parameter
    spec = api().spec()["defences"]
    assert [s["type"] for s in spec] == ["noise", "mad", "rounding"]
    assert len(spec[1]["model"]["weights"]) == 16
    with torch.no_grad():
        mad_model[-1].bias.add_(0.01)  # the model's weights, changed in place
    assert api().fingerprint != base

    hard = VictimAPI(victim, "hard", defences=[TopK(1), HoneyLabels(margin=0.0)],
                     compute=CPU)
    assert torch.equal(hard.query(q), clean.argmax(dim=1))


def test_hard_api_labels_follow_the_probability_layers():
    victim = TinyVictim()
    q = images(400, size=32)
    clean = VictimAPI(victim, "soft", compute=CPU).query(q)
    misinfo = nn.Sequential(nn.AdaptiveAvgPool2d(8), *small_net(4))
    am = AdaptiveMisinformation(misinfo, tau=0.99)
    soft = VictimAPI(victim, "soft", defences=[am], compute=CPU).query(q)
    hard = VictimAPI(victim, "hard", defences=[am], compute=CPU).query(q)
    assert torch.equal(hard, top_label(soft, clean.argmax(dim=1)))
    assert (hard != clean.argmax(dim=1)).any()


# --------------------------------------------------------- config and building
def test_build_defences_builds_every_type_from_config_entries():
    specs = [{"type": t, **ds.layer_defaults(t)} for t in ds.PROB_TYPES]
    specs += [{"type": "honey", "margin": 1.0}, {"type": "dawn", "key": "k", "rate": 0.01}]
    specs[4] = {**specs[4], "model": {"epochs": 2}}  # mad with its own model spec
    need = ds.required_models(specs)
    assert sorted(need) == ["am-misinformation-vgg11-w0.125-e5-lr0.05-b128",
                            "mad-surrogate-vgg11-w0.125-e2-lr0.05-b128"]
    assert need["mad-surrogate-vgg11-w0.125-e2-lr0.05-b128"]["kind"] == "surrogate"
    models = {key: small_net(i) for i, key in enumerate(need)}
    layers = build_defences(specs, models)
    assert [type(d).__name__ for d in layers] == [
        "TopK", "Rounding", "Noise", "ReverseSigmoid", "MAD", "AdaptiveMisinformation",
        "HoneyLabels", "DawnWatermark"]
    for spec, layer in zip(specs, layers, strict=True):
        got = layer.spec()
        assert got["type"] == spec["type"]
        for key, value in spec.items():
            if key not in ("model", "key"):
                assert got[key] == value, (spec["type"], key)
    assert layers[4].model is models["mad-surrogate-vgg11-w0.125-e2-lr0.05-b128"]
    assert layers[4].spec()["model"]["epochs"] == 2
    with pytest.raises(ValueError, match="needs the defence model"):
        build_defences([{"type": "mad"}])
    with pytest.raises(ValueError, match="must come before"):
        build_defences([{"type": "honey"}, {"type": "topk"}])
    assert ds.model_key({"type": "noise"}) is None
    assert ds.required_models([{"type": "noise"}, {"type": "honey"}]) == {}


def demo_with_api(api: dict) -> dict:
    cfg = copy.deepcopy(yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    cfg["apis"]["layered"] = api
    return cfg


def test_config_schema_and_cross_check_for_probability_layers():
    defences = [{"type": "noise", "scale": 0.1}, {"type": "mad"},
                {"type": "adaptive_misinformation", "nu": 10}]
    cfg = mc.prepare(demo_with_api({"mode": "soft", "defences": defences}))
    got = cfg["apis"]["layered"]["defences"]
    assert got[0] == {"type": "noise", "scale": 0.1, **{
        k: v for k, v in ds.layer_defaults("noise").items() if k != "scale"}}
    assert got[1]["model"] == ds.model_defaults() and got[1]["epsilon"] == 0.5
    assert got[2]["nu"] == 10 and got[2]["tau"] == 0.5
    mc.prepare(demo_with_api({"mode": "hard", "defences": [
        {"type": "topk", "k": 2}, {"type": "honey"}, {"type": "dawn", "key": "s"}]}))
    bad = {
        "label layer in a soft api": ({"mode": "soft", "defences": [{"type": "honey"}]},
                                      "apis.layered.defences': the label layers (honey)"),
        "probability layer after a label layer": (
            {"mode": "hard", "defences": [{"type": "honey"}, {"type": "rounding"}]},
            "apis.layered.defences.1': the rounding layer"),
        "bad parameter": ({"mode": "soft", "defences": [{"type": "mad", "epsilon": 3}]},
                          "apis.layered.defences.0.epsilon"),
        "unknown key": ({"mode": "soft", "defences": [{"type": "topk", "kk": 1}]},
                        "apis.layered.defences.0"),
    }
    for name, (api, where) in bad.items():
        with pytest.raises(mc.ConfigError) as err:
            mc.prepare(demo_with_api(api))
        assert where in str(err.value), name


# ------------------------------------------------------------ honest-user cost
def test_answer_distortion():
    clean = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    served = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.4, 0.5]])
    d = answer_distortion(served, clean)
    assert d["mean_l1"] == pytest.approx((0.4 + 0.2) / 2)
    assert d["top1_changed"] == pytest.approx(0.5)
    assert answer_distortion(clean, clean) == {"mean_l1": 0.0, "top1_changed": 0.0}
    hard = answer_distortion(torch.tensor([0, 2]), clean)  # labels read as one-hot
    assert hard["top1_changed"] == pytest.approx(0.5)
    assert hard["mean_l1"] == pytest.approx((0.6 + 1.2) / 2)


# -------------------------------------------------------------- defence models
SPEC = {"arch": "vgg11", "width": 0.125, "epochs": 2, "lr": 0.05, "batch_size": 32}


@pytest.fixture(scope="module")
def defender_data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """128 32x32 images whose true class (0-9) brightens one channel, a tiny victim."""
    gen = torch.Generator().manual_seed(7)
    y = torch.arange(128) % 10
    x = torch.randint(0, 60, (128, 3, 32, 32), generator=gen)
    x[torch.arange(128), y % 3] += (20 * y)[:, None, None]
    return x.to(torch.uint8), y, TinyVictim()


def test_misinformation_model_lowers_the_true_class_probability(defender_data, tmp_path):
    x, y, victim = defender_data
    spec = {**SPEC, "epochs": 4, "lr": 0.2}
    model = train_defence_model("misinformation", spec, x, y, victim, CPU, seed=0)
    assert not model.training
    untrained = train_defence_model("misinformation", {**SPEC, "epochs": 1, "lr": 1e-9},
                                    x, y, victim, CPU, seed=0)  # BN statistics only

    def p_true(m: nn.Module) -> float:
        return model_probs(m, x).gather(1, y[:, None]).mean().item()

    assert p_true(model) < 0.5 * p_true(untrained)  # measured: 0.025 vs 0.099
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    want = -torch.log(1 - torch.softmax(logits, dim=1)[0, 0])
    assert torch.allclose(misinformation_loss(logits, torch.tensor([0])), want)
    # saved and loaded with its spec
    save_defence_model(model, tmp_path / "m.pt", "misinformation", spec, 10)
    loaded = load_defence_model(tmp_path / "m.pt", spec, 10)
    assert torch.equal(model_probs(loaded, x), model_probs(model, x))
    with pytest.raises(ValueError, match="saved for spec"):
        load_defence_model(tmp_path / "m.pt", SPEC, 10)


def test_surrogate_is_distilled_from_the_victim(defender_data):
    x, y, victim = defender_data
    target = victim_probs(victim, x, CPU)
    untrained = train_defence_model("surrogate", {**SPEC, "epochs": 1, "lr": 1e-9},
                                    x, y, victim, CPU, seed=0)
    trained = train_defence_model("surrogate", {**SPEC, "epochs": 3}, x, y, victim, CPU,
                                  seed=0)

    def kl(model: nn.Module) -> float:
        return F.kl_div(model_probs(model, x).clamp_min(1e-12).log(), target,
                        reduction="batchmean").item()

    assert kl(trained) < 0.6 * kl(untrained)  # measured: 0.10 vs 0.26
    with pytest.raises(ValueError, match="kind"):
        train_defence_model("oracle", SPEC, x, y, victim, CPU)
