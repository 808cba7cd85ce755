#!/usr/bin/env bash
# Rebuild the embedded testbed from scratch: tokenizer, AR baseline, dLLM teacher, D2F student, accuracies.
#
#   bash scripts/build_testbed.sh              # about 4 hours on a 2-core CPU (Xeon, 8 layers): AR baseline
#                                              # ~25 min; teacher: 10,000 steps ~75 min + 6,000 steps ~55 min;
#                                              # student: teacher answers ~20 min + distillation ~9 min
#                                              # + a round on its own decoding states ~4 min;
#                                              # evaluations ~25 min)
#   THREADS=2 bash scripts/build_testbed.sh    # torch threads per process
#
# Order matters: the teacher is initialised from the AR baseline's weights (configs/testbed_teacher.yaml
# init_from: testbed/ar), so the AR model is trained and exported first, and the student is distilled from the
# exported teacher. Training runs go to runs/testbed_{ar,teacher,teacher_results} and resume from
# their newest checkpoint when interrupted (resume=auto), so re-running this script continues where it stopped.
# Extra arguments are key=value overrides for the pretraining runs.
# The model cards (testbed/*/README.md) are kept; update their numbers from runs/testbed_eval_*/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
mkdir -p runs/logs

export_model() {  # runs/<run> (default testbed_<role>) -> testbed/<role> (weights, config, tokenizer; the card stays)
  local role=$1 run=${2:-testbed_$1} tmp="testbed/$1.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  cp runs/$run/{config.json,model.safetensors,config.yaml,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$tmp/"
  if [ -f "testbed/$role/README.md" ]; then cp "testbed/$role/README.md" "$tmp/"; fi
  rm -rf "testbed/$role" && mv "$tmp" "testbed/$role"
}

echo "== tokenizer"
$PY -m d2f.data.tokenizer --out testbed/tokenizer

echo "== AR baseline (causal), log in runs/logs/ar.log"
$PY train/pretrain.py --config configs/testbed_ar.yaml num_threads="$THREADS" "$@" > runs/logs/ar.log 2>&1
export_model ar

echo "== teacher (full attention in every term, initialised from testbed/ar), logs in runs/logs/teacher*.log"
# stage 1: semi-autoregressive states + LLaDA SFT; stage 2: calculator-result states. A third stage on the
# states of its own vanilla decoding (configs/testbed_teacher_orders.yaml) is a documented experiment, not part
# of the build: it raises vanilla accuracy and block-causal decoding alike and shrinks the gap the student closes
# (testbed/teacher/README.md)
$PY train/pretrain.py --config configs/testbed_teacher.yaml num_threads="$THREADS" "$@" > runs/logs/teacher.log 2>&1
$PY train/pretrain.py --config configs/testbed_teacher_results.yaml num_threads="$THREADS" "$@" \
    > runs/logs/teacher_results.log 2>&1
export_model teacher testbed_teacher_results

echo "== D2F student: the teacher's answers to train problems (vanilla decoding, ~20 min), then distillation"
# distill.py writes a missing data.source first (data.teacher_answers problems, decoded as
# data.teacher_decoding says); answers older than the teacher are stale and written again
answers=data/distill/testbed_train.jsonl
if [ -f "$answers" ] && [ testbed/teacher/model.safetensors -nt "$answers" ]; then rm -f "$answers"; fi
rm -rf runs/d2f_tiny
$PY train/distill.py --config configs/d2f_tiny.yaml output_dir=runs/d2f_tiny data.source="$answers" \
    data.teacher_answers="${DISTILL_N:-800}" eval.every=0 > runs/logs/distill.log 2>&1
echo "== D2F student, second round: half of each batch from the states its own D2F decoding visits (~4 min)"
# records runs/d2f_tiny/student_states.pt from runs/d2f_tiny/adapter first (configs/d2f_tiny_states.yaml)
rm -rf runs/d2f_tiny_states runs/d2f_tiny/student_states.pt
$PY train/distill.py --config configs/d2f_tiny_states.yaml output_dir=runs/d2f_tiny_states data.source="$answers" \
    > runs/logs/distill_states.log 2>&1
rm -rf testbed/student.tmp && mkdir -p testbed/student.tmp
cp runs/d2f_tiny_states/adapter/{adapter_config.json,adapter_model.safetensors,d2f_base.json} testbed/student.tmp/
cp runs/d2f_tiny/config.yaml testbed/student.tmp/distill_config.yaml
cp runs/d2f_tiny_states/config.yaml testbed/student.tmp/distill_states_config.yaml
cp "$answers" testbed/student.tmp/teacher_answers.jsonl
if [ -f testbed/student/README.md ]; then cp testbed/student/README.md testbed/student.tmp/; fi
rm -rf testbed/student && mv testbed/student.tmp testbed/student

echo "== accuracy on the 500 held-out testbed problems"
$PY -m infer.eval --model testbed/ar --mode ar --max-new-tokens 128 \
    --limit 500 --batch-size 50 --threads "$THREADS" --overwrite --output-dir runs/testbed_eval_ar
$PY -m infer.eval --model testbed/teacher --mode vanilla --max-new-tokens 128 --block-size 32 --steps 128 \
    --limit 500 --batch-size 50 --threads "$THREADS" --overwrite --output-dir runs/testbed_eval_teacher
$PY -m infer.eval --mode d2f --max-new-tokens 128 --block-size 16 --tau-add 0.7 --tau-act 0.95 --tau-conf 0.99 \
    --limit 500 --batch-size 50 --threads "$THREADS" --overwrite --output-dir runs/testbed_eval_student
# the teacher's own weights under D2F without an adapter: the block-causal gap the distillation closes
$PY -m infer.eval --model testbed/teacher --mode d2f --max-new-tokens 128 --block-size 16 --tau-add 0.7 \
    --tau-act 0.95 --tau-conf 0.99 --limit 500 --batch-size 50 --threads "$THREADS" --overwrite \
    --output-dir runs/testbed_eval_teacher_d2f_no_adapter
