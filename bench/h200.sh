#!/usr/bin/env bash
# BENCHMARKS.md's measurements on one H200 machine, in one run: every implementation through the harness
# (bench.run), lpjax's one-slot decode variant (--decode-rows 1, the layout before 8-row decode steps) and decode
# profiles with their kernel budget per stage. Run from the repository root on the GPU machine:
#
#     bench/h200.sh GPUS OUTDIR        # GPUS: 1 (nvidia-h200) or 2 (nvidia-h200-x2)
#
# OUTDIR gets records.json (bench.run's records), tables.md, profile-*.json and the logs.
set -uo pipefail
gpus=${1:?GPUS (1 or 2)}
out=${2:?OUTDIR}
mkdir -p "$out"
# NVLink multicast stays off: the hosts are shared and it can take their GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
machine=nvidia-h200$([ "$gpus" = 1 ] || echo "-x$gpus")
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c 'import jax, flax, torch, transformers, platform; print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
} | tee "$out/versions.txt"

for rows in 8 1; do
  for lp in "" "16:30"; do
    $py -m bench.profile --model random:llama2-7b --lp "$lp" --devices "$gpus" --tokens 64 --decode-rows "$rows" \
      --summary "$out/profile-${gpus}gpu-rows$rows-lp${lp/:/_}.json" 2>>"$out/profile.log" | tee -a "$out/profile.txt"
  done
done

if [ "$gpus" = 1 ]; then
  impls=lpjax,torch-compile,torch-tp,hf-static-compile,hf-eager
  metrics=prefill_1024,prefill_4096,decode,single_token,peak_memory
else
  impls=lpjax,torch-compile,torch-tp
  metrics=prefill_1024,decode,single_token,peak_memory
fi
$py -m bench.run --models llama2-7b,llama3.2-3b --gpus "$gpus" --lp 0,14 --lp-for llama3.2-3b=0,10 \
  --impls "$impls" --metrics "$metrics" --long-metrics generate_4096 --long-models llama2-7b --repeats 3 \
  --machine "$machine" --out "$out/records.json" --timeout 1200 > "$out/tables.md" 2> "$out/run.log"
for model in llama2-7b:0,14 llama3.2-3b:0,10; do
  $py -m bench.lpjax_bench --model "${model%%:*}" --gpus "$gpus" --lp-delta "${model#*:}" --metrics decode,single_token \
    --repeats 3 --decode-rows 1 --impl-name lpjax+rows1 --json-out "$out/rows1.jsonl" 2>>"$out/run.log"
done
cat "$out/tables.md"
echo "done" > "$out/DONE"
