"""The project's own benchmark: how close the real training loop and the real query path
come to the raw speed of the model on this machine, and a summary of workflow timings.

Three commands (``python -m mextract.bench --help``)::

    python -m mextract.bench [run] --model vgg11 --width 0.25 --batch 256 [--json PATH]
    python -m mextract.bench augment --model resnet18 --width 16 --batch 256
    python -m mextract.bench summarize results/benchmarks [--json PATH]

``run`` measures, interleaved in one process (``--reps`` repetitions, medians):

* **raw training**: forward + cross-entropy + backward + SGD step of the model on a
  synthetic float batch already on the device, nothing else;
* **the training loop**: :func:`mextract.train.train` for one epoch on uint8 images
  (``--data`` or synthetic) with its augmentation (``--augment``: ``crop_flip``, the
  substitutes' recipe, by default; ``victim`` = TrivialAugmentWide + crop + flip;
  ``none``), without evaluation or checkpoints;
* **raw inference**: the model under ``torch.inference_mode`` on float batches of the
  API's batch size already on the device;
* **query collection**: :func:`mextract.queries.collect` of uint8 images through
  :class:`mextract.api.VictimAPI` in ``soft`` mode and in ``hard`` mode with the
  :class:`mextract.defences.HoneyLabels` layer.

``train_ratio`` = loop / raw training throughput; ``query_ratio_soft`` and
``query_ratio_honey`` = API / raw inference throughput, ``query_ratio`` the smaller of
the two. Each ratio is the median over repetitions of the ratio *within* a
repetition (the two sides run back to back, so a change of the machine's load hits
both; the order alternates between repetitions, and each side starts warm). The
``*_cpu`` keys give the same ratios in CPU seconds of the process, which waiting for
a busy core does not inflate (with one thread; with several, threads spinning at
barriers add their own noise).

``augment`` compares ways of running TrivialAugmentWide (which torchvision applies per
image) in the victim's training loop: per image inline, per image in a background
thread, per image in DataLoader worker processes, and batched
(:func:`mextract.augment.trivial_augment`) inline or in a background thread.

``summarize`` reads Snakemake ``benchmark:`` files (``results/benchmarks/**.tsv``) and
prints, per rule and job, wall seconds, CPU seconds, max RSS and CPU use.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mextract.compute import Compute

COMMANDS = ("run", "augment", "summarize")


# ----------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the progress bars of the library calls being timed."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads) of ``fn()``."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            # OpenMP's idle threads spin (ACTIVE, the default) or sleep
                            # (PASSIVE): a 4x difference on a loaded machine
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def bench_data(path: str | None, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``n`` uint8 training images and labels: the first ``n`` of a cached data set
    (``results/data/dataset.pt``, repeated if it is smaller) or synthetic images."""
    if path:
        from mextract.data import load_dataset

        data = load_dataset(path)
        x, y = data["x_train"], data["y_train"]
        reps = -(-n // len(x))
        return x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n], len(data["classes"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, 10, (n,), generator=gen), 10


# ----------------------------------------------------------------- training
def raw_train_step(model: nn.Module, compute: Compute,
                   batch: int, num_classes: int) -> Callable[[int], None]:
    """``steps -> None``: that many bare training steps on one synthetic device batch."""
    device = compute.torch_device
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(
        memory_format=compute.memory_format)
    y = torch.randint(0, num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    forward = compute.compiled(model)

    def run(steps: int) -> None:
        model.train()
        for _ in range(steps):
            with compute.autocast():
                loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def loop_augment(name: str, compute: Compute) -> Callable[[torch.Tensor, torch.Generator],
                                                          torch.Tensor] | None:
    """The training loop's augmentation by name (see the module docstring)."""
    from mextract.augment import crop_flip, trivial_augment, trivial_augment_per_image

    if name == "none":
        return None
    if name == "crop_flip":
        return lambda xb, gen: crop_flip(compute.images(xb), gen)
    if name == "victim":
        return lambda xb, gen: crop_flip(compute.images(trivial_augment(xb, gen)), gen)
    if name == "victim-per-image":
        return lambda xb, gen: crop_flip(
            compute.images(trivial_augment_per_image(xb.cpu(), gen)), gen)
    raise ValueError(f"unknown augment {name!r}")


def loop_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compute: Compute,
               batch: int, augment: str, prefetch: bool | None = None) -> Callable[[], None]:
    """One epoch of :func:`mextract.train.train` over ``x`` (no evaluation/checkpoint)."""
    from mextract.train import TrainConfig, cross_entropy, train

    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3)
    aug = loop_augment(augment, compute)

    def run() -> None:
        with _quiet():
            train(model, x, {"y": y}, cross_entropy(), cfg, compute, seed=0, augment=aug,
                  prefetch=prefetch)

    return run


