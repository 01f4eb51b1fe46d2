#!/usr/bin/env bash
# Reproduce the example run of docs/evaluation.md at tiny_cpu size on the real scans (about 20 minutes
# on 2 CPU cores). Usage: examples/evaluation/run.sh [DATA_DIR] [OUTPUT_DIR]
set -euo pipefail

DATA=${1:-../shared/data/ct}
OUT=${2:-runs/evaluation-example}
DAGMAN=${DAGMAN:-.venv/bin/dagman}
mkdir -p "$OUT"

# Proxy tasks: organ crops for classification, the tumor task's scans for segmentation.
"$DAGMAN" proxy-tasks --data "$DATA" --output "$OUT/proxy" --tasks organs region
ORGANS="$OUT/proxy/organs/datalist.json"

# Pretraining on every organ and region crop, then linear probing and full fine-tuning with 3 folds.
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
images = []
for task in ("organs", "region"):
    datalist = out / "proxy" / task / "datalist.json"
    images += [{"image": str((datalist.parent / entry["image"]).resolve())} for entry in json.loads(datalist.read_text())["training"]]
(out / "pretrain.json").write_text(json.dumps({"training": images}, indent=1))
PY
"$DAGMAN" pretrain --config tiny_cpu --datalist "$OUT/pretrain.json" --output "$OUT/pretrain" --max-steps 200
"$DAGMAN" finetune --task classification --mode linear --pretrained "$OUT/pretrain" --datalist "$ORGANS" --output "$OUT/linear" --folds 3
"$DAGMAN" finetune --task classification --mode full --pretrained "$OUT/pretrain" --datalist "$ORGANS" --output "$OUT/full" --folds 3 --max-steps 40
"$DAGMAN" finetune --task classification --mode linear --pretrained "$OUT/pretrain" --datalist "$ORGANS" --output "$OUT/linear-25" --folds 3 --fraction 0.25

# The linear probe as a bundle: evaluation, a whole-CT classification, features and head diversity.
"$DAGMAN" export --run "$OUT/linear" --output "$OUT/organ-model"
"$DAGMAN" proxy-tasks --data "$DATA" --output "$OUT/proxy-seed1" --tasks organs --seed 1
"$DAGMAN" evaluate --model "$OUT/organ-model" --datalist "$OUT/proxy-seed1/organs/datalist.json" --output "$OUT/evaluate-organs" --device cpu
"$DAGMAN" infer --model "$OUT/organ-model" --input "$DATA/totalsegmentator/abdomen_3mm/ct.nii.gz" --output "$OUT/infer-organ" --device cpu
"$DAGMAN" embed --run "$OUT/pretrain" --datalist "$ORGANS" --output "$OUT/embed"
"$DAGMAN" diagnose --run "$OUT/pretrain" --datalist "$ORGANS" --output "$OUT/diagnose"

# Segmentation: fine-tune on lung2, evaluate on lung1 and lung2.
python3 - "$OUT" "$DATA" <<'PY'
import json, sys
from pathlib import Path
out, data = Path(sys.argv[1]), Path(sys.argv[2]).resolve() / "pyradiomics_lung_tumor"
case = lambda name: {"image": str(data / f"{name}_image.nrrd"), "label": str(data / f"{name}_label.nrrd"), "id": name}
(out / "tumor-train.json").write_text(json.dumps({"labels": {"1": "Lung tumor"}, "training": [case("lung2")]}, indent=1))
(out / "tumor-eval.json").write_text(json.dumps({"labels": {"1": "Lung tumor"}, "training": [case("lung1"), case("lung2")]}, indent=1))
PY
"$DAGMAN" finetune --pretrained "$OUT/pretrain" --datalist "$OUT/tumor-train.json" --output "$OUT/tumor" --max-steps 300
"$DAGMAN" export --run "$OUT/tumor" --output "$OUT/tumor-model"
"$DAGMAN" evaluate --model "$OUT/tumor-model" --datalist "$OUT/tumor-eval.json" --output "$OUT/evaluate-tumor" --device cpu
