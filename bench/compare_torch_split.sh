#!/usr/bin/env bash
# The torch-compile baseline's figures from two trees of the code, in one run on one GPU machine: OLD_DIR (a checkout
# of the single-file bench/torch_tp.py, commit ace88c2) and this tree (the bench.torch_tp package), alternating
# OLD, NEW, OLD, NEW... so that drift of the machine shows up in both. Llama-2-7B, 1 GPU, decode and single_token,
# Δ 0 and 14, median of --repeats 5 each. From this tree's root:
#
#     git worktree add /tmp/lpjax-ace88c2 ace88c2
#     bench/compare_torch_split.sh /tmp/lpjax-ace88c2 [OUTDIR]
#
# OUTDIR (default runs/compare-torch-split) gets old.jsonl and new.jsonl (each runner's records; impl
# torch-compile@<commit>), the logs, and compare.md: old against new per (Δ, metric), all rounds pooled. ROUNDS
# (default 2) sets the alternations, PYTHON the interpreter; MODEL, DELTAS and DEVICE (llama2-7b, 0,14, cuda) change
# the configuration (MODEL=tiny DELTAS=0,2 DEVICE=cpu runs the script itself on a CPU). Each tree imports its own lpjax
# (PYTHONPATH).
set -euo pipefail
old=$(cd "${1:?OLD_DIR: a checkout of the code to compare against, e.g. commit ace88c2}" && pwd)
new=$(cd "$(dirname "$0")/.." && pwd)
out=${2:-runs/compare-torch-split}
rounds=${ROUNDS:-2}
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# NVLink multicast stays off: the hosts are shared and it can take their GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
old_commit=$(git -C "$old" rev-parse --short HEAD 2>/dev/null || echo old)
new_commit=$(git -C "$new" rev-parse --short HEAD)$(git -C "$new" diff --quiet HEAD -- bench lpjax || echo "+dirty")
deltas=${DELTAS:-0,14}
common=(--model "${MODEL:-llama2-7b}" --device "${DEVICE:-cuda}" --compile default --metrics decode,single_token
        --repeats 5 --batch 1)

for round in $(seq "$rounds"); do
  echo "[compare] round $round of $rounds: $old_commit (old)" >&2
  # the single-file runner's flag names: --gpus, --lp-delta
  (cd "$old" && PYTHONPATH="$old" $py -m bench.torch_tp "${common[@]}" --gpus 1 --lp-delta "$deltas" \
    --impl-name "torch-compile@$old_commit" --json-out "$out/old.jsonl") >/dev/null 2>>"$out/old.log"
  echo "[compare] round $round of $rounds: $new_commit (new)" >&2
  (cd "$new" && PYTHONPATH="$new" $py -m bench.torch_tp "${common[@]}" --devices 1 --delta "$deltas" \
    --impl-name "torch-compile@$new_commit" --json-out "$out/new.jsonl") >/dev/null 2>>"$out/new.log"
done

PYTHONPATH="$new" $py - "$out" <<'EOF' | tee "$out/compare.md"
import statistics
import sys
from pathlib import Path

from bench.records import read

out = Path(sys.argv[1])
runs = {side: read(out / f"{side}.jsonl") for side in ("old", "new")}
impl = {side: runs[side][0]["impl"] for side in runs}
print(f"| Δ | metric | {impl['old']} | {impl['new']} | new / old |")
print("|---|---|---|---|---|")
for delta in sorted({r["lp_delta"] for r in runs["old"]}):
    for metric in ("decode", "single_token"):
        # every sample of every round, pooled: one median per side
        pooled = {side: [s for r in runs[side] if r["lp_delta"] == delta and r["metric"] == metric
                         for s in r["samples"]] for side in runs}
        if not all(pooled.values()):
            continue
        old, new = (statistics.median(pooled[side]) for side in ("old", "new"))
        print(f"| {delta} | {metric} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
EOF