def bench_run(args: argparse.Namespace) -> dict[str, Any]:
    from mextract.api import VictimAPI
    from mextract.models import build_model
    from mextract.queries import collect

    compute = make_compute(args)
    device = compute.torch_device
    n_train = args.steps * args.batch
    n_query = args.query_batches * args.query_batch
    x, y, num_classes = bench_data(args.data, max(n_train, n_query), seed=args.seed)
    x_train, y_train, x_query = x[:n_train], y[:n_train], x[:n_query]
    torch.manual_seed(args.seed)
    model = compute.prepare(build_model(args.model, num_classes, args.width))
    raw = raw_train_step(model, compute, args.batch, num_classes)
    loop = loop_train(model, x_train, y_train, compute, args.batch, args.augment)

    x_inf = torch.rand(args.query_batch, 3, 32, 32, device=device).contiguous(
        memory_format=compute.memory_format)

    def raw_infer() -> None:
        model.eval()
        with torch.inference_mode(), compute.autocast():
            for _ in range(args.query_batches):
                model(x_inf).float()

    apis = {"soft": VictimAPI(model, mode="soft", compute=compute, batch_size=args.query_batch),
            "honey": VictimAPI(model, mode="honey", compute=compute,
                               batch_size=args.query_batch)}

    def query(mode: str) -> Callable[[], None]:
        def run() -> None:
            with _quiet():
                collect(apis[mode], x_query, "pool")
        return run

    load_before = load_avg()
    # warm-up (allocator, oneDNN primitive caches, lazy inits); not timed
    raw(1)
    loop_train(model, x_train[:2 * args.batch], y_train[:2 * args.batch], compute,
               args.batch, args.augment)()
    raw_infer()
    query("soft")()
    query("honey")()

    rows: list[dict[str, float]] = []
    jobs = {"raw": lambda: raw(args.steps), "loop": loop, "inf": raw_infer,
            "soft": query("soft"), "honey": query("honey")}
    small_infer = x_inf[:min(len(x_inf), 64)]

    def infer_warmup() -> None:
        model.eval()
        with torch.inference_mode(), compute.autocast():
            model(small_infer)

    for rep in range(args.reps):
        # The first training step after inference (and the first inference after
        # training) pays a one-off cost (the CPU backend re-prepares the changed weights),
        # so each half starts with an untimed step of its kind; and the order alternates
        # (odd repetitions run the library path first).
        timed = {}
        for half, warmup in ((("raw", "loop"), lambda: raw(1)),
                             (("inf", "soft", "honey"), infer_warmup)):
            warmup()
            for name in (half if rep % 2 == 0 else half[::-1]):
                timed[name] = _timed(jobs[name], device)
        (t_raw, c_raw), (t_loop, c_loop) = timed["raw"], timed["loop"]
        (t_inf, c_inf), (t_soft, c_soft) = timed["inf"], timed["soft"]
        (t_honey, c_honey) = timed["honey"]
        row = {"train_raw_ips": n_train / t_raw, "train_loop_ips": n_train / t_loop,
               "infer_raw_ips": n_query / t_inf, "query_soft_ips": n_query / t_soft,
               "query_honey_ips": n_query / t_honey}
        row["train_ratio"] = t_raw / t_loop
        row["query_ratio_soft"] = t_inf / t_soft
        row["query_ratio_honey"] = t_inf / t_honey
        # the same ratios in CPU seconds of this process: on a loaded machine, less
        # sensitive to waiting for a core than wall time
        row["train_ratio_cpu"] = c_raw / c_loop
        row["query_ratio_soft_cpu"] = c_inf / c_soft
        row["query_ratio_honey_cpu"] = c_inf / c_honey
        rows.append(row)
        if args.verbose:
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{k}={v:.3g}" for k, v in row.items()), file=sys.stderr, flush=True)
    med = {k: _median([r[k] for r in rows]) for k in rows[0]}
    med["query_ratio"] = min(med["query_ratio_soft"], med["query_ratio_honey"])
    med["query_ratio_cpu"] = min(med["query_ratio_soft_cpu"], med["query_ratio_honey_cpu"])
    return {
        **{k: round(v, 4) for k, v in med.items()},
        "model": args.model, "width": args.width, "batch": args.batch,
        "augment": args.augment, "data": args.data or "synthetic uint8",
        "steps": args.steps, "reps": args.reps,
        "query_batch": args.query_batch, "query_images": n_query,
        "compute": compute.as_dict(), "machine": machine(),
        "load_avg_before": load_before, "load_avg_after": load_avg(),
        "per_rep": [{k: round(v, 4) for k, v in r.items()} for r in rows],
        "command": "python -m mextract.bench " + " ".join(sys.argv[1:]),
    }


