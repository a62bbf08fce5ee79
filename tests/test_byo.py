"""Bring your own victim (mextract.byo): a user's state_dict of a built-in architecture
and a TorchScript model load as victims (resized and normalised as the entry says) and
are attacked; the config accepts them and URL APIs, and wires their inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import one_thread
from torch import nn

from mextract import config as mc
from mextract.byo import Adapter, load_byo
from mextract.compute import Compute
from mextract.data import load_digits, make_split
from mextract.experiment import load_victim, run_experiment
from mextract.io import save_artifact
from mextract.metrics import predict
from mextract.models import build_model

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
CLASSES = [str(i) for i in range(10)]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


class Net48(nn.Module):
    """A user's model: normalised 48x48 inputs, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 5, stride=3)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 48:
            raise ValueError("Net48 takes 48x48 images")
        return 6.0 * self.fc(F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1))


def x32(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_state_dict_of_a_builtin_arch_loads_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("vgg11", 10, 0.125).eval()
    path = tmp_path / "mine.pt"
    torch.save(model.state_dict(), path)  # the user's own file: no checksum sidecar
    cfg = {"arch": "vgg11", "width": 0.125,
           "source": {"type": "state_dict", "path": str(path), "classes": CLASSES}}
    loaded = load_victim(path, cfg, 10)
    with torch.inference_mode():
        assert torch.equal(loaded(x32()), model(x32()))
    # the backbone alone: normalised by the entry's mean/std, resized to its input size
    torch.save(model.net.state_dict(), tmp_path / "backbone.pt")
    cfg["source"].update(path=str(tmp_path / "backbone.pt"), mean=MEAN, std=STD,
                         input_size=40)
    backbone = load_byo(None, cfg)  # type: ignore[arg-type]
    x = x32()
    expected = model.net((F.interpolate(x, size=(40, 40), mode="bilinear", antialias=True,
                                        align_corners=False)
                          - torch.tensor(MEAN).view(1, 3, 1, 1))
                         / torch.tensor(STD).view(1, 3, 1, 1))
    with torch.inference_mode():
        assert torch.allclose(backbone(x), expected, atol=1e-6)
    # a pickle with code in it is refused (weights_only)
    torch.save({"net.x": Net48()}, tmp_path / "pickled.pt")
    cfg["source"]["path"] = str(tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="weights_only"):
        load_byo(None, cfg)  # type: ignore[arg-type]


def test_a_torchscript_model_is_resized_and_normalised(tmp_path: Path) -> None:
    path = tmp_path / "net48.ts"
    net = Net48().eval()
    torch.jit.save(torch.jit.script(net), str(path))
    cfg = {"source": {"type": "torchscript", "path": str(path), "classes": CLASSES,
                      "input_size": 48, "mean": MEAN, "std": STD}}
    loaded = load_byo(path, cfg)
    assert isinstance(loaded, Adapter)
    x = x32()
    ref = Adapter(net, (48, 48), MEAN, STD)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), ref(x), atol=1e-6)
    # without input_size the 32x32 images reach the model, which refuses them
    cfg["source"].pop("input_size")
    with pytest.raises(Exception, match="48x48"):
        load_byo(path, cfg)
    # a class list that does not match the model's outputs is an error naming both
    cfg["source"].update(input_size=48, classes=CLASSES[:5])
    with pytest.raises(ValueError, match="10 outputs"):
        load_byo(path, cfg)


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    with one_thread():
        data = load_digits()
    split = make_split(len(data["y_train"]), 0.5, seed=0)
    split["pool"] = split["pool"][:120]
    return {"data": data, "split": split}


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_a_user_model_is_attacked_as_a_victim(kind: str, digits: dict[str, Any],
                                              tmp_path: Path) -> None:
    data, compute = digits["data"], Compute("cpu", amp=False)
    if kind == "state_dict":
        torch.manual_seed(0)
        save_artifact(build_model("resnet18", 10, 4).state_dict(), tmp_path / "model.pt")
        cfg = {"arch": "resnet18", "width": 4,
               "source": {"type": kind, "path": "unused", "classes": CLASSES}}
        victim = load_victim(tmp_path / "model.pt", cfg, 10)
    else:
        torch.jit.save(torch.jit.script(Net48().eval()), str(tmp_path / "model.pt"))
        cfg = {"source": {"type": kind, "path": "unused", "classes": CLASSES,
                          "input_size": 48, "mean": MEAN, "std": STD}}
        victim = load_victim(tmp_path / "model.pt", cfg, 10)
    result, metrics = run_experiment(
        strategy="random", params={"budget": 60}, data=data, split=digits["split"],
        victim_test_pred=predict(victim, data["x_test"], compute),
        substitute={"arch": "vgg11", "width": 0.125},
        train_cfg={"epochs": 1, "batch_size": 32, "lr": 0.05}, compute=compute, seed=0,
        workdir=tmp_path / "work", victim=victim, api_cfg={"mode": "soft"})
    assert metrics["queries"] == 60 == len(result.query_log["indices"])
    assert 0.0 <= metrics["fidelity"] <= 1.0


