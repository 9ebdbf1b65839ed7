#!/usr/bin/env bash
# Regenerate the README's stability heatmap from the default job (run from the repository root
# after the README's setup command): the default `bstab record`, analysed by `bstab analyze`.
set -euo pipefail
.venv/bin/bstab record --force -o runs/readme.h5 --no-progress
.venv/bin/bstab analyze runs/readme.h5 -o runs/readme-analysis --no-progress --no-cache
cp runs/readme-analysis/stability_heatmap.png docs/stability_heatmap.png
echo "wrote docs/stability_heatmap.png"
# the paper's recipe: vit-tiny on digits, 3 epochs of warm-up then cosine decay, lag 1
.venv/bin/bstab record --model vit-tiny --epochs 30 --warmup 3 --lr-schedule cosine --force \
  -o runs/readme-warmup.h5 --no-progress
.venv/bin/bstab analyze runs/readme-warmup.h5 --lag 1 -o runs/readme-warmup-analysis \
  --no-progress --no-cache
cp runs/readme-warmup-analysis/stability_heatmap.png docs/stability_heatmap_warmup.png
echo "wrote docs/stability_heatmap_warmup.png"
