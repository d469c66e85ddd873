#!/usr/bin/env bash
# The quality experiment of the README, end to end: a 16-layer Llama trained here on the Python standard library,
# then LP's perplexity/time trade (Δ sweep), a searched plan against the default range, and fine-tuning recovery.
#
#   bench/quality.sh train RUN     # corpus, tokenizer, model (RUN/corpus, RUN/model, RUN/train.json)
#   bench/quality.sh study RUN     # sweep, plan search, fine-tuning, evaluations (RUN/*.json, RUN/sweep/)
#   bench/quality.sh all RUN
#
# Sizes come from the environment so a CPU smoke run can shrink them (STEPS=20 FT_STEPS=10 ...).
set -euo pipefail
stage=${1:?usage: bench/quality.sh train|study|all RUN_DIR}
run=${2:?usage: bench/quality.sh train|study|all RUN_DIR}
STEPS=${STEPS:-4000}          # training steps of BATCH x 256 tokens
WARMUP=${WARMUP:-200}
BATCH=${BATCH:-64}
FT_STEPS=${FT_STEPS:-400}     # fine-tuning steps of 32 x 256 tokens
FT_BATCH=${FT_BATCH:-32}
FT_WARMUP=${FT_WARMUP:-20}
DELTA=${DELTA:-8}             # Δ of the searched plan and of the fine-tuning runs (4 of 16 layers' 8 stages)
SEARCH_TOKENS=${SEARCH_TOKENS:-16384}
EVAL_EVERY=${EVAL_EVERY:-50}
SWEEP_TOKENS=${SWEEP_TOKENS:-0}  # 0: score all of val.txt
mkdir -p "$run"
if [[ ! -f $run/corpus/corpus.json ]]; then   # deterministic for one Python version: rebuilt where it is missing
  python -m bench.stdlib_corpus --out "$run/corpus" --overwrite > /dev/null
fi

if [[ $stage == train || $stage == all ]]; then
  python -m lpjax.train --text "$run/corpus/train.txt" --val "$run/corpus/val.txt" --out "$run/model" \
      --vocab-size 4096 --layers 16 --dim 128 --heads 4 --ffn 384 --tie-embeddings --seq-len 256 \
      --batch-size "$BATCH" --steps "$STEPS" --lr 3e-3 --warmup "$WARMUP" --weight-decay 0.1 --eval-every 500 \
      --save-every 1000 --json > "$run/train.json"
fi

if [[ $stage == study || $stage == all ]]; then
  model="$run/model"
  last=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$model/config.json")
  default="$((last - 2 - DELTA)):$((last - 2))"   # Δ layers ending two before the last
  python -m lpjax.eval --model "$model" --text "$run/corpus/val.txt" --batch-size 32 --json \
      > "$run/eval_sequential.json"
  python -m lpjax.plan --model "$model" --text "$run/corpus/dev.txt" --delta "$DELTA" \
      --max-tokens "$SEARCH_TOKENS" --batch-size 32 --json > "$run/search.json"
  searched=$(python -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['best']['lp'])" \
      "$run/search.json")
  python -m lpjax.sweep --model "$model" --text "$run/corpus/val.txt" --delta 0,2,4,6,8,10,12,14 \
      --lp "$searched" --max-tokens "$SWEEP_TOKENS" --batch-size 32 --out "$run/sweep" --overwrite --json > "$run/sweep.json"
  python -m lpjax.sweep --model "$model" --text "$run/corpus/val.txt" --delta "$DELTA" --position \
      --max-tokens "$SWEEP_TOKENS" --batch-size 32 --out "$run/positions" --overwrite --json > "$run/positions.json"
  for name in default searched; do
    lp=${!name}
    python -m lpjax.finetune --model "$model" --lp "$lp" --text "$run/corpus/train.txt" \
        --val "$run/corpus/val.txt" --steps "$FT_STEPS" --batch-size "$FT_BATCH" --seq-len 256 --lr 1e-3 \
        --warmup "$FT_WARMUP" --eval-every "$EVAL_EVERY" --save-every 0 --out "$run/finetune-$name" --overwrite --json \
        > "$run/finetune-$name.json"
  done
fi
