#!/bin/bash
# The cifar10-cpu config's whole DAG on a GPU machine without network or Snakemake
# (docs/performance.md, "GPU"). Prepare beside the project, in .gpu/ (git-ignored):
#   tar czf .gpu/cifar10-jpeg.tar.gz -C ../shared/data cifar10-jpeg
#   pip download snakemake jsonschema --dest .gpu/wheels --python-version 3.12 \
#     --only-binary=:all: --platform manylinux2014_x86_64 --platform any
# (connection_pool has no wheel: `pip wheel --no-deps connection_pool -w .gpu/wheels`
# first). Run from the project root on the GPU machine: bash tools/gpu_cifar_dag.sh
set -u
tar xzf .gpu/cifar10-jpeg.tar.gz -C /tmp
python3 -m pip install -q --no-index --find-links .gpu/wheels snakemake jsonschema 2>&1 | tail -2
python3 -m snakemake --version
start=$(date +%s)
timeout 430 python3 -m snakemake --cores 16 --resources gpu=6 --workflow-profile none \
  --keep-going --configfile config/cifar10-cpu.yaml \
  --config 'dataset={name: imagefolder, root: /tmp/cifar10-jpeg}' 'compute={device: cuda}' \
  > /tmp/smk.log 2>&1
echo "snakemake rc=$? after $(( $(date +%s) - start )) s"
grep -E "steps \(|Error in rule|Exiting" /tmp/smk.log | tail -5
cp /tmp/smk.log $OUT/snakemake.log
tar czf $OUT/results.tar.gz --exclude='*.pt' --exclude='*.sha256' results
cat results/table.md 2>/dev/null | head -60
