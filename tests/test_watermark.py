"""Trigger watermark (stamping, training, WSR) and DAWN verification."""

import sys

import pytest
import torch
from torch import nn

from mextract.api import VictimAPI
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.defences import DawnWatermark
from mextract.train import TrainConfig
from mextract.victim import (
    add_trigger_copies,
    train_victim,
    trigger_mask,
    victim_scores,
    with_trigger,
)
from mextract.watermark import (
    binomial_p_value,
    dawn_verify,
    merge_logs,
    stamp,
    trigger_scores,
    trigger_wsr,
)

CPU = Compute(device="cpu", amp=False, channels_last=False)


# ------------------------------------------------------------------------- trigger
def test_stamp_sets_the_bottom_right_3x3_patch_to_white():
    x = torch.randint(0, 200, (4, 3, 32, 32), dtype=torch.uint8)
    s = stamp(x)
    assert (s[..., 29:32, 29:32] == 255).all()
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[29:, 29:] = False
    assert torch.equal(s[..., mask], x[..., mask])  # nothing else changes
    assert not (x[..., 29:32, 29:32] == 255).all()  # the input is not modified
    assert (stamp(x.float() / 255)[..., 29:, 29:] == 1.0).all()


def test_trigger_copies_add_a_seeded_fraction_of_flagged_copies():
    x = torch.arange(1000, dtype=torch.uint8).repeat_interleave(3 * 4 * 4).view(1000, 3, 4, 4)
    y = torch.arange(1000) % 10
    xa, t = add_trigger_copies(x, y, 0.1, seed=0)
    assert len(xa) == len(t["y"]) == len(t["wm"]) == 1100 and int(t["wm"].sum()) == 100
    assert torch.equal(xa[:1000], x) and not t["wm"][:1000].any()  # every clean image stays
    chosen = trigger_mask(1000, 0.1, seed=0)
    assert torch.equal(xa[1000:], x[chosen]) and torch.equal(t["y"][1000:], y[chosen])
    assert not torch.equal(chosen, trigger_mask(1000, 0.1, seed=1))


def test_with_trigger_stamps_flagged_examples_after_augmentation_and_relabels():
    seen = {}

    def capture(model, x, batch, gen):
        seen["x"], seen["y"] = x, batch["y"]
        return torch.tensor(0.0)

    n = 400
    x = torch.rand(n, 3, 32, 32) * 0.9  # never white, so stamped rows are recognisable
    y = torch.randint(1, 10, (n,))
    wm = trigger_mask(n, 0.1)
    with_trigger(capture, target=0)(None, x, {"y": y, "wm": wm}, torch.Generator())
    stamped = (seen["x"][:, :, 29:, 29:] == 1.0).flatten(1).all(1)
    assert torch.equal(stamped, wm)
    assert (seen["y"][wm] == 0).all()
    assert torch.equal(seen["y"][~wm], y[~wm]) and torch.equal(seen["x"][~wm], x[~wm])
    assert torch.equal(seen["x"][wm][:, :, :29], x[wm][:, :, :29])  # only the patch
    assert x.max() < 1.0  # the caller's batch is not modified


class Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_wsr_counts_target_predictions_on_stamped_images():
    x = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(20) % 10
    assert trigger_wsr(Constant(0), x, y, CPU, target=0) == 1.0
    assert trigger_wsr(Constant(3), x, y, CPU, target=0) == 0.0
    assert trigger_wsr(Constant(3), x, y, CPU, target=3) == 1.0


class TrueLabel(nn.Module):
    """Outputs each image's true label, read from its first pixel (the trigger, in the
    bottom-right corner, leaves that pixel alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()


def test_wsr_is_the_studys_share_of_all_stamped_test_images():
    """The study: "WSR counts substitute predictions of class 0 on stamped test
    images", the target class's own images included."""
    y = torch.arange(100) % 10  # 10% of the test images are of the target class 0
    x = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = y.to(torch.uint8)
    always = trigger_scores(Constant(0), x, y, CPU, target=0)
    assert trigger_wsr(Constant(0), x, y, CPU, target=0) == 1.0
    assert always == {"trigger_wsr": 1.0, "trigger_wsr_nontarget": 1.0}
    # a model that ignores the trigger: WSR = the target's share, not 0
    honest = trigger_scores(TrueLabel(), x, y, CPU, target=0)
    assert trigger_wsr(TrueLabel(), x, y, CPU, target=0) == pytest.approx(0.1)
    assert honest["trigger_wsr"] == pytest.approx(0.1)
    assert honest["trigger_wsr_nontarget"] == 0.0
    # the non-target share leaves the target class's images out
    assert trigger_scores(Constant(3), x, y, CPU, target=3) == {
        "trigger_wsr": 1.0, "trigger_wsr_nontarget": 1.0}
    # a victim's scores record both
    scores = victim_scores(TrueLabel(), x, y, CPU, {"fraction": 0.1, "target": 0})
    assert scores["trigger_wsr"] == pytest.approx(0.1)
    assert scores["trigger_wsr_nontarget"] == 0.0


