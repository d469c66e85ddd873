#!/usr/bin/env bash
# BENCHMARKS.md's measurements on one H200 machine, in one run: every implementation through the harness
# (bench.run) and lpjax decode profiles with their kernel budget per stage. From the repository root:
#
#     bench/h200.sh GPUS OUTDIR [MODELS]     # GPUS: 1 (nvidia-h200) or 2 (nvidia-h200-x2)
#
# MODELS defaults to llama2-7b,llama3.2-3b; IMPLS, METRICS, LONG_METRICS and PROFILE_PLANS (LP plans to profile,
# "" for none) narrow a run. OUTDIR gets records.json (bench.run's records), tables.md,
# profile-*.json, versions.txt and the logs; OUTDIR/DONE when it has finished.
set -uo pipefail
gpus=${1:?GPUS (1 or 2)}
out=${2:?OUTDIR}
models=${3:-llama2-7b,llama3.2-3b}
mkdir -p "$out"
# NVLink multicast stays off: the hosts are shared and it can take their GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
machine=nvidia-h200$([ "$gpus" = 1 ] || echo "-x$gpus")
py=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c 'import jax, flax, torch, transformers, platform; print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
} | tee "$out/versions.txt"

for lp in ${PROFILE_PLANS-"" 16:30}; do
  $py -m bench.profile --model llama2-7b --lp "$lp" --devices "$gpus" --tokens 64 \
    --summary "$out/profile-${gpus}gpu-lp${lp/:/_}.json" 2>>"$out/profile.log" | tee -a "$out/profile.txt"
done

if [ "$gpus" = 1 ]; then
  impls=lpjax,torch-compile,torch-tp,hf-static-compile,hf-eager
  metrics=prefill_1024,prefill_4096,decode,single_token,peak_memory
else
  impls=lpjax,torch-compile,torch-tp
  metrics=prefill_1024,decode,single_token,peak_memory
fi
delta_for=()
[[ ",$models," == *,llama3.2-3b,* ]] && delta_for=(--delta-for llama3.2-3b=0,10)
$py -m bench.run --models "$models" --devices "$gpus" --delta 0,14 "${delta_for[@]}" \
  --impls "${IMPLS:-$impls}" --metrics "${METRICS:-$metrics}" --long-metrics "${LONG_METRICS-generate_4096}" \
  --long-models llama2-7b --repeats 3 --machine "$machine" --out "$out/records.json" --timeout 1200 \
  > "$out/tables.md" 2> "$out/run.log"
cat "$out/tables.md"
echo "done" > "$out/DONE"
