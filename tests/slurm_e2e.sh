#!/usr/bin/env bash
# End-to-end test of profiles/slurm on a real SLURM cluster: stands up a single-node
# cluster on localhost (Debian's slurmctld/slurmd/munge, fake GPUs), runs the demo
# workflow (config/demo.yaml) with `--workflow-profile profiles/slurm`, checks that
# every non-local job ran as a SLURM job (the job id in Snakemake's output, in the
# SLURM log file and in the job's own log, state COMPLETED, GPU rules with a GPU) and
# that results/table.csv equals a local run's table except for timing columns, then
# stops the daemons it started. Pitfalls met on the way: docs/slurm.md (testing).
#
# Needs root and apt-get (installs slurmctld, slurmd, slurm-client, munge when
# missing, and the SLURM executor plugin into $PYTHON's environment when missing).
# Writes /etc/slurm/slurm.conf and gres.conf and removes them at the end; it refuses
# to run where such files exist that it did not write (a real SLURM installation).
# Exit status 77 means "cannot run here" (not root, no apt-get, an existing SLURM
# configuration): a skip, not a failure.
#
#   tests/slurm_e2e.sh                 # also runs the demo locally for the reference
#   REFERENCE_TABLE=path/table.csv tests/slurm_e2e.sh   # reuse a local run's table
#
# Environment: PYTHON (default: .venv/bin/python of this checkout), REFERENCE_TABLE,
# SLURM_E2E_TIMEOUT (seconds for the SLURM run, default 1500), SLURM_E2E_WORKDIR (run
# there instead of a fresh temporary project copy), SLURM_E2E_KEEP=1 (keep the
# cluster's state folder).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TIMEOUT="${SLURM_E2E_TIMEOUT:-1500}"
PROJECT_FILES=(Snakefile rules workflow config src envs profiles report)  # as tests/conftest.py
SKIP=77
T0=$(date +%s)