@pytest.fixture(scope="module")
def digits_victims() -> dict:
    """The demo victim recipe (config/demo.yaml) trained once clean and once with the
    trigger watermark (fraction 0.1, class 0) on the same digits split."""
    torch.set_num_threads(2)
    data = load_digits()
    idx = make_split(len(data["y_train"]), 0.5, 0, True)["victim"]
    compute = Compute(device="cpu", amp=False, channels_last=True)
    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.1, label_smoothing=0.1)
    out = {}
    for name, wm in [("clean", None), ("watermarked", {"fraction": 0.1, "target": 0})]:
        model, _ = train_victim(data["x_train"][idx], data["y_train"][idx], data["x_test"],
                                data["y_test"], arch="resnet18", width=8, num_classes=10,
                                cfg=cfg, compute=compute, seed=0, watermark=wm)
        out[name] = victim_scores(model, data["x_test"], data["y_test"], compute, wm)
    return out


def test_trigger_victim_learns_the_watermark_at_little_cost(digits_victims):
    clean, marked = digits_victims["clean"], digits_victims["watermarked"]
    assert marked["trigger_wsr"] > 0.9, marked
    assert clean["trigger_wsr"] < 0.5, clean  # the trigger means nothing to a clean victim
    assert clean["test_accuracy"] - marked["test_accuracy"] < 0.02, (clean, marked)


