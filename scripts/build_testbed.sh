#!/usr/bin/env bash
# Rebuild the embedded testbed from scratch: tokenizer, dLLM teacher, AR baseline, their accuracies.
#
#   bash scripts/build_testbed.sh              # ~75 min on a 2-core CPU (both models train side by side)
#   THREADS=4 bash scripts/build_testbed.sh    # threads per training process
#
# Writes testbed/tokenizer, testbed/teacher, testbed/ar (config.json + model.safetensors + tokenizer) and
# runs/testbed_eval_{teacher,ar}.json. Training runs go to runs/testbed_{teacher,ar} and resume from their
# newest checkpoint if interrupted (resume=auto), so re-running this script continues where it stopped.
# The model cards (testbed/*/README.md) are written by hand from the eval JSON and the training logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
mkdir -p runs/logs

echo "== tokenizer"
$PY -m d2f.data.tokenizer --out testbed/tokenizer

echo "== training teacher (llada_sft) and AR baseline (causal) side by side; logs in runs/logs/"
$PY train/pretrain.py --config configs/testbed_teacher.yaml num_threads="$THREADS" "$@" > runs/logs/teacher.log 2>&1 &
T=$!
$PY train/pretrain.py --config configs/testbed_ar.yaml num_threads="$THREADS" "$@" > runs/logs/ar.log 2>&1 &
A=$!
wait $T
wait $A

echo "== exporting to testbed/"
for role in teacher ar; do
  rm -rf "testbed/$role.tmp" && mkdir -p "testbed/$role.tmp"
  cp runs/testbed_$role/{config.json,model.safetensors,config.yaml,tokenizer.json,tokenizer_config.json,chat_template.jinja} "testbed/$role.tmp/"
  [ -f "testbed/$role/README.md" ] && cp "testbed/$role/README.md" "testbed/$role.tmp/"
  rm -rf "testbed/$role" && mv "testbed/$role.tmp" "testbed/$role"
done

echo "== evaluating on the 500 held-out testbed problems"
$PY scripts/eval_testbed.py --model testbed/teacher --mode vanilla --gen 128 --block 32 --steps 128 \
    --limit 500 --threads "$THREADS" | tee runs/testbed_eval_teacher.json
$PY scripts/eval_testbed.py --model testbed/ar --mode ar --gen 128 --limit 500 --threads "$THREADS" \
    | tee runs/testbed_eval_ar.json