say() { echo "[slurm-e2e $(($(date +%s) - T0))s] $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "slurm e2e: skipped: needs root (it installs and starts SLURM daemons)"
    exit $SKIP
fi
if ! command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then
    echo "slurm e2e: skipped: SLURM is not installed and there is no apt-get to install it"
    exit $SKIP
fi
command -v timeout >/dev/null || { echo "slurm e2e: needs coreutils' timeout"; exit 1; }

# ------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    for attempt in $(seq 1 30); do  # another apt may hold the dpkg lock for a while
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                slurmctld slurmd slurm-client munge >/dev/null; then
            break
        fi
        [ "$attempt" = 30 ] && { echo "slurm e2e: apt-get install failed"; exit 1; }
        sleep 10
    done
fi
if ! "$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
    say "installing the SLURM executor plugin (the project's 'slurm' extra)"
    "$PY" -m pip install -q "snakemake-executor-plugin-slurm>=1.0"
fi

# ------------------------------------------------------------------ cluster state
STATE="$(mktemp -d /tmp/mextract-slurm.XXXXXX)"
HOST="$(hostname -s)"
mkdir -p "$STATE/state" "$STATE/spool" "$STATE/log"
# The configuration must sit at the default path: the job-step plugin removes
# SLURM_CONF (with every SLURM_* variable) from the environment of its inner srun.
# Only a configuration this script wrote is ever replaced or removed.
CONF_DIR=/etc/slurm
MARKER="# written by mextract tests/slurm_e2e.sh"
unset SLURM_CONF
for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
    if [ -e "$f" ] && ! head -n 1 "$f" | grep -qF "$MARKER"; then
        echo "slurm e2e: skipped: $f exists and was not written by this script (a real"
        echo "SLURM installation?); not touching it"
        rm -rf "$STATE"
        exit $SKIP
    fi
done
STARTED_PIDS=()

cleanup() {
    local rc=$?
    set +e
    if [ -s "$STATE/slurmctld.pid" ]; then
        # Cancel whatever is left (a failed or killed run), then stop the daemons.
        ids=$(squeue -h -o %i 2>/dev/null)
        [ -n "$ids" ] && scancel $ids && sleep 3
    fi
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        [ -s "$pidfile" ] && STARTED_PIDS+=("$(cat "$pidfile")")
    done
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${STARTED_PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    done
    if [ $rc != 0 ] && [ $rc != $SKIP ]; then
        echo "---- slurmctld log (tail)"; tail -n 30 "$STATE/log/slurmctld.log" 2>/dev/null
        echo "---- slurmd log (tail)"; tail -n 30 "$STATE/log/slurmd.log" 2>/dev/null
    fi
    for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
        [ -e "$f" ] && head -n 1 "$f" | grep -qF "$MARKER" && cp "$f" "$STATE/" && rm -f "$f"
    done
    if [ "${SLURM_E2E_KEEP:-0}" = 1 ] || [ $rc != 0 ]; then
        echo "slurm e2e: cluster state kept in $STATE"
    else
        rm -rf "$STATE"
    fi
    say "daemons stopped (pids ${STARTED_PIDS[*]:-none}); exit $rc"
    exit $rc
}
trap cleanup EXIT

# munge: reuse a running munged (not ours to stop), otherwise start one.
if ! (command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then
    [ -s /etc/munge/munge.key ] || /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    STARTED_PIDS+=("$(cat /run/munge/munged.pid)")
    say "munged started (pid ${STARTED_PIDS[0]})"
fi

# The node claims 16 CPUs, 64 GB and two GPUs (config_overrides: slurmd does not
# check them against the hardware), so the profile's real-site requests
# (cpus_per_gpu, mem_mb) fit unchanged on a small CI machine. Nothing binds or limits
# the jobs (no cgroups here): they share the machine's real cores.
mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=mextract-e2e
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
ReturnToService=2
GresTypes=gpu
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
# Fake GPUs: without File= slurmd drops them and drains the node.
cat > "$CONF_DIR/gres.conf" <<EOF
$MARKER
NodeName=$HOST Name=gpu File=/dev/null
NodeName=$HOST Name=gpu File=/dev/zero
EOF

slurmctld
for _ in $(seq 1 50); do [ -s "$STATE/slurmctld.pid" ] && break; sleep 0.1; done
slurmd
for _ in $(seq 1 50); do [ -s "$STATE/slurmd.pid" ] && break; sleep 0.1; done
say "slurmctld pid $(cat "$STATE/slurmctld.pid"), slurmd pid $(cat "$STATE/slurmd.pid")"
for i in $(seq 1 60); do
    state="$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ')"
    [[ "$state" == "idle " ]] && break
    [ "$i" = 60 ] && { echo "slurm e2e: node never became idle (state: $state)"; exit 1; }
    sleep 1
done
gpu_env="$(timeout 60 srun -p gpu --gpus=1 bash -c 'echo $CUDA_VISIBLE_DEVICES')"
say "cluster up: node $HOST idle; srun --gpus=1 sees CUDA_VISIBLE_DEVICES=$gpu_env"

# ------------------------------------------------------------------ the workflow
copy_project() {
    mkdir -p "$1"
    for name in "${PROJECT_FILES[@]}"; do
        [ -e "$ROOT/$name" ] && cp -r "$ROOT/$name" "$1/"
    done
    find "$1" -name __pycache__ -type d -prune -exec rm -rf {} +
}

REF="${REFERENCE_TABLE:-}"
if [ -z "$REF" ]; then
    say "local reference run of the demo"
    copy_project "$STATE/local"
    (cd "$STATE/local" && timeout -s KILL "$TIMEOUT" "$PY" -m snakemake --cores 2 \
        --configfile config/demo.yaml > "$STATE/local.log" 2>&1) \
        || { tail -n 40 "$STATE/local.log"; echo "slurm e2e: the local run failed"; exit 1; }
    REF="$STATE/local/results/table.csv"
fi

WORK="${SLURM_E2E_WORKDIR:-$STATE/work}"
[ -e "$WORK/Snakefile" ] || copy_project "$WORK"
say "SLURM run in $WORK"
set +e
# A part of the demo (SLURM_E2E_EXPERIMENTS: every stage, both victims, every kind of
# query cache, a live-API strategy), without random baselines and the defence matrix:
# the point is SLURM execution, and the whole demo's ~60 jobs took ~8 minutes here.
SLURM_E2E_EXPERIMENTS="${SLURM_E2E_EXPERIMENTS:-control-s1 kd marich control-s2 basic augmentation control-s3 basic-s3}"
"$PY" - "$WORK" $SLURM_E2E_EXPERIMENTS <<'PYEOF'
import sys
from pathlib import Path

import yaml

work, keep = Path(sys.argv[1]), sys.argv[2:]
cfg = yaml.safe_load((work / "config" / "demo.yaml").read_text())
missing = [e for e in keep if e not in cfg["experiments"]]
if missing:
    sys.exit(f"SLURM_E2E_EXPERIMENTS: not in config/demo.yaml: {missing}")
cfg["experiments"] = {e: cfg["experiments"][e] for e in keep}
cfg.pop("matrix", None)
cfg["random_baselines"] = False
(work / "config" / "slurm-e2e.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
PYEOF
(cd "$WORK" && timeout -s KILL "$TIMEOUT" "$PY" -m snakemake \
    --workflow-profile profiles/slurm --configfile config/slurm-e2e.yaml \
    --slurm-init-seconds-before-status-checks 5 --slurm-keep-successful-logs \
    > "$STATE/snakemake.log" 2>&1)
rc=$?
set -e
if [ $rc != 0 ]; then
    tail -n 60 "$STATE/snakemake.log"
    echo "slurm e2e: the SLURM run failed (exit $rc; 137 = killed after ${TIMEOUT}s)"
    exit 1
fi
say "SLURM run finished"

# ------------------------------------------------------------------ checks
"$PY" - "$STATE/snakemake.log" "$WORK" "$REF" <<'PYEOF'
"""Every non-local job went through SLURM; the table equals the local one."""
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

log, work, ref = Path(sys.argv[1]).read_text(), Path(sys.argv[2]), Path(sys.argv[3])
GPU_RULES = {"train_victim", "collect_queries", "run_attack"}
TIMING_COLUMNS = ["wall_time_s", "wall_time_s_sd"]
# the SLURM run leaves out the random baselines: their rows and the columns that
# name or compare with them are not compared
BASELINE_COLUMNS = ["baseline", "baseline_of", "random_gain", "random_gain_sd"]

# Snakemake prints "rule X:" for jobs it submits and "localrule X:" for local ones.
remote = re.findall(r"^rule (\w+):", log, flags=re.M)
local = re.findall(r"^localrule (\w+):", log, flags=re.M)
submitted = re.findall(
    r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", log, flags=re.M)
problems = []
if not remote:
    problems.append("no job was scheduled on SLURM")
if len(submitted) != len(remote):
    problems.append(f"{len(remote)} jobs scheduled but {len(submitted)} SLURM submissions")
job_rules = {}
for jobid, slurm_log in submitted:
    rule = re.search(r"/rule_(\w+)/", slurm_log)
    rule = rule.group(1) if rule else "?"
    job_rules[jobid] = rule
    if not Path(slurm_log).exists():
        problems.append(f"job {jobid} ({rule}): SLURM log {slurm_log} is missing")
    info = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True,
                          text=True).stdout
    if "JobState=COMPLETED" not in info:
        state = re.search(r"JobState=(\S+)", info)
        problems.append(f"job {jobid} ({rule}): state {state.group(1) if state else '?'}")
    gres = re.search(r"TresPerJob=(\S+)", info)
    has_gpu = bool(gres and "gpu" in gres.group(1))
    if has_gpu != (rule in GPU_RULES):
        problems.append(f"job {jobid} ({rule}): GPU request {gres.group(1) if gres else None}")
# Each job's own log names the SLURM job it ran in (mextract.runtime.logged).
ran_in = {}
for f in (work / "results" / "logs").rglob("*.log"):
    m = re.search(r"slurm_job_id=(\d+)", f.read_text(errors="replace"))
    if m:
        ran_in[m.group(1)] = f.relative_to(work).as_posix()
missing = sorted(set(job_rules) - set(ran_in), key=int)
if missing:
    problems.append(f"jobs {missing} do not appear in any results/logs file")
rules = sorted(set(job_rules.values()))
for rule in ("prepare_data", "split_data", *sorted(GPU_RULES)):
    if rule not in rules:
        problems.append(f"rule {rule} never ran on SLURM")
print(f"SLURM jobs ({len(job_rules)}): "
      + ", ".join(f"{j}={r}" for j, r in sorted(job_rules.items(), key=lambda x: int(x[0]))))
print(f"local jobs: {', '.join(local) or 'none'}")

table = pd.read_csv(work / "results" / "table.csv")
reference = pd.read_csv(ref)
reference = reference[reference["experiment"].isin(table["experiment"])].reset_index(drop=True)
drop = [c for c in TIMING_COLUMNS + BASELINE_COLUMNS if c in table]
# a column the part of the demo never fills (e.g. `pool`, shown where a stage has an
# experiment with another pool) is absent from its table
only_local = [c for c in reference.columns if c not in table.columns]
# ... or present but empty in both (then its dtype says nothing)
drop += [c for c in table.columns if c in reference.columns and c not in drop
         and table[c].isna().all() and reference[c].isna().all()]
extra = [c for c in table.columns if c not in reference.columns]
if extra:
    problems.append(f"columns not in the local run's table: {extra}")
try:
    pd.testing.assert_frame_equal(table.drop(columns=drop + extra),
                                  reference.drop(columns=drop + only_local),
                                  check_exact=True)
except AssertionError as err:
    problems.append(f"table differs from the local run's {ref}:\n{err}")
print(table.drop(columns=drop).to_string(index=False))
if problems:
    sys.exit("slurm e2e FAILED:\n  " + "\n  ".join(problems))
print("slurm e2e: every job ran on SLURM and the table equals the local run's")
PYEOF
say "passed"
