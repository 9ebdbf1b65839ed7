#!/usr/bin/env bash
# Regenerate the README's stability heatmap from the default job (run from the repository root
# after the README's setup command): the default `bstab record`, analysed by `bstab analyze`.
set -euo pipefail
.venv/bin/bstab record --force -o runs/readme.h5 --no-progress
.venv/bin/bstab analyze runs/readme.h5 -o runs/readme-analysis --no-progress --no-cache
cp runs/readme-analysis/stability_heatmap.png docs/stability_heatmap.png
echo "wrote docs/stability_heatmap.png"