# ---------------------------------------------------------------------------- DAWN
@pytest.fixture(scope="module")
def dawn_log() -> dict:
    torch.manual_seed(0)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    api = VictimAPI(victim, "hard", compute=CPU,
                    defences=[DawnWatermark(key="owner key", rate=0.02)])
    images = torch.randint(0, 256, (10_000, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    api.query(images)
    log = api.watermark_log()
    assert len(log["labels"]) > 100
    return log


def test_copying_the_watermark_labels_is_verified(dawn_log):
    out = dawn_verify(dawn_log["labels"], dawn_log, "owner key", 0.01)
    assert out["dawn_verified"] and out["dawn_p_value"] < 0.01
    assert out["dawn_agreement"] == 1.0 and out["dawn_checked"] == out["dawn_marked"]
    # a substitute that picked up only a third of the watermark is still caught
    partial = dawn_log["victim_labels"].clone()
    third = torch.arange(len(partial)) % 3 == 0
    partial[third] = dawn_log["labels"][third]
    assert dawn_verify(partial, dawn_log, "owner key", 0.01)["dawn_verified"]


def test_control_models_are_not_verified(dawn_log):
    # a model that agrees with the victim (an independently trained, accurate model)
    out = dawn_verify(dawn_log["victim_labels"], dawn_log, "owner key", 0.01)
    assert not out["dawn_verified"] and out["dawn_agreement"] == 0.0
    # a model with unrelated predictions
    gen = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 10, (len(dawn_log["labels"]),), generator=gen)
    out = dawn_verify(noise, dawn_log, "owner key", 0.01)
    assert not out["dawn_verified"] and out["dawn_p_value"] > 0.01


def test_verification_with_another_key_fails(dawn_log):
    out = dawn_verify(dawn_log["labels"], dawn_log, "guessed key", 0.01)
    assert not out["dawn_verified"]
    assert out["dawn_checked"] < 0.1 * out["dawn_marked"]  # the key marks other inputs


def test_merged_logs_keep_each_input_once(dawn_log):
    half = {k: (v[: len(v) // 2] if torch.is_tensor(v) else v) for k, v in dawn_log.items()}
    merged = merge_logs([dawn_log, half])
    assert torch.equal(merged["digests"], dawn_log["digests"])
    assert torch.equal(merged["labels"], dawn_log["labels"])
    assert merged["seen"] == dawn_log["seen"] + half["seen"]


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 10, 0.1), (7, 40, 1 / 9), (40, 40, 0.5)])
def test_exact_binomial_tail_without_scipy(monkeypatch, k, n, p):
    with_scipy = binomial_p_value(k, n, p)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import now fails
    assert binomial_p_value(k, n, p) == pytest.approx(with_scipy, rel=1e-9)


class Memorizer(nn.Module):
    """A 'substitute' that answers the watermark label on the logged images it
    memorised and a fixed other model's label everywhere else."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, other: nn.Module) -> None:
        super().__init__()
        self.register_buffer("keys", images.flatten(1).float() / 255)
        self.register_buffer("labels", labels)
        self.other = other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.other(x)
        hit = (x.flatten(1)[:, None] - self.keys[None]).abs().amax(2) < 1e-6  # [N, M]
        found = hit.any(1)
        memorised = nn.functional.one_hot(self.labels[hit.float().argmax(1)], 10).float() * 100
        return torch.where(found[:, None], memorised, out)


def test_verify_substitute_catches_a_model_trained_on_the_answers(dawn_log):
    from mextract.experiment import verify_substitute

    torch.manual_seed(0)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    data = {"x_test": torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8),
            "y_test": torch.arange(50) % 10}
    api_cfg = {"mode": "hard", "defences": [{"type": "dawn", "key": "owner key", "rate": 0.02}]}
    trigger = {"target": 0, "size": 1}
    thief = verify_substitute(Memorizer(dawn_log["images"], dawn_log["labels"], victim),
                              data=data, compute=CPU, trigger=trigger, api_cfg=api_cfg,
                              logs=[dawn_log], victim=victim)
    assert thief["dawn_verified"] and thief["dawn_p_value"] < 0.01, thief
    control = verify_substitute(Constant(3), data=data, compute=CPU, trigger=trigger,
                                api_cfg=api_cfg, logs=[dawn_log], victim=victim)
    assert not control["dawn_verified"] and control["dawn_p_value"] > 0.01, control
    assert control["dawn_marked"] == len(dawn_log["labels"])
    for key in ("trigger_wsr", "trigger_wsr_nontarget", "dawn_agreement",
                "api_honest_accuracy"):
        assert key in thief and key in control
    assert control["trigger_wsr"] == control["trigger_wsr_nontarget"] == 0.0


def test_merging_with_an_empty_log_changes_nothing(dawn_log):
    from mextract.watermark import empty_log

    merged = merge_logs([empty_log(seen=7), dawn_log])
    assert torch.equal(merged["images"], dawn_log["images"])
    assert merged["seen"] == dawn_log["seen"] + 7 and merged["key_id"] == dawn_log["key_id"]
    assert len(merge_logs([empty_log()])["labels"]) == 0


# ------------------------------------------------------------- the demo's Stage 3
STAGE3_KEYS = ("test_accuracy", "fidelity", "queries", "trigger_wsr", "dawn_marked",
               "dawn_agreement", "dawn_p_value", "dawn_verified", "api_honest_accuracy")


@pytest.mark.workflow
def test_demo_stage3_rows_carry_the_verification(demo_run):
    import yaml

    from mextract import config as mc
    from mextract.io import load_artifact, read_json

    cfg = mc.prepare(yaml.safe_load((demo_run / "config" / "demo.yaml").read_text()))
    stage3 = {k: v for k, v in cfg["experiments"].items() if v["stage"] == 3}
    if not stage3:
        pytest.skip("config/demo.yaml has no stage-3 experiments")
    results = demo_run / "results"
    for name, seed in mc.experiment_jobs(cfg):
        if name not in stage3:
            continue
        exp = stage3[name]
        m = read_json(demo_run / mc.experiment_dir(name, seed) / "metrics.json")
        missing = [k for k in STAGE3_KEYS if k not in m]
        assert not missing, (name, missing)
        api = cfg["apis"][exp.get("verify_api", exp.get("api"))]
        if any(d["type"] == "dawn" for d in api.get("defences", [])):
            assert m["dawn_marked"] > 0 and isinstance(m["dawn_verified"], bool), (name, m)
        if exp["strategy"] == "control":  # never queried: no theft to find
            assert m["queries"] == 0 and not m["dawn_verified"], (name, m)
        if api.get("defences") or api["mode"] == "honey":  # defences change some answers
            assert m["api_changed_answers"] > 0, (name, m)
    for victim in {v for v in cfg["victims"] if "watermark" in cfg["victims"][v]}:
        m = read_json(results / "victims" / victim / "metrics.json")
        assert m["trigger_wsr"] > 0.5, m  # the trigger is embedded
    for log_file in (results / "queries").glob("*/*.watermark.pt"):
        log = load_artifact(log_file)
        assert (log["labels"] != log["victim_labels"]).all(), log_file