def format_run(res: dict[str, Any]) -> str:
    lines = [
        f"model {res['model']} width {res['width']:g}, batch {res['batch']}, "
        f"{res['compute']['device']}, {res['machine']['threads']} threads "
        f"(OMP_WAIT_POLICY {res['machine']['omp_wait_policy']}), "
        f"amp={res['compute']['amp']}, channels_last={res['compute']['channels_last']}, "
        f"data: {res['data']}, medians of {res['reps']} reps",
        "",
        "| path | images/s | ratio |",
        "|---|---:|---:|",
        f"| raw training step (synthetic, on device) | {res['train_raw_ips']:.0f} | |",
        f"| mextract.train.train, augment={res['augment']} | {res['train_loop_ips']:.0f} "
        f"| train_ratio {res['train_ratio']:.3f} |",
        f"| raw inference (batch {res['query_batch']}) | {res['infer_raw_ips']:.0f} | |",
        f"| queries.collect via VictimAPI soft | {res['query_soft_ips']:.0f} "
        f"| {res['query_ratio_soft']:.3f} |",
        f"| queries.collect via VictimAPI hard + HoneyLabels | {res['query_honey_ips']:.0f} "
        f"| {res['query_ratio_honey']:.3f} |",
        f"| query_ratio (smaller of the two) | | {res['query_ratio']:.3f} |",
        "",
        f"in CPU seconds of this process: train_ratio {res['train_ratio_cpu']:.3f}, "
        f"query_ratio {res['query_ratio_cpu']:.3f} (soft {res['query_ratio_soft_cpu']:.3f}, "
        f"honey {res['query_ratio_honey_cpu']:.3f})",
        f"load average before {res['load_avg_before']}, after {res['load_avg_after']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------- augmentation
class _PerImageTrivial(torch.utils.data.Dataset):
    """Per-image TrivialAugmentWide in DataLoader workers (each worker's torch RNG is
    seeded by the DataLoader from its generator, so the run is reproducible)."""

    def __init__(self, x: torch.Tensor) -> None:
        from torchvision.transforms import v2

        self.x = x
        self.t = v2.TrivialAugmentWide()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.t(self.x[i]), i


def loader_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compute: Compute,
                 batch: int, workers: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """One epoch with per-image TrivialAugmentWide in ``workers`` DataLoader processes,
    then crop + flip and the same SGD step as the training loop (a stand-in for
    :func:`mextract.train.train`, which has no DataLoader path). Returns (run, close)."""
    from mextract.augment import crop_flip

    device = compute.torch_device
    loader = torch.utils.data.DataLoader(
        _PerImageTrivial(x), batch_size=batch, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    y_dev = y.to(device)

    def run() -> None:
        model.train()
        for xb, idx in loader:
            xb = crop_flip(compute.images(xb), gen)
            with compute.autocast():
                loss = F.cross_entropy(model(xb), y_dev[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()

    def close() -> None:  # stop the persistent workers now rather than at exit
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    return run, close


def bench_augment(args: argparse.Namespace) -> dict[str, Any]:
    from mextract.augment import trivial_augment, trivial_augment_per_image
    from mextract.models import build_model

    compute = make_compute(args)
    device = compute.torch_device
    n = args.steps * args.batch
    x, y, num_classes = bench_data(args.data, n, seed=args.seed)
    torch.manual_seed(args.seed)
    model = compute.prepare(build_model(args.model, num_classes, args.width))
    gen = torch.Generator().manual_seed(0)
    xb = x[:args.batch]
    variants: dict[str, Callable[[], None]] = {
        "augment only: per image": lambda: trivial_augment_per_image(xb),
        "augment only: batched": lambda: trivial_augment(xb.to(device), gen),
        "loop: crop_flip only (no TrivialAugment)": loop_train(
            model, x, y, compute, args.batch, "crop_flip", prefetch=False),
        "loop: per image, inline": loop_train(
            model, x, y, compute, args.batch, "victim-per-image", prefetch=False),
        "loop: per image, background thread": loop_train(
            model, x, y, compute, args.batch, "victim-per-image", prefetch=True),
        "loop: batched, inline": loop_train(
            model, x, y, compute, args.batch, "victim", prefetch=False),
        "loop: batched, background thread": loop_train(
            model, x, y, compute, args.batch, "victim", prefetch=True),
    }
    closers = []
    if args.workers > 0:
        run, close = loader_train(model, x, y, compute, args.batch, args.workers)
        variants[f"loop*: per image, {args.workers} DataLoader workers"] = run
        closers.append(close)
    load_before = load_avg()
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps):
        for name, fn in variants.items():
            wall, cpu_s = _timed(fn, device)
            times[name].append(wall)
            cpu[name].append(cpu_s)
        if args.verbose:
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    for close in closers:
        close()
    out = {}
    for name, ts in times.items():
        imgs = args.batch if name.startswith("augment only") else n
        out[name] = {"median_s": round(_median(ts), 4),
                     "images_per_s": round(imgs / _median(ts), 1),
                     "median_cpu_s": round(_median(cpu[name]), 4)}
    return {"variants": out, "model": args.model, "width": args.width, "batch": args.batch,
            "steps": args.steps, "reps": args.reps, "workers": args.workers,
            "compute": compute.as_dict(), "machine": machine(),
            "load_avg_before": load_before, "load_avg_after": load_avg(),
            "command": "python -m mextract.bench " + " ".join(sys.argv[1:])}


def format_augment(res: dict[str, Any]) -> str:
    lines = [f"TrivialAugmentWide paths, model {res['model']} width {res['width']:g}, "
             f"batch {res['batch']}, {res['steps']} steps/epoch, medians of {res['reps']} "
             f"reps, {res['machine']['threads']} threads", "",
             "| variant | median wall s | images/s | median CPU s |", "|---|---:|---:|---:|"]
    for name, v in res["variants"].items():
        lines.append(f"| {name} | {v['median_s']:.3f} | {v['images_per_s']:.0f} "
                     f"| {v['median_cpu_s']:.3f} |")
    lines += ["", "(augment only: one batch; loop: one epoch; loop*: the bench's own loop, "
              "same step; CPU s: this process only, not DataLoader workers)",
              f"load average before {res['load_avg_before']}, after {res['load_avg_after']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------- command line
def make_compute(args: argparse.Namespace) -> Compute:
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = {"on": True, "off": False}.get(args.amp, "auto")
    prefetch = {"on": True, "off": False}.get(args.prefetch, "auto")
    return Compute(device=args.device, amp=amp, channels_last=not args.no_channels_last,
                   compile=args.compile, prefetch=prefetch)


def _model_args(p: argparse.ArgumentParser, steps: int, reps: int) -> None:
    p.add_argument("--model", default="vgg11", choices=("vgg11", "resnet18"))
    p.add_argument("--width", type=float, default=0.25,
                   help="vgg11: channel multiplier; resnet18: first-stage channels")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=steps, help="training batches per repetition")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--data", default=None,
                   help="cached data set (results/data/dataset.pt); default synthetic uint8")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                   help="the training loop's background batch preparation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result as one JSON object")
    p.add_argument("--verbose", "-v", action="store_true", help="print every repetition")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m mextract.bench", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train_ratio and query_ratio (the default command)")
    _model_args(run, steps=8, reps=5)
    run.add_argument("--augment", default="crop_flip", choices=("crop_flip", "victim", "none"))
    run.add_argument("--query-batch", type=int, default=1024,
                     help="the API's batch size and the raw inference batch")
    run.add_argument("--query-batches", type=int, default=4,
                     help="query images per repetition = this x --query-batch")
    aug = sub.add_parser("augment", help="compare ways of running TrivialAugmentWide")
    _model_args(aug, steps=4, reps=3)
    aug.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: skip)")
    summ = sub.add_parser("summarize", help="summarise Snakemake benchmark files")
    summ.add_argument("root", nargs="?", default="results/benchmarks")
    summ.add_argument("--json", default=None)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    if args.command == "summarize":
        from mextract.timings import format_summary, summarize

        table = summarize(args.root)
        print(format_summary(table))
        result: Any = table.to_dict(orient="records")
    elif args.command == "augment":
        result = bench_augment(args)
        print(format_augment(result))
    else:
        result = bench_run(args)
        print(format_run(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
