"""The served victim API (mextract.serve) and its client (mextract.remote.RemoteAPI):
a real uvicorn server on localhost, bad requests, exact answers and counts, retries,
budgets, rate limits, logs; and (marked workflow) the demo's kd and basic attacks run
through Snakemake against served APIs."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import TinyVictim, copy_project, one_thread, snakemake

from mextract.api import QueryBudgetExceeded, VictimAPI
from mextract.defences import build_defences
from mextract.io import load_artifact, read_json
from mextract.remote import NPY, RemoteAPI, RemoteAPIError, from_npy, to_npy
from mextract.serve import create_app, read_query_log, serve_in_thread

KEYS = {"alice": "alice-key", "bob": "bob-key"}
DEFENDED = [{"type": "honey", "margin": 1.5}, {"type": "dawn", "rate": 0.2, "key": "k"}]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def factory(mode: str = "soft", defences=None, seed: int = 0):  # noqa: ANN001, ANN201
    victim = TinyVictim(seed)
    return lambda: VictimAPI(victim, mode=mode, defences=build_defences(defences),
                             batch_size=64)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A soft-label server: budget 500 per client, max_batch 64, query logs on."""
    logs = tmp_path_factory.mktemp("logs")
    app = create_app(factory("soft"), KEYS, budget=500, max_batch=64, log_dir=logs,
                     num_classes=10)
    with serve_in_thread(app) as url:
        yield url, app, logs


def post(url: str, body: bytes, key: str | None = "bob-key", ctype: str = NPY,
         **headers: str) -> httpx.Response:
    h = {"Content-Type": ctype, **headers}
    if key is not None:
        h["X-API-Key"] = key
    return httpx.post(f"{url}/v1/predict", content=body, headers=h, timeout=30)


def test_health_describes_the_model(server) -> None:  # noqa: ANN001
    url, _, _ = server
    info = httpx.get(f"{url}/health").json()
    ref = factory("soft")()
    assert info["status"] == "ok"
    assert info["num_classes"] == 10 and info["image_shape"] == [3, 32, 32]
    assert info["mode"] == "soft" and info["max_batch"] == 64
    assert info["fingerprint"] == ref.fingerprint


def test_remote_answers_are_bit_exact_and_counted_on_both_sides(server) -> None:  # noqa: ANN001
    url, app, _ = server
    x = images(150)
    with one_thread():
        expected = factory("soft")().query(x)
        remote = RemoteAPI(url, "alice-key", mode="soft")
        got = remote.query(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)  # bit-exact float32 through the .npy body
    assert remote.queries == 150
    assert app.state.clients["alice"].api.queries == 150
    assert remote.usage() == {"client": "alice", "queries": 150, "budget": 500,
                              "remaining": 350}
    assert remote.fingerprint != factory("soft")().fingerprint  # keyed by URL too
    assert remote.spec()["server"] == factory("soft")().fingerprint


