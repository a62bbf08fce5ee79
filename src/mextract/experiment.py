"""Run one extraction experiment end to end (used by the workflow's attack rule).

Stage-3 experiments are also *verified* (:func:`verify_substitute`): the trigger
watermark's WSR, DAWN verification against the defender's watermark log, and the
defended API's accuracy for honest users next to the undefended victim's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mextract.api import VictimAPI
from mextract.attacks import registry
from mextract.attacks.base import AttackContext, AttackResult
from mextract.compute import Compute
from mextract.defences import build_defences, dawn_key
from mextract.metrics import agreement, evaluator, predict
from mextract.models import build_model
from mextract.pools import build_pool
from mextract.train import TrainConfig
from mextract.watermark import dawn_verify, merge_logs, trigger_scores


def live_budget(params: dict[str, Any]) -> int | None:
    """The live queries an adaptive strategy may ask, enforced by its API: ``budget``,
    or ``pairs * steps`` for the segment-probing strategies (boundary,
    random_boundary); None when its parameters set no limit."""
    if "budget" in params:
        return int(params["budget"])
    if "pairs" in params and "steps" in params:
        return int(params["pairs"]) * int(params["steps"])
    return None


def check_answers(strategy: str, api: VictimAPI) -> None:
    """The API gives the kind of answer the strategy needs: the registry's ``answers``
    ("soft" or "hard"; "any" follows the API, e.g. the ``random`` baseline)."""
    needs = registry.get(strategy).answers
    gives = "soft" if api.mode == "soft" else "hard"
    if needs not in (None, "any") and needs != gives:
        raise ValueError(f"strategy '{strategy}' needs {needs} answers; the API gives "
                         f"{gives} ({api.description})")


def make_api(victim: nn.Module | None, api_cfg: dict[str, Any], compute: Compute,
             defence_models: Mapping[str, nn.Module] | None = None) -> VictimAPI:
    """A victim API from its config entry (mode, defences, budget); ``defence_models``
    are the models of its layers that need one (MAD's surrogate, adaptive
    misinformation's model), by :func:`mextract.defence_specs.model_key`. An entry with
    ``url`` is a served API (``mextract serve``): a :class:`mextract.remote.RemoteAPI`
    with the key from the environment variable named by ``key_env`` (no victim)."""
    if "url" in api_cfg:
        import os

        from mextract.remote import RemoteAPI

        key_env = api_cfg.get("key_env") or ""
        if key_env not in os.environ:
            raise ValueError(f"the API at {api_cfg['url']} needs its key in the "
                             f"environment variable {key_env!r}, which is not set")
        return RemoteAPI(api_cfg["url"], os.environ[key_env], mode=api_cfg.get("mode"),
                         budget=api_cfg.get("budget"),
                         batch_size=api_cfg.get("batch_size"))  # type: ignore[return-value]
    if victim is None:
        raise ValueError("an API needs the victim model")
    return VictimAPI(victim, mode=api_cfg["mode"], budget=api_cfg.get("budget"),
                     defences=build_defences(api_cfg.get("defences"), defence_models),
                     compute=compute, batch_size=int(api_cfg.get("batch_size", 1024)))


def load_defence_models(paths: Sequence[str | Path], defences: Sequence[Mapping[str, Any]],
                        num_classes: int) -> dict[str, nn.Module]:
    """The trained models of an API's layers, from the files named ``<model key>.pt``
    among ``paths`` (others are skipped; a missing one makes the layer refuse to build)."""
    from mextract.defence_models import load_defence_model
    from mextract.defence_specs import required_models

    specs = required_models([dict(d) for d in defences])
    return {Path(p).stem: load_defence_model(p, specs[Path(p).stem], num_classes)
            for p in paths if Path(p).stem in specs}


def query_stream(pool: torch.Tensor, cache: Mapping[str, Any] | None, api: Any,
                 query_log: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """What the API saw from this attacker, in order: the shared cache's queries (asked
    first, in cache order), then the live queries (from the query log when the job
    replayed one, else as the :class:`~mextract.querylog.RecordingAPI` recorded them)."""
    from mextract.queries import cache_images
    from mextract.querylog import RecordingAPI, join_streams

    cached = None
    if cache is not None:
        cached = {"images": cache_images(pool, dict(cache)), "answers": cache["answers"]}
    live = (query_log or {}).get("stream")
    if live is None and isinstance(api, RecordingAPI):
        live = api.stream()
    return join_streams(cached, live)


def detect_stream(stream: Mapping[str, torch.Tensor], detect: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """PRADA (:mod:`mextract.detection`) on an attacker's query stream (its first
    ``max_queries``): the 1-based index of the query at which it flagged, or None."""
    from mextract.detection import queries_to_flag

    answers = stream["answers"]
    classes = answers.argmax(dim=1) if answers.dim() == 2 else answers.long()
    n = min(len(classes), int(detect["max_queries"]))
    flagged = queries_to_flag(stream["images"][:n], classes[:n], **prada_kwargs(detect))
    return {"prada_flagged_at": flagged, "prada_examined": n,
            "stream_queries": int(len(classes))}


def prada_kwargs(detect: Mapping[str, Any]) -> dict[str, Any]:
    """The PRADA detector's parameters from a config's ``matrix.detection``."""
    return {k: detect[k] for k in ("delta", "min_distances", "check_every")}


def run_experiment(*, strategy: str, params: dict[str, Any], data: dict[str, Any],
                   split: dict[str, torch.Tensor], victim_test_pred: torch.Tensor,
                   substitute: dict[str, Any], train_cfg: dict[str, Any], compute: Compute,
                   seed: int, workdir: str | Path, cache: dict[str, Any] | None = None,
                   victim: nn.Module | None = None, api_cfg: dict[str, Any] | None = None,
                   verify: dict[str, Any] | None = None,
                   watermark_logs: Sequence[dict[str, Any]] = (),
                   verify_victim: nn.Module | None = None,
                   defence_models: Mapping[str, nn.Module] | None = None,
                   detect: Mapping[str, Any] | None = None,
                   pool: dict[str, Any] | None = None,
                   ) -> tuple[AttackResult, dict[str, Any]]:
    """Build the attacker's context, run the strategy, score the substitute.

    An adaptive strategy's live API that carries a DAWN layer leaves its watermark log
    in ``workdir/watermark.pt``. With ``verify`` (keys ``trigger``: {target, size},
    ``significance``, ``api``: the config of the API whose watermark is checked or None,
    ``live_log``: whether this experiment's own live API log belongs to it), the
    substitute is verified by :func:`verify_substitute` against ``watermark_logs`` (the
    defender's logs, e.g. of the query cache it trained from) plus the live log, and
    ``verify_victim`` (the checked API's victim) gives the API's honest-user accuracy.
    With ``detect`` (a config's ``matrix.detection``), PRADA examines the attacker's
    query stream (:func:`query_stream`, :func:`detect_stream`).
    ``pool``: the experiment's ``pool`` config entry (:func:`mextract.pools.build_pool`;
    None or ``{source: split}``: the split's attacker half); the metrics name it.
    """
    t0 = time.perf_counter()
    info = registry.get(strategy)
    params = {**info.defaults, **(params or {})}
    num_classes = len(data["classes"])
    cfg = TrainConfig.from_dict(train_cfg)
    api = None
    if info.adaptive:
        api_cfg = dict(api_cfg or {})
        budget = live_budget(params)
        if budget is not None:  # the API itself enforces the strategy's budget
            api_cfg["budget"] = budget
        api = make_api(victim, api_cfg, compute, defence_models)
        check_answers(strategy, api)
        if detect is not None:
            from mextract.querylog import RecordingAPI

            api = RecordingAPI(api, limit=int(detect["max_queries"]))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    split_pool = data["x_train"][split["pool"]]
    pool_images, pool_description = build_pool(
        pool, image_size=int(split_pool.shape[-1]), count=len(split_pool),
        split_pool=split_pool)
    ctx = AttackContext(
        pool=pool_images,
        pool_labels=data["y_train"][split["pool"]] if strategy == "control" else None,
        num_classes=num_classes,
        new_substitute=lambda: build_model(substitute["arch"], num_classes,
                                           substitute.get("width")),
        train_cfg=cfg, compute=compute,
        evaluate=evaluator(data["x_test"], data["y_test"], victim_test_pred, compute),
        seed=seed, cache=cache, api=api, workdir=workdir,
        augment=train_cfg.get("augment", "crop_flip"),
    )
    result = registry.load(strategy).run(ctx, params)
    # queries a strategy took from its saved query log (mextract.querylog) instead of
    # asking: all of them when a complete log was reused, a partial log's on a resume
    replayed = int(result.extra.get("replayed_queries", 0))
    cached = int((cache or {}).get("count", 0)) if api is not None else 0
    if api is not None and result.queries != api.queries + replayed + cached:
        raise RuntimeError(f"{strategy} reported {result.queries} queries but the API "
                           f"answered {api.queries} (+ {replayed} from its query log, "
                           f"+ {cached} from the shared cache)")
    logs = list(watermark_logs)
    if api is not None and api.watermarked:
        from mextract.io import save_artifact

        # the defender's log of every query in the strategy's log (kept with it, so a
        # replayed or resumed log leaves the evidence of the job that asked)
        qlog = result.query_log or {}
        live_log = qlog.get("watermark") or api.watermark_log()
        save_artifact(live_log, workdir / "watermark.pt")
        if verify and verify.get("live_log"):
            logs.append(live_log)
    final = ctx.evaluate(result.model)
    detection = ({} if detect is None else
                 detect_stream(query_stream(ctx.pool, cache, api, result.query_log), detect))
    checks: dict[str, Any] = {}
    if verify is not None:
        checks = verify_substitute(
            result.model, data=data, compute=compute, trigger=verify["trigger"],
            api_cfg=verify.get("api"), logs=logs,
            significance=float(verify.get("significance", 0.01)), victim=verify_victim)
    metrics = {
        "strategy": strategy,
        "params": params,
        "api": (api.description if api is not None else (cache or {}).get("api", "none")),
        "queries": int(result.queries),
        "pool": pool_description,
        **final,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "compute": compute.as_dict(),
        **checks,
        **detection,
        **result.extra,
    }
    return result, metrics


def api_honest_accuracy(victim: nn.Module, api_cfg: dict[str, Any], x_test: torch.Tensor,
                        y_test: torch.Tensor, compute: Compute,
                        defence_models: Mapping[str, nn.Module] | None = None,
                        ) -> dict[str, float]:
    """The cost of an API's defences to honest users: the accuracy of its answers on the
    test set (a fresh instance, so no attacker's count or log changes), next to the
    undefended victim's accuracy and the share of answers the defences changed; for
    soft answers also ``api_l1_distortion``, the mean L1 distance between the served
    and the undefended probability vectors (0 to 2)."""
    api = make_api(victim, {**api_cfg, "budget": None}, compute, defence_models)
    served = api.query(x_test)
    out: dict[str, float] = {}
    if served.is_floating_point():
        clean = torch.softmax(api.logits(api_input(x_test)), dim=1)
        out["api_l1_distortion"] = float((served - clean).abs().sum(dim=1).mean())
        served = served.argmax(dim=1)
    plain = predict(api.model, x_test, compute)
    return {"api_honest_accuracy": agreement(served, y_test),
            "api_victim_accuracy": agreement(plain, y_test),
            "api_changed_answers": 1.0 - agreement(served, plain), **out}


def api_input(images: torch.Tensor) -> torch.Tensor:
    """Images as the API receives them (uint8)."""
    from mextract.api import quantize

    return quantize(images)


def verify_substitute(model: nn.Module, *, data: dict[str, Any], compute: Compute,
                      trigger: dict[str, int], api_cfg: dict[str, Any] | None = None,
                      logs: Sequence[dict[str, Any]] = (), significance: float = 0.01,
                      victim: nn.Module | None = None) -> dict[str, Any]:
    """Stage-3 checks of a model (a substitute or a no-theft control).

    * ``trigger_wsr``: the share of *all* trigger-stamped test images the model assigns
      to the target (the reference study's definition, compared with the study), and
      ``trigger_wsr_nontarget``: the share among stamped images whose true class is not
      the target (:func:`mextract.watermark.trigger_scores` with ``trigger``);
    * ``dawn_*``: when ``api_cfg`` has a DAWN layer, :func:`mextract.watermark.dawn_verify`
      of the model's predictions on the merged ``logs`` with that layer's key, at level
      ``significance`` (None values when the API has no DAWN layer);
    * ``api_honest_accuracy`` etc.: :func:`api_honest_accuracy` of ``api_cfg`` around
      ``victim`` (needs both).
    """
    out: dict[str, Any] = {
        **trigger_scores(model, data["x_test"], data["y_test"], compute,
                         target=int(trigger["target"]), size=int(trigger["size"])),
        "trigger_target": int(trigger["target"]),
    }
    key = dawn_key((api_cfg or {}).get("defences"))
    if key is None:
        out.update({"dawn_marked": 0, "dawn_checked": 0, "dawn_agreement": None,
                    "dawn_p_value": None, "dawn_verified": None})
    else:
        log = merge_logs(logs)
        pred = (predict(model, log["images"], compute) if len(log["images"])
                else torch.zeros(0, dtype=torch.int64))
        out.update(dawn_verify(pred, log, key, significance))
        out["dawn_significance"] = significance
    if api_cfg is not None and victim is not None:
        out.update(api_honest_accuracy(victim, api_cfg, data["x_test"], data["y_test"],
                                       compute))
    return out


def load_victim(path: str | Path, victim_cfg: dict[str, Any], num_classes: int) -> nn.Module:
    """Rebuild a victim from its config entry and load its weights (weights_only); a
    victim with ``source`` (a user's model) loads through :func:`mextract.byo.load_byo`."""
    from mextract.io import load_artifact

    if "source" in victim_cfg:
        from mextract.byo import load_byo

        return load_byo(path, victim_cfg, num_classes)

    model = build_model(victim_cfg["arch"], num_classes, victim_cfg.get("width"))
    model.load_state_dict(load_artifact(path))
    return model.eval()
