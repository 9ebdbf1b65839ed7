#!/usr/bin/env bash
# Regenerate every figure in docs/ (run from the repository root after the README's setup
# command). Each one is a run recorded by `bstab record`, analysed by `bstab analyze`.
set -euo pipefail
# the README's heatmap: the default job (cnn on digits, 40 epochs, a snapshot per epoch), lag 5
# snapshots as in the paper; the log scale of 1 - S shows where each layer crosses tau = 0.99
.venv/bin/bstab record --force -o runs/readme.h5 --no-progress
.venv/bin/bstab analyze runs/readme.h5 -o runs/readme-analysis --no-progress --no-cache --force
cp runs/readme-analysis/stability_heatmap.png docs/stability_heatmap.png
echo "wrote docs/stability_heatmap.png"
# the paper's recipe: vit-tiny on digits, 3 epochs of warm-up then cosine decay, lag 1
.venv/bin/bstab record --model vit-tiny --epochs 30 --warmup 3 --lr-schedule cosine --force \
  -o runs/readme-warmup.h5 --no-progress
.venv/bin/bstab analyze runs/readme-warmup.h5 --lag 1 -o runs/readme-warmup-analysis \
  --no-progress --no-cache --force
cp runs/readme-warmup-analysis/stability_heatmap.png docs/stability_heatmap_warmup.png
echo "wrote docs/stability_heatmap_warmup.png"
# the README's screenshot of the HTML report of the first run, taken by headless Chromium
.venv/bin/bstab report runs/readme.h5 -o runs/readme-report.html --force --no-progress
.venv/bin/python -c "from basis_stability.reporting import screenshot; \
screenshot('runs/readme-report.html', 'docs/report_screenshot.png')"
echo "wrote docs/report_screenshot.png"
