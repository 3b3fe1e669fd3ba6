#!/usr/bin/env bash
# Fine-tune a model folder's encoder, diffusion and decoder on one lent GPU inside one device call
# (<= 10 min; 64 MiB travel with the tree). Used for xctdiff-cpu-autoencoder 0.4.0 (session 17).
#
#   Testing/Device/gpu_train.sh pack MODEL_FOLDER   # here: fills .data/gpu (git-ignored, ~50 MB)
#   Testing/Device/gpu_train.sh aside               # here: moves files the device call does not need out
#                                                   #   of the tree (to /tmp/xctdiff-aside), so it fits
#   device run, carry [".data/gpu"]:  T_END=520 B_LEN=150 bash Testing/Device/gpu_train.sh run
#   Testing/Device/gpu_train.sh restore             # here, right after the call
#   Testing/Device/gpu_train.sh unpack DIR          # here: the returned parts -> runs/g_{a,b}{15,19}, runs/gdec
#
# MODEL_FOLDER: a folder on the autoencoder whose latents the encoder/diffusion read (its encoder and
# diffusion are the starting weights). Recipes: a = cpu.yaml's variant magnitudes, b = stronger (rotation
# 8 deg, scale 0.2, elastic 6 mm, film gamma 0.35 ...); 15 = the shared_whole_chest training split (4
# validation patients scored every 500 steps), 19 = all patients. Both use fresh variants at every step
# (no bank). The decoder run is decoder-only (latents unchanged) on whole 128^3 volumes, batch 2, with the
# 1 - SSIM term (ssim_weight 1).
# Seen on an H200 (3 CPU cores visible to the call, the 5 jobs sharing them): encoder 0.33 s/step
# (batch 8), diffusion 0.98 s/step (batch 16), decoder 0.47 s/step. The host's cores are the bottleneck.
set -uo pipefail
cd "$(dirname "$0")/../.."
G=.data/gpu
BIG="Resources/Samples/LIDC-IDRI-0001_ct.nrrd Resources/evaluation_figure.png Resources/style_eval.png
     Resources/autoencoder_fidelity.png Resources/demo_views.png
     Resources/Pretrained/xctdiff-cpu-autoencoder/autoencoder.safetensors Resources/Models/xctdiff-cpu/mean_ct.npy"
case "${1:-}" in
pack)
  set -e
  MODEL=${2:?usage: $0 pack MODEL_FOLDER}
  rm -rf $G && mkdir -p $G/init $G/whl /tmp/xctdiff-pack/ds/images
  python3 - "$MODEL" <<'PY'
import hashlib, json, shutil, sys
from pathlib import Path
import numpy as np
from XctDiffCore.config import config_to_dict, load_config
model, g = Path(sys.argv[1]), Path(".data/gpu")
# the folder's autoencoder, encoder and diffusion only (the manifest trimmed to match)
for name in ("autoencoder", "encoder", "diffusion"):
    for ext in ("safetensors", "json"):
        shutil.copy(model / f"{name}.{ext}", g / "init")
shutil.copy(model / "MODEL_CARD.md", g / "init")
m = json.loads((model / "manifest.json").read_text())
m["stages"] = {k: v for k, v in m["stages"].items() if k in ("autoencoder", "encoder", "diffusion")}
m["sha256"] = {k: hashlib.sha256((g / "init" / k).read_bytes()).hexdigest() for k in m["sha256"] if (g / "init" / k).exists()}
m.pop("mean_ct", None)
(g / "init" / "manifest.json").write_text(json.dumps(m, indent=1))
strong = dict(max_rotation_deg=8.0, max_scale=0.2, max_translation=0.06, elastic_mm=6.0, max_hu_scale=0.05, max_hu_offset=30.0)
strong_film = dict(max_gamma=0.35, max_contrast=0.25, max_blur_px=1.5, max_noise=0.03, max_haze=0.25)
for recipe in "ab":
    for data in ("15", "19"):
        c = config_to_dict(load_config("cpu"))
        c["run"]["dir"] = f"/tmp/r/{recipe}{data}"
        val = 500 if data == "15" else 10**7
        c["encoder"]["optim"].update(batch_size=8, lr=2e-4, warmup_steps=50, max_steps=10**6, log_every=50, val_every=val, checkpoint_every=500, ema_decay=0.999)
        c["diffusion"]["optim"].update(batch_size=16, lr=2e-4, warmup_steps=20, max_steps=10**6, log_every=50, val_every=val, checkpoint_every=500, ema_decay=0.998, val_sample_steps=10)
        for stage in ("encoder", "diffusion"):
            c[stage]["augment"]["bank"] = 0
            if recipe == "b":
                c[stage]["augment"].update(strong)
                c[stage]["film"].update(strong_film)
        (g / f"{recipe}{data}.json").write_text(json.dumps(c, indent=1))
c = config_to_dict(load_config("cpu"))
c["run"]["dir"], c["autoencoder"]["decoder_only"], c["autoencoder"]["patch_size"] = "/tmp/r/dec", True, 128
c["autoencoder"]["loss"].update(disc_start=150, ssim_weight=1.0)  # 1 - SSIM: +0.15 dB in its first 200 CPU steps (runs/dec5, 2026-12-05)
c["autoencoder"]["optim"].update(batch_size=2, lr=1e-4, warmup_steps=50, max_steps=10**6, log_every=50, val_every=1000, checkpoint_every=500, ema_decay=0.999)
(g / "dec.json").write_text(json.dumps(c, indent=1))
for f in Path(".data/ds/images").glob("*.npz"):  # stored uncompressed: xz packs int16 CTs 24 % smaller than zip
    np.savez(f"/tmp/xctdiff-pack/ds/images/{f.name}", **dict(np.load(f)))
