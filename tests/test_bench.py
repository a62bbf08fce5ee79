"""The performance pieces: batched TrivialAugmentWide, the training loop's background
batch preparation and augmentation generator, Compute options, and the benchmark
command (smoke runs only: nothing here asserts a speed)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from mextract import bench, timings
from mextract.augment import (
    TRIVIAL_OPS,
    _trivial_magnitudes,
    apply_trivial,
    crop_flip,
    random_crop,
    trivial_augment,
    trivial_params,
)
from mextract.compute import Compute, cpu_has_bf16
from mextract.data import load_digits
from mextract.models import build_model
from mextract.train import TrainConfig, train

CPU = Compute("cpu", amp=False)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth images (upsampled noise) with some flat ones: exercises rounding, clamping
    and the degenerate cases of autocontrast / equalize."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32,
                                        mode="bilinear", align_corners=False)
    x = (x * 255).round().to(torch.uint8)
    x[::7] = x[::7] // 2 + 60  # low contrast
    x[::11] = 128  # constant
    return x


def test_trivial_augment_matches_torchvision_per_image() -> None:
    """Every op, many magnitudes and both signs: the batched result equals torchvision's
    own per-image op with the same parameters (up to 1 grey level of float rounding)."""
    n_ops = len(TRIVIAL_OPS)
    x = _images(n_ops * 12)
    g = torch.Generator().manual_seed(1)
    op = torch.arange(n_ops).repeat(12)
    bins = torch.randint(0, 31, (len(x),), generator=g)
    bins[:2 * n_ops] = torch.tensor([0, 30]).repeat_interleave(n_ops)  # extremes
    negative = torch.rand(len(x), generator=g) < 0.5
    out = apply_trivial(x, op, bins, negative)

    table, signed = _trivial_magnitudes(31, 32, 32)
    t = v2.TrivialAugmentWide()
    for i in range(len(x)):
        name = TRIVIAL_OPS[int(op[i])]
        mag = float(table[op[i], bins[i]])
        if negative[i] and signed[op[i]]:
            mag = -mag
        ref = t._apply_image_or_video_transform(x[i], name, mag, interpolation=t.interpolation,
                                                fill=t._fill)
        diff = (out[i].int() - ref.int()).abs()
        assert diff.max() <= 1, (name, mag, int(diff.max()))
        assert (diff > 0).float().mean() < 0.01, (name, mag)


def test_trivial_augment_is_seeded_batched_and_per_image() -> None:
    x = _images(64)
    state = torch.get_rng_state()
    a = trivial_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # never touches the global RNG
    b = trivial_augment(x, torch.Generator().manual_seed(5))
    c = trivial_augment(x, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one op per image: identical inputs come out differently
    same = trivial_augment(x[:1].repeat(64, 1, 1, 1), torch.Generator().manual_seed(0))
    assert len(torch.unique(same.flatten(1), dim=0)) > 8
    # the parameter draws cover every op about uniformly
    op, bins, neg = trivial_params(14_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(op, minlength=len(TRIVIAL_OPS))
    assert counts.min() > 800 and bins.max() == 30 and 0.45 < neg.float().mean() < 0.55
    with pytest.raises(TypeError):
        trivial_augment(x.float(), torch.Generator())


def test_random_crop_equals_per_image_windows() -> None:
    x = _images(20)
    out = random_crop(x, torch.Generator().manual_seed(2), padding=4)
    g = torch.Generator().manual_seed(2)  # the same draws, in the same order
    dy = torch.randint(0, 9, (20,), generator=g)
    dx = torch.randint(0, 9, (20,), generator=g)
    xp = torch.nn.functional.pad(x, (4,) * 4)
    ref = torch.stack([xp[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(20)])
    assert torch.equal(out, ref) and out.dtype == x.dtype
    assert torch.equal(random_crop(x.float(), torch.Generator().manual_seed(2)), ref.float())


def _mixing_objective(model, x, batch, gen):  # draws from the objective's generator
    lam = torch.rand((), generator=gen, device=gen.device)
    perm = torch.randperm(len(x), generator=gen, device=gen.device)
    logits = model(lam * x + (1 - lam) * x[perm])
    return (lam * torch.nn.functional.cross_entropy(logits, batch["y"])
            + (1 - lam) * torch.nn.functional.cross_entropy(logits, batch["y"][perm]))


def _victim_augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return crop_flip(CPU.images(trivial_augment(xb, gen)), gen)


def _fit(x, y, prefetch, epochs=2, checkpoint=None, evaluate=None):
    torch.manual_seed(0)
    model = build_model("vgg11", 10, 0.125)
    history = train(model, x, {"y": y}, _mixing_objective,
                    TrainConfig(epochs=epochs, batch_size=37, lr=0.05), CPU, seed=3,
                    augment=_victim_augment, prefetch=prefetch, checkpoint=checkpoint,
                    evaluate=evaluate)
    return model, history


@functools.cache
def _digits_data() -> dict:
    return load_digits()


def _digits(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    d = _digits_data()
    return d["x_train"][:n], d["y_train"][:n]


def test_prefetch_gives_the_same_training_run() -> None:
    """Background batch preparation only moves work: weights and losses are identical
    (the augmentation and the objective draw from separate generators)."""
    x, y = _digits()
    m0, h0 = _fit(x, y, prefetch=False)
    m1, h1 = _fit(x, y, prefetch=True)
    assert [r["loss"] for r in h0] == [r["loss"] for r in h1]
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_resume_restores_the_augmentation_generator(tmp_path: Path) -> None:
    x, y = _digits(64)
    full, h_full = _fit(x, y, prefetch=True, epochs=2)

    def fail_in_epoch_2(model):
        fail_in_epoch_2.calls += 1
        if fail_in_epoch_2.calls == 2:
            raise KeyboardInterrupt  # "killed" after epoch 1's checkpoint
        return {}

    fail_in_epoch_2.calls = 0
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(x, y, prefetch=True, epochs=2, checkpoint=ckpt, evaluate=fail_in_epoch_2)
    resumed, h_res = _fit(x, y, prefetch=False, epochs=2, checkpoint=ckpt)
    assert [r["loss"] for r in h_res] == [r["loss"] for r in h_full]
    s0, s1 = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_non_finite_loss_stops_training() -> None:
    x, y = _digits(40)

    def nan_objective(model, xb, batch, gen):
        return model(xb).sum() * float("nan")

    for prefetch in (False, True):
        with pytest.raises(FloatingPointError, match="epoch 1"):
            train(build_model("vgg11", 10, 0.125), x, {"y": y}, nan_objective,
                  TrainConfig(epochs=1, batch_size=20), CPU, prefetch=prefetch)


def test_a_non_finite_loss_in_a_job_names_its_config_key(tmp_path) -> None:
    """A job's failure names the config entry it runs (runtime.logged's entry): a
    non-finite loss in the message, any other error in a note under the traceback."""
    from mextract.runtime import logged

    x, y = _digits(40)
    log = tmp_path / "job.log"
    with pytest.raises(FloatingPointError,
                       match=r"^config key 'experiments.kd': .*loss became .* in epoch 1"):
        with logged(log, "experiments.kd"):
            train(build_model("vgg11", 10, 0.125), x, {"y": y},
                  lambda m, xb, b, g: m(xb).sum() * float("inf"),
                  TrainConfig(epochs=1, batch_size=20), CPU)
    assert "config key 'experiments.kd'" in log.read_text()
    with pytest.raises(KeyError) as info:
        with logged(None, "victims.clean"):
            raise KeyError("x")
    assert info.value.__notes__ == ["(in the job of config key 'victims.clean')"]


def test_four_step_schedule_trains() -> None:
    """OneCycleLR divides by pct_start * total_steps - 1: 4 steps at pct_start 0.25 used
    to raise ZeroDivisionError."""
    x, y = _digits(8)
    history = train(build_model("vgg11", 10, 0.125), x, {"y": y},
                    lambda m, xb, b, g: torch.nn.functional.cross_entropy(m(xb), b["y"]),
                    TrainConfig(epochs=1, batch_size=2, pct_start=0.25), CPU)
    assert len(history) == 1 and history[0]["loss"] > 0


def test_compute_options() -> None:
    c = Compute("cpu")
    assert c.compile is False and c.prefetch is False  # "auto" is CUDA only
    # "auto": bf16 autocast only where the CPU has native bf16 (10x slower without)
    assert c.amp is cpu_has_bf16()
    assert Compute("cpu", amp=True).amp is True and Compute("cpu", amp=False).amp is False
    model = torch.nn.Linear(2, 2)
    assert c.compiled(model) is model
    assert set(c.as_dict()) >= {"device", "amp", "channels_last", "compile", "prefetch"}
    for key in ("amp", "compile", "prefetch"):
        with pytest.raises(ValueError, match=key):
            Compute("cpu", **{key: "sometimes"})


def test_bench_run_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "vgg11", "--width", "0.125", "--batch", "8", "--steps", "2",
                       "--reps", "1", "--query-batch", "16", "--query-batches", "1",
                       "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("train_ratio", "query_ratio", "query_ratio_soft", "query_ratio_honey",
                "train_raw_ips", "train_loop_ips", "infer_raw_ips", "query_soft_ips"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["query_ratio"] == min(res["query_ratio_soft"], res["query_ratio_honey"])
    assert "train_ratio" in capsys.readouterr().out


def test_bench_data_from_a_cached_dataset(tmp_path: Path) -> None:
    from mextract.data import save_dataset

    save_dataset(_digits_data(), tmp_path / "dataset.pt")
    x, y, k = bench.bench_data(str(tmp_path / "dataset.pt"), 3000)
    assert x.shape == (3000, 3, 32, 32) and x.dtype == torch.uint8 and len(y) == 3000
    assert k == 10


def test_bench_augment_smoke(tmp_path: Path) -> None:
    out = tmp_path / "aug.json"
    bench.main(["augment", "--model", "vgg11", "--width", "0.125", "--batch", "8",
                "--steps", "1", "--reps", "1", "--workers", "0", "--device", "cpu",
                "--json", str(out)])
    res = json.loads(out.read_text())
    assert "loop: batched, background thread" in res["variants"]
    assert all(v["median_s"] > 0 for v in res["variants"].values())


def test_summarize_benchmark_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (tmp_path / "train_victim").mkdir()
    (tmp_path / "prepare_data.tsv").write_text(
        header + "3.5\t0:00:03\t500.1\t900\t480\t490\t1\t2\t80.0\t2.9\n")
    (tmp_path / "train_victim" / "clean.tsv").write_text(
        header + "120.0\t0:02:00\t1500.0\t2000\t1400\t1450\t1\t2\t190.5\t230.0\n")
    (tmp_path / "empty.tsv").write_text(header)
    table = timings.summarize(tmp_path)
    assert list(table["rule"]) == ["train_victim", "prepare_data"]
    assert list(table["job"]) == ["clean", ""]
    assert table["s"].tolist() == [120.0, 3.5] and table["max_rss"].tolist() == [1500.0, 500.1]
    bench.main(["summarize", str(tmp_path), "--json", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out
    assert "| train_victim | clean | 120.0 | 230.0 | 1500 |" in printed
    assert "| **total** | 2 jobs | 123.5 |" in printed
    assert len(json.loads((tmp_path / "s.json").read_text())) == 2