def _cfg(**extra: Any) -> dict[str, Any]:
    return {"victims": {"clean": {}, "mine": {"source": {
                "type": "torchscript", "path": "models/mine.ts", "classes": CLASSES,
                "input_size": [48, 48], "mean": MEAN, "std": STD}}},
            "apis": {"mine-soft": {"mode": "soft", "victim": "mine"},
                     "remote": {"mode": "hard", "url": "http://127.0.0.1:8000",
                                "key_env": "AUDIT_KEY"}},
            "experiments": {"kd": {"stage": 1, "strategy": "kd", "api": "mine-soft"},
                            "basic": {"stage": 2, "strategy": "basic", "api": "remote"},
                            "active": {"stage": 2, "strategy": "active_learning",
                                       "api": "remote"}},
            **extra}


def test_config_accepts_user_models_and_url_apis_and_wires_their_inputs() -> None:
    cfg = mc.prepare(_cfg())
    assert mc.byo_victims(cfg) == ["mine"]
    assert mc.is_remote(cfg, "remote") and not mc.is_remote(cfg, "mine-soft")
    assert mc.attack_inputs(cfg, "kd")["victim_pred"] == \
        "results/victims/mine/test_predictions.pt"
    basic = mc.attack_inputs(cfg, "basic")
    assert basic["victim_pred"] == "results/remote/remote/test_predictions.pt"
    assert basic["cache"] == "results/queries/remote/pool.pt"
    assert "victim" not in mc.attack_inputs(cfg, "active")  # asks over HTTP
    assert mc.attack_victims(cfg, "active")["api"] is None
    assert mc.used_victims(cfg) == ["mine"]
    assert mc.api_victim_inputs(cfg, "remote") == {}


@pytest.mark.parametrize("change,key", [
    (lambda c: c["apis"]["remote"].pop("key_env"), "apis.remote.key_env"),
    (lambda c: c["apis"]["remote"].update(defences=[{"type": "honey"}]),
     "apis.remote.defences"),
    (lambda c: c["apis"]["mine-soft"].update(key_env="K"), "apis.mine-soft.key_env"),
    (lambda c: c["apis"]["remote"].update(url="ftp://x"), "apis.remote.url"),
    (lambda c: c["victims"]["mine"]["source"].pop("classes"), "victims.mine.source"),
    (lambda c: c["victims"]["mine"]["source"].update(type="onnx"),
     "victims.mine.source.type"),
])
def test_config_names_bad_byo_and_url_keys(change, key: str) -> None:  # noqa: ANN001
    cfg = _cfg()
    change(cfg)
    with pytest.raises(mc.ConfigError, match=f"'{key}'"):
        mc.prepare(cfg)
