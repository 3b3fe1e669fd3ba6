#!/usr/bin/env bash
# A time-boxed GPU session for the developers (the `device` tool: one call <= 10 min, 64 MiB carried,
# 8 files of <= 16 MiB back): GPU training/inference figures and a short `small` training run.
#
#   Testing/Device/gpu_session.sh pack        # here: fills .data/device (git-ignored, about 34 MiB)
#   Testing/Device/gpu_session.sh run         # there, with carry [".data/device"] and OUT set
#
# `run` prepares the shared CTs (npz: no SimpleITK needed), runs `xctdiff benchmark train` for small
# and paper, `benchmark pipeline`/`drr` on CUDA, trains small for AE_MIN/ENC_MIN/DIFF_MIN minutes with
# --time-limit, exports and evaluates, and tars everything into $OUT/bundle.tar.part* + summary.txt.
# Dry run on a CPU: DEV=cpu SMALL=tiny.json PAPER=tiny.json AE_MIN=0.1 ENC_MIN=0.05 DIFF_MIN=0.05 OUT=/tmp/o
# Seen on the first lent H200 (2026-12-04, see gpu_train.sh, which was run instead): the tree plus this
# pack is over the 64 MiB that travel (move big files aside as gpu_train.sh does); the device image has no
# SimpleITK or pydicom (`benchmark pipeline` reads the DICOM sample and writes NRRD through them), and
# the call sees 3 CPU cores, not 16.
set -uo pipefail
cd "$(dirname "$0")/../.."
D=.data/device
case "${1:-}" in
pack)
  set -e
  mkdir -p $D/cache
  cp -r ../shared/data/ct $D/
  cp "${XCTDIFF_CACHE:-$HOME/.cache/xctdiff}/lpips_alex.safetensors" $D/cache/
  python3 - <<'PY'
import json
from XctDiffCore.config import config_to_dict, load_config
for name in ("tiny", "small", "paper"):  # JSON: the device may lack PyYAML
    d = config_to_dict(load_config(name))
    d["run"]["dir"], d["data"]["datalist"] = "/tmp/run", "/tmp/ds/datalist.json"
    if name == "small":  # short slots: no slow validation, frequent checkpoints
        for stage in ("autoencoder", "encoder", "diffusion"):
            d[stage]["optim"].update(val_every=100000, checkpoint_every=200, log_every=25)
        d["diffusion"]["optim"]["val_sample_steps"] = 25
    json.dump(d, open(f".data/device/{name}.json", "w"), indent=1)
PY
  du -sh $D ;;
run)
  export PYTHONUNBUFFERED=1 XCTDIFF_CACHE=$PWD/$D/cache
  X="python3 -m XctDiffCore"; DEV=${DEV:-cuda}
  SMALL=$D/${SMALL:-small.json}; PAPER=$D/${PAPER:-paper.json}; R=/tmp/outall
  rm -rf $R /tmp/ds /tmp/run; mkdir -p $R
  log() { echo "== $(date +%T) $*" | tee -a $R/summary.txt; }
  { nvidia-smi --query-gpu=name,memory.total --format=csv || true; } | tee -a $R/summary.txt
  log prepare; $X prepare $D/ct --out /tmp/ds --augment 4 --val-fraction 0.15 --seed 0 2>&1 | tail -1
  log bench; $X benchmark train --config $SMALL --steps 5 --json $R/bench_train_small.json 2>&1 | tail -6 | tee -a $R/summary.txt
  $X benchmark train --config $PAPER --steps 3 --json $R/bench_train_paper.json 2>&1 | tail -6 | tee -a $R/summary.txt
  $X benchmark pipeline --device $DEV --config $SMALL --repeats 3 --json $R/bench_pipeline_small.json 2>&1 | tail -4 | tee -a $R/summary.txt
  $X benchmark drr --device $DEV --json $R/bench_drr.json 2>&1 | tail -3 | tee -a $R/summary.txt
  for spec in "autoencoder ${AE_MIN:-2.0}" "encoder ${ENC_MIN:-0.75}" "diffusion ${DIFF_MIN:-1.5}"; do
    set -- $spec; log train $1 $2 min
    $X train $1 --config $SMALL --data /tmp/ds/datalist.json --out /tmp/run --resume --time-limit $2 2>&1 \
      | tr '\r' '\n' | grep -v "it\]$\|it/s\]$" | tail -3 | tee -a $R/summary.txt
    cp /tmp/run/$1/log.csv $R/log_$1.csv
  done
  log export; $X export /tmp/run --out $R/model --id xctdiff-small --version 0.0.1 --data /tmp/ds/datalist.json --method direct | tee -a $R/summary.txt
  log evaluate; $X evaluate --model $R/model --data /tmp/ds/datalist.json --out $R/eval --steps 25 --seed 0 --device $DEV 2>&1 | tail -8 | tee -a $R/summary.txt
  log pack; tar cf - -C /tmp outall | split -b 15000000 -d - "$OUT/bundle.tar.part"; cp $R/summary.txt "$OUT/"; log done ;;
*) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