PY
  cp -r .data/ds/xrays .data/ds/datalist.json .data/ds/datalist_all19.json /tmp/xctdiff-pack/ds/
  tar cf - -C /tmp/xctdiff-pack ds | xz -T0 -9e > $G/ds.tar.xz
  cp "${XCTDIFF_CACHE:-$HOME/.cache/xctdiff}/lpips_alex.safetensors" $G/
  xz -9 -c Resources/Models/xctdiff-cpu/mean_ct.npy > $G/mean_ct.npy.xz
  python3 -m pip download -q --no-deps -d $G/whl pydicom==3.0.2
  du -sh $G ;;
aside|restore)
  bash Testing/Device/aside.sh "$1" $BIG ;;
run)
  T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
  mins() { awk -v s="$1" 'BEGIN { m = s / 60.0; if (m < 0.2) m = 0.2; printf "%.2f", m }'; }
  T_END=${T_END:-520}; B_LEN=${B_LEN:-150}
  export PYTHONUNBUFFERED=1 XCTDIFF_CACHE=/tmp/xcache PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-3}
  O=/tmp/gpuout; rm -rf $O /tmp/r /tmp/ds; mkdir -p $XCTDIFF_CACHE /tmp/r $O/logs $O/ckpt
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $G/whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  M=Resources/Models/xctdiff-cpu/mean_ct.npy; [ -f $M ] || xz -dc $G/mean_ct.npy.xz > $M
  cp $G/lpips_alex.safetensors $XCTDIFF_CACHE/; tar xJf $G/ds.tar.xz -C /tmp
  X="python3 -m XctDiffCore"; S=$O/summary.txt
  log() { echo "== $(el)s $*" | tee -a $S; }
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } >> $S 2>&1
  (sleep $((T_END + 25)); pkill -TERM -f "XctDiffCore train") &  # SIGTERM: checkpoint, then stop
  timeout 25 $X benchmark drr --device cuda --json $O/bench_drr.json >> $O/logs/bench.log 2>&1
  declare -A DATA=([15]=/tmp/ds/datalist.json [19]=/tmp/ds/datalist_all19.json)
  log phase A; pids=()
  for run in a15 b15 a19 b19; do
    $X train encoder --config $G/$run.json --data ${DATA[${run:1}]} --out /tmp/r/$run --init $G/init \
      --time-limit $(mins $((T_END - B_LEN - $(el) - 25))) > $O/logs/${run}_encoder.log 2>&1 & pids+=($!)
  done
  $X train autoencoder --config $G/dec.json --data /tmp/ds/datalist.json --out /tmp/r/dec --init $G/init \
    --time-limit $(mins $((T_END - $(el) - 30))) > $O/logs/dec_autoencoder.log 2>&1 & dec=$!
  for p in "${pids[@]}"; do wait $p; echo "encoder rc=$?" >> $S; done
  log phase B; pids=()
  for run in a15 b15 a19 b19; do
    $X train diffusion --config $G/$run.json --data ${DATA[${run:1}]} --out /tmp/r/$run --init $G/init \
      --time-limit $(mins $((T_END - $(el) - 25))) > $O/logs/${run}_diffusion.log 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}" $dec; do wait $p; echo "rc=$?" >> $S; done
  log pack
  python3 - <<'PY' >> $S 2>&1
import glob, shutil, torch
for path in sorted(glob.glob("/tmp/r/*/*/checkpoint.pt")):
    run, stage = path.split("/")[-3:-1]
    if stage == "autoencoder" and run != "dec":
        continue  # an encoder run's imported (frozen) autoencoder
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["optimizers"], ckpt["scalers"] = {}, {}  # the weights and their average travel; --init continues them
    torch.save(ckpt, f"/tmp/gpuout/ckpt/{run}_{stage}.pt")
    print(run, stage, "step", ckpt["step"])
for path in glob.glob("/tmp/r/*/*/log.csv"):
    run, stage = path.split("/")[-3:-1]
    shutil.copy(path, f"/tmp/gpuout/logs/{run}_{stage}.csv")
PY
  tar cf - -C /tmp gpuout | split -b 15000000 -d - "$OUT/bundle.tar.part"; cp $S "$OUT/"; log done ;;
unpack)
  set -e
  D=${2:?usage: $0 unpack DIR}; rm -rf /tmp/xctdiff-unpack && mkdir -p /tmp/xctdiff-unpack
  cat $D/bundle.tar.part* | tar xf - -C /tmp/xctdiff-unpack; C=/tmp/xctdiff-unpack/gpuout/ckpt
  for run in a15 b15 a19 b19; do
    for stage in encoder diffusion; do mkdir -p runs/g_$run/$stage && cp $C/${run}_$stage.pt runs/g_$run/$stage/checkpoint.pt; done
  done
  mkdir -p runs/gdec/autoencoder && cp $C/dec_autoencoder.pt runs/gdec/autoencoder/checkpoint.pt
  echo "runs/g_*: add an autoencoder checkpoint with the same latents (runs/<its run>/autoencoder) before xctdiff export" ;;
*) echo "usage: $0 pack MODEL_FOLDER | aside | run | restore | unpack DIR" >&2; exit 2 ;;
esac
