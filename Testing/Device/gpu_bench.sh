#!/usr/bin/env bash
# GPU figures of the engine in one device call (<= 10 min), for the next session that is lent a GPU:
# `benchmark pipeline` of the `small` and `paper` configurations (random weights) on CUDA, diffusion and
# direct, `benchmark train` of both, and the DRR. Not guidance: with random weights the film and the
# reconstruction disagree, so the consistency gate skips it; its GPU cost needs the bundled model. The device image has no SimpleITK or pydicom (the benchmark
# reads the DICOM sample film and writes NRRD through them); their wheels (~55 MB) fit the 64 MiB a call
# carries only when the bundled model and the other big files stay behind, so `aside` moves them out
# of the tree for the call. The bundled model's own GPU figures do not fit beside the wheels (about 73 MB
# with its mean CT xz-compressed): they need the benchmark to write its output without SimpleITK.
#
#   Testing/Device/gpu_bench.sh pack      # here: the wheels into .data/gpubench (git-ignored)
#   Testing/Device/gpu_bench.sh aside     # here: big tracked files -> /tmp/xctdiff-aside
#   device run, carry [".data/gpubench"]:  bash Testing/Device/gpu_bench.sh run
#   Testing/Device/gpu_bench.sh restore   # here, right after the call
#
# Dry run on a CPU (no wheels needed): DEV=cpu CONFIGS=tiny bash Testing/Device/gpu_bench.sh run
set -uo pipefail
cd "$(dirname "$0")/../.."
G=.data/gpubench
BIG="Resources/Samples/LIDC-IDRI-0001_ct.nrrd Resources/evaluation_figure.png Resources/style_eval.png
     Resources/autoencoder_fidelity.png Resources/demo_views.png Resources/Pretrained Resources/Models"
case "${1:-}" in
pack)
  set -e
  rm -rf $G && mkdir -p $G/whl
  for w in simpleitk==2.5.7 pydicom==3.0.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $G/whl $w
  done
  du -sh $G ;;
aside|restore)
  bash Testing/Device/aside.sh "$1" $BIG ;;
run)
  DEV=${DEV:-cuda}; O=${OUT:-/tmp/gpubench}; mkdir -p $O
  export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
  if ls $G/whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $G/whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  X="python3 -m XctDiffCore"; S=$O/summary.txt
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } >> $S 2>&1
  timeout 60 $X benchmark drr --device $DEV --json $O/drr.json 2>&1 | tail -2 | tee -a $S
  for c in ${CONFIGS:-small paper}; do
    timeout 120 $X benchmark pipeline --device $DEV --config $c --repeats 3 --json $O/pipeline_$c.json \
      2>&1 | grep -v "it/s\]$" | tail -14 | tee -a $S
    timeout 120 $X benchmark pipeline --device $DEV --config $c --method direct --repeats 3 --json $O/pipeline_${c}_direct.json \
      2>&1 | grep -v "it/s\]$" | tail -14 | tee -a $S
    timeout 150 $X benchmark train --config $c --steps 3 --json $O/train_$c.json 2>&1 | tail -6 | tee -a $S
  done ;;
*) echo "usage: $0 pack | aside | run | restore" >&2; exit 2 ;;
esac
