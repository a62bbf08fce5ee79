"""config/config.yaml's Stage 0 (ResNet-18, 50 epochs) and its KD experiment on a GPU
machine without Snakemake, through the same library calls the workflow's scripts make
(docs/performance.md, "GPU"):

    OUT=/tmp PYTHONPATH=src python3 tools/gpu_stage01.py /path/to/cifar10-jpeg
    OUT=/tmp PYTHONPATH=src python3 tools/gpu_stage01.py smoke  # CPU check: digits, 1 epoch

It writes $OUT/gpu_results.json.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, "src")
import torch  # noqa: E402
import yaml  # noqa: E402

from mextract.data import build_dataset, make_split  # noqa: E402
from mextract.experiment import make_api, run_experiment  # noqa: E402
from mextract.metrics import predict  # noqa: E402
from mextract.queries import collect  # noqa: E402
from mextract.runtime import setup  # noqa: E402
from mextract.train import TrainConfig  # noqa: E402
from mextract.victim import train_victim, victim_scores  # noqa: E402

OUT = Path(os.environ["OUT"])
cfg = yaml.safe_load(open("config/config.yaml"))
res: dict = {"torch": torch.__version__,
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dump() -> None:
    (OUT / "gpu_results.json").write_text(json.dumps(res, indent=2))


t = time.perf_counter()
SMOKE = sys.argv[1] == "smoke"  # a CPU check of this script: digits, 1 epoch, narrow
data = build_dataset("digits", None) if SMOKE else build_dataset("imagefolder", sys.argv[1])
if SMOKE:
    cfg["victims"]["clean"].update(width=8, train={**cfg["victims"]["clean"]["train"], "epochs": 1})
    cfg["substitute"].update(width=0.125, train={**cfg["substitute"]["train"], "epochs": 1})
res["prepare_data_s"] = round(time.perf_counter() - t, 1)
# an image tree is class-sorted: shuffle (config/cifar10-cpu.yaml does the same)
split = make_split(len(data["y_train"]), 0.5, 0, True)
compute = setup({"device": "cpu" if SMOKE else "cuda", "amp": "auto"}, 8, 0)
res["compute"] = compute.as_dict()
v = cfg["victims"]["clean"]
vcfg = TrainConfig.from_dict(v["train"])
idx = split["victim"]
sync()
t = time.perf_counter()
model, history = train_victim(data["x_train"][idx], data["y_train"][idx], data["x_test"],
                              data["y_test"], arch="resnet18", width=v["width"],
                              num_classes=10, cfg=vcfg, compute=compute, seed=0)
sync()
res["victim"] = {"train": v["train"], "wall_s": round(time.perf_counter() - t, 1),
                 "train_time_s": history[-1]["train_time_s"],
                 **victim_scores(model, data["x_test"], data["y_test"], compute)}
dump()
print("victim", res["victim"], flush=True)

t = time.perf_counter()
api = make_api(model, {"mode": "soft", "defences": [], "batch_size": 1024}, compute)
pool = data["x_train"][split["pool"]]
cache = collect(api, pool, "pool")
sync()
res["collect_soft_pool_s"] = round(time.perf_counter() - t, 2)
vpred = predict(model, data["x_test"], compute)
sub = cfg["substitute"]
t = time.perf_counter()
result, metrics = run_experiment(
    strategy="kd", params={"temperature": 3.0}, data=data, split=split,
    victim_test_pred=vpred, substitute={"arch": sub["arch"], "width": sub["width"]},
    train_cfg=sub["train"], compute=compute, seed=0, workdir="/tmp/kd-work", cache=cache)
sync()
res["kd"] = {k: metrics[k] for k in ("queries", "test_accuracy", "fidelity",
                                     "fidelity_on_victim_errors", "wall_time_s")}
res["kd"]["train"] = sub["train"]
dump()
print("kd", res["kd"], flush=True)
