#!/usr/bin/env bash
# The quality study's GPU half, on one H200: the Pareto front's decode times, the plan search on 8,192 dev tokens
# checked on val, and the fine-tunes (LM loss against distillation, each beside its control) at Δ=8 and Δ=14.
#
#   bench/quality_h200.sh timings RUN  # RUN/timings/{sweep,positions}/sweep.json: decode ms/token of every plan of
#                                      # the Δ and position sweeps, random weights at SmolLM2's shape (speed does not
#                                      # depend on the values), bf16, batch 1, nothing else on the GPU
#   bench/quality_h200.sh study RUN    # RUN/corpus, then bench/quality_distill.sh's fine-tunes beside
#                                      # bench/quality_smollm2.sh's plan search and its val check, on the real model
#   bench/quality_h200.sh all RUN
#
# Then, anywhere: `python -m bench.distill_report RUN/results` and `python -m bench.quality_report` with
# `--timings RUN/timings` (see README, Quality). MODEL is the GGUF file (default smollm2). The sweeps' perplexities
# come from the CPU study (float32, the same val text); only their timings come from here.
set -euo pipefail
stage=${1:?usage: bench/quality_h200.sh timings|study|all RUN_DIR}
run=${2:?usage: bench/quality_h200.sh timings|study|all RUN_DIR}
here=$(cd "$(dirname "$0")" && pwd)
export MODEL=${MODEL:-smollm2}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # the study's processes share the GPU
NEW_TOKENS=${NEW_TOKENS:-256}    # decode timing: tokens a generation, REPEATS generations a plan (median)
REPEATS=${REPEATS:-5}
SWEEP_DELTAS=${SWEEP_DELTAS:-0,2,4,6,8,10,12,14}  # the Δ sweep (as in the CPU study)
DELTA=${DELTA:-8}                # the position sweep's and the plan search's Δ (as in the CPU study)
POSITION_STEP=${POSITION_STEP:-2}
export SEARCH_TOKENS=${SEARCH_TOKENS:-8192}  # dev tokens a candidate plan is scored on
export SWEEP_TOKENS=${SWEEP_TOKENS:-8192}    # val tokens of the searched and default plans' check
export BATCH=${SCORE_BATCH:-8}               # scoring windows per forward pass
mkdir -p "$run"
elapsed() { echo "[$(date +%T)] $*" >&2; }
if [[ ! -f $run/corpus/corpus.json ]]; then
  python -m bench.stdlib_corpus --source pydoc-topics --val-every 4 --out "$run/corpus" > /dev/null
fi

if [[ $stage == timings || $stage == all ]]; then
  shape=${TIMING_MODEL:-random:smollm2-135m}
  common=(--model "$shape" --dtype bfloat16 --devices 1 --text "$run/corpus/val.txt" --max-tokens 512 --window 512
          --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --overwrite --json)
  elapsed "timings: the Δ sweep on $shape"
  python -m lpjax.sweep "${common[@]}" --delta "$SWEEP_DELTAS" --out "$run/timings/sweep" > "$run/timings-sweep.json"
  elapsed "timings: the position sweep (Δ=$DELTA, step $POSITION_STEP)"
  python -m lpjax.sweep "${common[@]}" --delta "$DELTA" --position --position-step "$POSITION_STEP" \
      --out "$run/timings/positions" > "$run/timings-positions.json"
  elapsed "timings done"
fi

if [[ $stage == study || $stage == all ]]; then
  "$here/quality_distill.sh" corpus "$run"
  elapsed "fine-tunes and the plan search, side by side"
  "$here/quality_distill.sh" finetune "$run" & tunes=$!
  DELTA=$DELTA "$here/quality_smollm2.sh" search "$run" > "$run/results/search.log" 2>&1 & search=$!
  failed=0
  wait $tunes || failed=1
  wait $search || { failed=1; elapsed "the plan search failed: see $run/results/search.log"; }
  cp "$run"/search.json "$run"/eval_default.json "$run"/eval_searched.json "$run/results/" 2>/dev/null || true
  "$here/quality_distill.sh" report "$run"
  elapsed "study done"
  exit $failed
fi
