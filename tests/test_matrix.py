"""The defence matrix: config expansion into cells (mextract.config), the attacker's
query stream kept for detection (mextract.querylog.RecordingAPI, experiment.query_stream)
and the matrix's tables (mextract.matrix). Plain function calls, no Snakemake."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from conftest import ROOT, TinyVictim

from mextract import config as mc
from mextract import matrix
from mextract.api import VictimAPI
from mextract.experiment import query_stream
from mextract.querylog import QueryLogStore, RecordingAPI

DEMO = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
DEMO.pop("matrix", None)

MATRIX = {
    "defences": {"none": [], "topk1": [{"type": "topk", "k": 1}],
                 "honey": [{"type": "honey", "margin": 1.0}]},
    "attacks": ["kd", "basic", "active_learning"],
}


def prepared(**matrix_changes) -> dict:
    cfg = copy.deepcopy(DEMO)
    cfg["matrix"] = {**copy.deepcopy(MATRIX), **matrix_changes}
    return mc.prepare(cfg)


def cells(cfg) -> dict[tuple[str, str], dict]:
    return {(c["defence"], c["attack"]): c for c in mc.matrix_cells(cfg)}


def test_cells_soft_attacks_only_against_probability_stacks():
    got = cells(prepared())
    assert ("honey", "kd") not in got  # a label layer has no soft answer to change
    assert {("honey", "basic"), ("honey", "active_learning"), ("topk1", "kd")} <= set(got)
    assert len(got) == 3 * 3 - 1


def test_undefended_cell_is_the_attack_itself_and_equal_answers_share_an_api():
    got = cells(prepared())
    assert got[("none", "kd")]["experiment"] == "kd" and got[("none", "kd")]["shared"]
    # top-1 truncation keeps the top-1 label: a hard-label API behind it answers exactly
    # what the undefended one does, so the cell is the attack's own experiment
    assert got[("topk1", "basic")]["experiment"] == "basic"
    assert got[("topk1", "basic")]["api"] == "hard"
    # against soft answers it is a new API and a new job
    assert got[("topk1", "kd")]["experiment"] == "mx.topk1.kd"
    assert got[("topk1", "kd")]["api"] == "mx-topk1-soft"
    cfg = prepared()
    assert cfg["apis"]["mx-topk1-soft"]["defences"] == [{"type": "topk", "k": 1}]
    assert cfg["apis"]["mx-honey-hard"]["mode"] == "hard"
    # two names for one stack: one API, one query cache
    twin = prepared(defences={**MATRIX["defences"], "honey_b": [{"type": "honey",
                                                                  "margin": 1.0}]})
    got = cells(twin)
    assert got[("honey", "basic")]["api"] == got[("honey_b", "basic")]["api"]
    assert mc.query_cache(twin, got[("honey", "basic")]["experiment"]) == \
        mc.query_cache(twin, got[("honey_b", "basic")]["experiment"])


def test_cells_copy_the_attack_and_get_no_random_baseline():
    cfg = prepared()
    cell = cfg["experiments"]["mx.honey.active_learning"]
    orig = cfg["experiments"]["active_learning"]
    assert cell["params"] == orig["params"] and cell["stage"] == orig["stage"]
    assert cell["matrix"] == {"attack": "active_learning", "defence": "honey"}
    assert "baseline" not in cell and "mx.honey.active_learning-random" not in cfg["experiments"]
    assert orig["baseline"] == "active_learning-random"


def test_train_override_makes_every_cell_its_own_job():
    cfg = prepared(train={"epochs": 3})
    got = cells(cfg)
    assert got[("none", "kd")]["experiment"] == "mx.none.kd"
    assert cfg["experiments"]["mx.none.kd"]["train"] == {"epochs": 3}
    assert mc.attack_settings(cfg, "mx.none.kd", 0)["train"]["epochs"] == 3
    assert mc.attack_settings(cfg, "kd", 0)["train"]["epochs"] == DEMO["substitute"]["train"][
        "epochs"]


def test_matrix_cells_stay_out_of_the_results_table_and_stage_plots():
    cfg = prepared()
    assert "mx.honey.basic" in cfg["experiments"]
    assert "mx.honey.basic" not in mc.table_experiments(cfg)
    assert all(not e.startswith("mx.") for e in mc.stage_experiments(cfg, 2))
    files = mc.matrix_metric_files(cfg)
    assert f"{mc.experiment_dir('mx.honey.basic', 0)}/metrics.json" in files
    assert f"{mc.experiment_dir('control-s2', 0)}/metrics.json" in files


def test_prepare_is_idempotent_with_a_matrix():
    cfg = prepared()
    assert mc.prepare(copy.deepcopy(cfg)) == cfg


def test_detection_settings_only_on_the_listed_attacks():
    cfg = prepared()
    assert mc.attack_settings(cfg, "kd", 0)["detect"]["delta"] == \
        cfg["matrix"]["detection"]["delta"]
    assert "detect" not in mc.attack_settings(cfg, "mx.honey.basic", 0)
    # a config without a matrix: the settings are what they were before matrices
    plain = mc.prepare(copy.deepcopy(DEMO))
    assert "detect" not in mc.attack_settings(plain, "kd", 0)
    assert "matrix" not in mc.attack_settings(plain, "kd", 0)


@pytest.mark.parametrize(("change", "needle"), [
    ({"attacks": ["nope"]}, "'nope' is not an entry of 'experiments'"),
    ({"attacks": ["control-s1"]}, "'control-s1' never queries"),
    ({"attacks": ["basic-s3"]}, "already has defence layers"),
    ({"defences": {"x": [{"type": "honey", "margn": 1}]}}, "matrix.defences.x.0"),
])
def test_bad_matrix_names_the_key(change, needle):
    with pytest.raises(mc.ConfigError, match=needle):
        prepared(**change)


def test_matrix_prefix_is_reserved():
    cfg = copy.deepcopy(DEMO)
    cfg["matrix"] = copy.deepcopy(MATRIX)
    cfg["experiments"]["mx.mine"] = {"stage": 1, "strategy": "control"}
    with pytest.raises(mc.ConfigError, match="reserved for the defence matrix"):
        mc.prepare(cfg)


# ------------------------------------------------------------------ query streams
def test_recording_api_keeps_the_stream_in_order_and_the_log_keeps_it(tmp_path):
    api = RecordingAPI(VictimAPI(TinyVictim(), mode="hard", budget=50))
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen)
    store = QueryLogStore(api, tmp_path, "random", {"budget": 30}, seed=0, pool=pool)
    a = api.query(pool[:10])
    b = api.query(pool[20:30])
    assert api.queries == 20 and api.budget == 50  # the wrapped API's counter and budget
    stream = api.stream()
    assert torch.equal(stream["images"], torch.cat([pool[:10], pool[20:30]]))
    assert torch.equal(stream["answers"], torch.cat([a, b]))
    log = store.save({"indices": torch.arange(20)}, complete=True)
    assert torch.equal(log["stream"]["images"], stream["images"])
    # a rerun replays the log, stream included; one that keeps no stream ignores it
    again = QueryLogStore(RecordingAPI(VictimAPI(TinyVictim(), mode="hard")), tmp_path,
                          "random", {"budget": 30}, seed=0, pool=pool)
    assert torch.equal(again.reuse()["stream"]["answers"], stream["answers"])
    plain_store = QueryLogStore(VictimAPI(TinyVictim(), mode="hard"), tmp_path, "random",
                                {"budget": 30}, seed=0, pool=pool)
    plain_store.save({"indices": torch.arange(0)}, complete=True)
    third = QueryLogStore(RecordingAPI(VictimAPI(TinyVictim(), mode="hard")), tmp_path,
                          "random", {"budget": 30}, seed=0, pool=pool)
    assert third.reuse() is None  # no stream in it: the job asks again to have one


def test_recording_keeps_only_the_examined_prefix():
    api = RecordingAPI(VictimAPI(TinyVictim(), mode="soft"), limit=7)
    pool = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    api.query(pool[:5])
    api.query(pool[5:])
    assert api.queries == 12  # every query is answered and counted
    assert torch.equal(api.stream()["images"], pool[:7])
    assert api.stream()["answers"].shape == (7, 10)


def test_query_stream_is_the_cache_then_the_live_queries():
    pool = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    cache = {"query_set": "pool", "indices": torch.arange(12),
             "answers": torch.arange(12) % 3, "kind": "hard", "count": 12}
    api = RecordingAPI(VictimAPI(TinyVictim(), mode="hard"))
    live = api.query(pool[:4])
    stream = query_stream(pool, cache, api, None)
    assert torch.equal(stream["images"], torch.cat([pool, pool[:4]]))
    assert torch.equal(stream["answers"], torch.cat([cache["answers"], live]))
    replayed = {"stream": {"images": pool[5:7], "answers": torch.tensor([1, 2])}}
    assert torch.equal(query_stream(pool, None, api, replayed)["images"], pool[5:7])


# ------------------------------------------------------------------ tables
def _metrics(exp: str, strategy: str, stage: int, fids: list[float]) -> list[dict]:
    return [{"experiment": exp, "strategy": strategy, "stage": stage, "seed": s,
             "fidelity": f, "test_accuracy": f - 0.1, "queries": 100}
            for s, f in enumerate(fids)]


def test_matrix_table_gain_drop_and_protection_per_point():
    cfg = prepared()
    got = mc.matrix_cells(cfg)
    metrics = (_metrics("control-s1", "control", 1, [0.70, 0.72])
               + _metrics("control-s2", "control", 2, [0.70, 0.70])
               + _metrics("kd", "kd", 1, [0.90, 0.92])
               + _metrics("mx.topk1.kd", "kd", 1, [0.80, 0.80])
               + _metrics("basic", "basic", 2, [0.85, 0.85])
               + _metrics("mx.honey.basic", "basic", 2, [0.75, 0.75])
               + _metrics("active_learning", "active_learning", 2, [0.80])
               + _metrics("mx.honey.active_learning", "active_learning", 2, [0.70]))
    costs = {
        "soft": {"api_honest_accuracy": 0.9, "api_victim_accuracy": 0.9, "defences": [],
                 "api_l1_distortion": 0.0, "api_changed_answers": 0.0},
        "hard": {"api_honest_accuracy": 0.9, "api_victim_accuracy": 0.9, "defences": [],
                 "api_changed_answers": 0.0},
        "mx-topk1-soft": {"api_honest_accuracy": 0.9, "api_victim_accuracy": 0.9,
                          "defences": [{"type": "topk"}], "api_l1_distortion": 0.2,
                          "api_changed_answers": 0.0},
        "mx-honey-hard": {"api_honest_accuracy": 0.85, "api_victim_accuracy": 0.9,
                          "defences": [{"type": "honey"}], "api_changed_answers": 0.1},
    }
    table = matrix.matrix_table(got, metrics, costs)
    row = table.set_index(["defence", "attack"])
    assert row.loc[("none", "kd"), "n"] == 2
    assert row.loc[("none", "kd"), "gain_over_control_pp"] == pytest.approx(20.0)
    assert row.loc[("topk1", "kd"), "fidelity_drop_pp"] == pytest.approx(11.0)
    assert row.loc[("honey", "basic"), "fidelity_drop_pp"] == pytest.approx(10.0)
    summary_rows = matrix.defence_summary(table, costs)
    summary = summary_rows.set_index(["defence", "answers"])
    # honey: best hard attacker 0.75 (basic) vs 0.85 undefended = 10 pp for 5 pp accuracy
    assert summary.loc[("honey", "hard"), "protection_per_point"] == pytest.approx(2.0)
    # top-1 truncation costs honest (top-1) accuracy nothing and protects: infinite
    assert math.isinf(summary.loc[("topk1", "soft"), "protection_per_point"])
    det = matrix.detection_table(
        [{"experiment": "kd", "seed": 0, "strategy": "kd", "stream_queries": 900,
          "prada_examined": 500, "prada_flagged_at": None},
         {"experiment": "active_learning", "seed": 0, "strategy": "active_learning",
          "stream_queries": 300, "prada_examined": 300, "prada_flagged_at": 120}],
        {"fpr": 0.04, "clients": 50, "queries_per_client": 200})
    md = matrix.to_markdown(table, summary_rows, det)
    assert "| honey | basic | hard | 2 | 75.0 ± 0.0 | +5.0 | +10.0 |" in md
    assert "| active_learning | 0 | 300 | 300 | 120 | 4.0%" in md