@pytest.mark.parametrize("case,status,error", [
    ("wrong_shape", 422, "wrong_shape"),
    ("wrong_dtype", 422, "wrong_dtype"),
    ("empty", 422, "empty_batch"),
    ("oversized", 413, "batch_too_large"),
    ("huge_body", 413, "batch_too_large"),
    ("unknown_key", 401, "unknown_key"),
    ("no_key", 401, "missing_key"),
    ("not_npy", 400, "bad_payload"),
    ("pickle", 400, "bad_payload"),
    ("json_body", 415, "unsupported_media_type"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(
        server, case: str, status: int, error: str) -> None:  # noqa: ANN001
    url, app, _ = server
    good = to_npy(images(2).numpy())
    before = app.state.clients.get("bob")
    count = before.api.queries if before else 0
    if case == "wrong_shape":
        r = post(url, to_npy(np.zeros((2, 3, 16, 16), np.uint8)))
    elif case == "wrong_dtype":
        r = post(url, to_npy(np.zeros((2, 3, 32, 32), np.float32)))
    elif case == "empty":
        r = post(url, to_npy(np.zeros((0, 3, 32, 32), np.uint8)))
    elif case == "oversized":
        r = post(url, to_npy(np.zeros((65, 3, 32, 32), np.uint8)))
    elif case == "huge_body":  # refused from its Content-Length, before it is read
        r = post(url, to_npy(np.zeros((300, 3, 32, 32), np.uint8)))
    elif case == "unknown_key":
        r = post(url, good, key="mallory")
    elif case == "no_key":
        r = post(url, good, key=None)
    elif case == "not_npy":
        r = post(url, b"hello")
    elif case == "pickle":
        buf = __import__("io").BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        r = post(url, buf.getvalue())
    else:
        r = post(url, b'{"images": []}', ctype="application/json")
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["detail"]
    # nothing counted, and the server still answers a good request
    after = app.state.clients.get("bob")
    assert (after.api.queries if after else 0) == count
    ok = post(url, good)
    assert ok.status_code == 200
    assert from_npy(ok.content).shape == (2, 10)


def test_past_the_budget_is_429_and_raises_in_the_client(tmp_path: Path) -> None:
    app = create_app(factory("hard"), KEYS, budget={"alice": 100, "bob": None},
                     max_batch=64, num_classes=10)
    with serve_in_thread(app) as url:
        remote = RemoteAPI(url, "alice-key", mode="hard")
        assert remote.query(images(90)).dtype == torch.int64
        r = post(url, to_npy(images(20).numpy()), key="alice-key")
        assert r.status_code == 429 and r.json()["error"] == "budget_exceeded"
        with pytest.raises(QueryBudgetExceeded):
            remote.query(images(20))
        assert app.state.clients["alice"].api.queries == 90
        assert remote.query(images(10)).shape == (10,)  # exactly up to the budget
        assert app.state.clients["alice"].api.queries == 100
        assert httpx.get(f"{url}/health").status_code == 200  # still serving
        # a client-side budget refuses before sending anything
        capped = RemoteAPI(url, "bob-key", budget=5)
        with pytest.raises(QueryBudgetExceeded):
            capped.query(images(6))
        assert "bob" not in app.state.clients or app.state.clients["bob"].api.queries == 0
        with pytest.raises(ValueError, match="expects soft"):
            RemoteAPI(url, "bob-key", mode="soft")


class DropFirstAnswer(httpx.HTTPTransport):
    """Sends each predict request, then loses the first answer (as a read timeout after
    the server has answered and counted it)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path == "/v1/predict" and self.dropped == 0:
            response.read()
            self.dropped += 1
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


def test_a_retried_batch_is_not_counted_twice() -> None:
    app = create_app(factory("soft"), KEYS, max_batch=64, num_classes=10)
    with serve_in_thread(app) as url:
        transport = DropFirstAnswer()
        remote = RemoteAPI(url, "alice-key", transport=transport, backoff=0.01)
        x = images(100)
        got = remote.query(x)
        assert transport.dropped == 1
        assert torch.equal(got, factory("soft")().query(x))
        assert remote.queries == 100
        assert app.state.clients["alice"].api.queries == 100  # not 164
        # the same id with other images is refused
        body, other = to_npy(images(3).numpy()), to_npy(images(3, seed=1).numpy())
        assert post(url, body, key="alice-key", **{"X-Request-ID": "r1"}).status_code == 200
        again = post(url, body, key="alice-key", **{"X-Request-ID": "r1"})
        assert again.status_code == 200 and again.headers["X-Replayed"] == "1"
        assert post(url, other, key="alice-key", **{"X-Request-ID": "r1"}).status_code == 409
        assert app.state.clients["alice"].api.queries == 103


def test_unreachable_server_fails_after_its_retries() -> None:
    with pytest.raises(RemoteAPIError, match="transport"):
        RemoteAPI("http://127.0.0.1:9", "k", retries=1, backoff=0.01, timeout=1)


def test_rate_limit_answers_429_with_retry_after_and_the_client_waits() -> None:
    # 8 images/s, bursts of one full batch: a second batch right after the first waits
    app = create_app(factory("soft"), KEYS, max_batch=8, rate_limit=8, num_classes=10)
    with serve_in_thread(app) as url:
        body = to_npy(images(8).numpy())
        responses = [post(url, body, key="alice-key") for _ in range(3)]
        codes = [r.status_code for r in responses]
        assert codes[0] == 200 and 429 in codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.json()["error"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert app.state.clients["alice"].api.queries == 8 * codes.count(200)
        remote = RemoteAPI(url, "bob-key")
        assert remote.query(images(24)).shape == (24, 10)  # waits as told, then done
        assert app.state.clients["bob"].api.queries == remote.queries == 24


def test_per_client_query_logs_and_dawn_logs(tmp_path: Path) -> None:
    app = create_app(factory("hard", DEFENDED), KEYS, max_batch=32, log_dir=tmp_path,
                     num_classes=10)
    with serve_in_thread(app) as url:
        a, b = RemoteAPI(url, "alice-key", mode="honey"), RemoteAPI(url, "bob-key")
        xa, xb = images(70, seed=3), images(20, seed=4)
        ya, _ = a.query(xa), b.query(xb)
        assert a.watermarked is False and len(a.watermark_log()["labels"]) == 0
    log = read_query_log(tmp_path, "alice")
    assert log["count"] == 70 and torch.equal(log["images"], xa)
    assert torch.equal(log["answers"], ya)
    assert log["seq"].tolist() == [0] * 32 + [1] * 32 + [2] * 6
    assert read_query_log(tmp_path, "bob")["count"] == 20
    # each client's DAWN log is its own, as the in-process API's would be
    ref = factory("hard", DEFENDED)()
    assert torch.equal(ref.query(xa), ya)  # the defended answers, as served in-process
    wm = load_artifact(tmp_path / "alice" / "watermark.pt")
    assert wm["seen"] == 70 and len(wm["labels"]) > 0
    assert torch.equal(wm["images"], ref.watermark_log()["images"])
    assert load_artifact(tmp_path / "bob" / "watermark.pt")["seen"] == 20


def test_experiment_make_api_builds_a_remote_api_from_a_url_entry(monkeypatch) -> None:  # noqa: ANN001
    from mextract.compute import Compute
    from mextract.experiment import make_api

    app = create_app(factory("soft"), KEYS, num_classes=10)
    with serve_in_thread(app) as url:
        monkeypatch.setenv("MEXTRACT_TEST_KEY", "alice-key")
        api = make_api(None, {"url": url, "key_env": "MEXTRACT_TEST_KEY", "mode": "soft",
                              "budget": 7}, Compute(device="cpu"))
        assert isinstance(api, RemoteAPI) and api.budget == 7
        monkeypatch.delenv("MEXTRACT_TEST_KEY")
        with pytest.raises(ValueError, match="MEXTRACT_TEST_KEY"):
            make_api(None, {"url": url, "key_env": "MEXTRACT_TEST_KEY", "mode": "soft"},
                     Compute(device="cpu"))


def test_cli_serves_a_config_api_around_a_user_model(tmp_path: Path) -> None:
    """``mextract serve`` builds the app from a config entry (mode and defences) and a
    victim with ``source``; per-client budgets come from the keys file."""
    import subprocess
    import sys

    from mextract.cli import build_server, parser
    from mextract.models import build_model

    torch.manual_seed(0)
    model = build_model("vgg11", 10, 0.125).eval()
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    cfg = {"victims": {"mine": {"arch": "vgg11", "width": 0.125, "source": {
               "type": "state_dict", "path": str(tmp_path / "mine.pt"),
               "classes": [str(i) for i in range(10)]}}},
           "apis": {"guarded": {"mode": "hard", "victim": "mine",
                                "defences": [{"type": "honey", "margin": 1.0}]}},
           "experiments": {"basic": {"stage": 2, "strategy": "basic", "api": "guarded"}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(
        {"auditor": "k1", "partner": {"key": "k2", "budget": 10}}))
    args = parser().parse_args(["serve", "--config", str(tmp_path / "cfg.yaml"), "--api",
                                "guarded", "--keys", str(tmp_path / "keys.yaml"),
                                "--results", str(tmp_path / "results"), "--budget", "1000",
                                "--device", "cpu"])
    app = build_server(args)
    x = images(40)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/health").json()["description"] == "hard+honey(margin=1)"
        got = RemoteAPI(url, "k1", mode="honey").query(x)
        with pytest.raises(QueryBudgetExceeded):
            RemoteAPI(url, "k2").query(x[:11])
        assert app.state.clients["auditor"].api.budget == 1000
    ref = VictimAPI(model, mode="hard", defences=build_defences([{"type": "honey",
                                                                   "margin": 1.0}]))
    assert torch.equal(got, ref.query(x))
    help_text = subprocess.run([sys.executable, "-m", "mextract.cli", "serve", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--keys" in help_text


# --------------------------------------------------------------- the workflow, by URL
def _demo_config(tmp: Path, apis: dict) -> Path:  # noqa: ANN001
    """The demo's kd and basic (nothing else: no matrix, no other experiment) against
    ``apis``."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/demo.yaml").read_text())
    cfg.pop("matrix", None)
    cfg["apis"] = apis
    cfg["experiments"] = {k: cfg["experiments"][k] for k in ("kd", "basic")}
    path = tmp / "config" / "byurl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.workflow
def test_the_demo_attacks_by_url_match_the_in_process_run(demo_run: Path,
                                                          tmp_path: Path) -> None:
    """The demo's kd (soft) and basic (hard) through Snakemake against the demo's victim
    served over HTTP: the same queries as the demo run's in-process APIs (and the
    server's counters agree), the same accuracy and fidelity."""
    targets = [f"results/experiments/{e}/seed0/metrics.json" for e in ("kd", "basic")]
    local = demo_run  # the in-process run: the demo itself
    (tmp_path / "remote").mkdir()

    from mextract.experiment import load_victim

    demo = yaml.safe_load((local / "config/demo.yaml").read_text())
    victim = load_victim(local / "results/victims/clean/model.pt", {
        "arch": demo["victims"]["clean"]["arch"], "width": demo["victims"]["clean"]["width"]},
        10)
    keys = {"auditor": "s3cret"}
    apps = {mode: create_app(lambda m=mode: VictimAPI(victim, mode=m), keys, num_classes=10,
                             log_dir=tmp_path / f"logs-{mode}") for mode in ("soft", "hard")}
    remote = copy_project(tmp_path / "remote")
    with serve_in_thread(apps["soft"]) as soft_url, serve_in_thread(apps["hard"]) as hard_url:
        _demo_config(remote, {
            "soft": {"mode": "soft", "url": soft_url, "key_env": "MEXTRACT_AUDIT_KEY"},
            "hard": {"mode": "hard", "url": hard_url, "key_env": "MEXTRACT_AUDIT_KEY"}})
        os.environ["MEXTRACT_AUDIT_KEY"] = "s3cret"
        try:
            snakemake(remote, *targets, "--cores", "2", "--configfile", "config/byurl.yaml")
        finally:
            del os.environ["MEXTRACT_AUDIT_KEY"]
    assert not (remote / "results" / "victims").exists()  # nothing trained: it was served
    for exp, mode in (("kd", "soft"), ("basic", "hard")):
        a = read_json(local / f"results/experiments/{exp}/seed0/metrics.json")
        b = read_json(remote / f"results/experiments/{exp}/seed0/metrics.json")
        evaluation = read_json(remote / f"results/remote/{mode}/evaluation.json")
        served = apps[mode].state.clients["auditor"].api.queries
        assert b["queries"] == a["queries"] > 0
        assert served == b["queries"] + evaluation["evaluation_queries"]
        assert read_query_log(tmp_path / f"logs-{mode}", "auditor")["count"] == served
        for key in ("test_accuracy", "fidelity", "fidelity_on_victim_errors"):
            assert b[key] == pytest.approx(a[key], abs=1e-12), (exp, key)
        assert b["victim"] == f"remote:{mode}"
