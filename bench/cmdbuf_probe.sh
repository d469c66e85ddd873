#!/usr/bin/env bash
# Command-buffer (CUDA graph) update probe for a host-called decode step (bench/NOTES.md, 2026-11-30, rows 41-43).
#
#   bash bench/cmdbuf_probe.sh             # from the repository root; writes everything under $OUT
#
# A SmolLM2-shaped step (dim 576, 30 layers, GQA 9/3 heads, MLP 1536, vocab 49152, bf16, 8 stream rows, a donated
# per-layer KV cache written with dynamic_update_slice, greedy token out) is compiled several ways and called from
# the host in several patterns; each XLA configuration runs in its own python process (a segfault ends only that
# variant). Timing runs have no logging; "log" twins of the key configurations run fewer calls with XLA's VLOGs on
# (TF_CPP_MIN_LOG_LEVEL=0 is required: `import jax` sets it to 1, which drops every VLOG) and are parsed into counts:
# command-buffer updates per execution, commands actually updated, and which allocations moved (parameter /
# live-out / temp). Needs only jax + numpy. ~4-5 min on one H200. Knobs (env): PROBE_LAYERS, PROBE_CALLS,
# PROBE_WARM, PROBE_LOG_CALLS, PROBE_VOCAB, PROBE_BUDGET_S, PROBE_VARIANTS (comma list of variant names), PYTHON.
# Files under $OUT (8): summary.txt, results.jsonl, env.txt, stderr_runs.txt, log_base.txt, log_tempcolor.txt,
# log_skiptemp.txt, log_skipprofiled.txt.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/runs/cmdbuf_probe}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/cmdbuf_probe.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PROBE_RESULTS="$OUT/results.jsonl" PROBE_CC_DIR="$WORK/jax_cache"
: > "$PROBE_RESULTS"
: > "$OUT/stderr_runs.txt"
rm -f "$OUT"/log_*.txt "$OUT/summary.txt"
BUDGET=${PROBE_BUDGET_S:-345}  # seconds for all variants together (each gets at most 80 of what is left)
START=$SECONDS

cat > "$WORK/probe.py" <<'PYEOF'
"""One variant: compile the step the ways its patterns need, run each pattern, append JSON lines to PROBE_RESULTS."""
import json
import os
import time

import numpy as np

E = os.environ
VARIANT, CONFIG, LOGGED = E["PROBE_VARIANT"], E["PROBE_CONFIG"], E.get("PROBE_LOG", "0") == "1"
PATTERNS = [p for p in E["PROBE_PATTERNS"].split(",") if p]
LAYERS = int(E.get("PROBE_LAYERS", 30))
CALLS = int(E.get("PROBE_LOG_CALLS", 25)) if LOGGED else int(E.get("PROBE_CALLS", 200))
WARM = 5 if LOGGED else int(E.get("PROBE_WARM", 20))
DIM, HID, NH, NKV, HD, MAXLEN, ROWS = 576, 1536, 9, 3, 64, 256, 8
VOCAB = int(E.get("PROBE_VOCAB", 49152))
KVD = NKV * HD


def emit(rec):
    rec.update(variant=VARIANT, config=CONFIG, log=LOGGED)
    with open(E["PROBE_RESULTS"], "a") as f:
        f.write(json.dumps(rec) + "\n")


def mark(text):  # straight to fd 2 so it interleaves in order with XLA's absl log lines
    os.write(2, f"@@PROBE {text}\n".encode())


import jax  # noqa: E402  (after the helpers: nothing above touches jax)
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

try:
    jax.config.update("jax_compilation_cache_dir", E["PROBE_CC_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
except Exception as e:  # noqa: BLE001 -- the cache only saves compile time
    mark(f"no persistent compilation cache: {e}")

DEV = jax.devices()[0]
KINDS = sorted({m.kind for m in DEV.addressable_memories()})
HAS_PINNED = "pinned_host" in KINDS
DEVS = SingleDeviceSharding(DEV)
PINS = SingleDeviceSharding(DEV, memory_kind="pinned_host") if HAS_PINNED else DEVS
bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32


def rms(x, w):
    x32 = x.astype(f32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(bf16) * w


def layer(p, x, kc, vc, pos):
    h = rms(x, p["n1"])
    qkv = h @ p["wqkv"]
    q = qkv[:, :DIM].reshape(ROWS, NKV, NH // NKV, HD)
    k, v = qkv[:1, DIM:DIM + KVD], qkv[:1, DIM + KVD:]
    kc = lax.dynamic_update_slice(kc, k, (pos, 0))
    vc = lax.dynamic_update_slice(vc, v, (pos, 0))
    s = jnp.einsum("rkgd,tkd->rkgt", q, kc.reshape(MAXLEN, NKV, HD)).astype(f32) * (HD ** -0.5)
    s = jnp.where(jnp.arange(MAXLEN) <= pos, s, -1e30)
    pr = jax.nn.softmax(s, -1).astype(bf16)
    o = jnp.einsum("rkgt,tkd->rkgd", pr, vc.reshape(MAXLEN, NKV, HD)).reshape(ROWS, DIM)
    x = x + o @ p["wo"]
    gu = rms(x, p["n2"]) @ p["wgu"]
    return x + (jax.nn.silu(gu[:, :HID]) * gu[:, HID:]) @ p["wd"], kc, vc


def forward(params, cache, tok, pos):
    x = jnp.zeros((ROWS, DIM), bf16).at[0].set(params["emb"][tok[0]])
    new = []
    for i in range(LAYERS):
        x, kc, vc = layer(params["layers"][i], x, cache[i][0], cache[i][1], pos)
        new.append((kc, vc))
    logits = rms(x[:1], params["nf"]) @ params["emb"].T
    return jnp.argmax(logits, -1).astype(i32), new


def step_ids(params, cache, ids):  # ids = [token, pad, position], as lpjax's host step sends them
    return forward(params, cache, ids[:1], ids[2])


def step_resident(params, cache, state):  # state = [token, position] stays on the device, donated
    tok, new = forward(params, cache, state[:1], state[1])
    return tok, jnp.stack([tok[0], (state[1] + 1) % MAXLEN]), new


def make_inputs():
    rng = np.random.default_rng(0)

    def w(*shape):
        return jax.device_put((rng.standard_normal(shape, np.float32) * 0.02).astype(jnp.bfloat16), DEVS)

    layers = [dict(n1=w(DIM), wqkv=w(DIM, DIM + 2 * KVD), wo=w(DIM, DIM), n2=w(DIM), wgu=w(DIM, 2 * HID),
                   wd=w(HID, DIM)) for _ in range(LAYERS)]
    params = dict(emb=w(VOCAB, DIM), nf=w(DIM), layers=layers)
    def zeros():
        return jax.device_put(np.zeros((MAXLEN, KVD), jnp.bfloat16), DEVS)

    return params, [(zeros(), zeros()) for _ in range(LAYERS)]


NEEDS = {"device_fresh": "device", "device_same": "device", "nodonate_same": "nodonate", "pinned_fresh": "pinned",
         "pinned_same": "pinned", "res_sync": "res_pinned", "res_overlap": "res_pinned", "res_nosync": "res_pinned",
         "resdev_sync": "res_device", "resdev_nosync": "res_device"}


def build(kind, params, cache):
    ids, state = jnp.zeros(3, i32), jnp.zeros(2, i32)
    if kind == "device":
        f, a = jax.jit(step_ids, donate_argnums=(1,)), ids
    elif kind == "nodonate":
        f, a = jax.jit(step_ids), ids
    elif kind == "pinned":
        f, a = jax.jit(step_ids, donate_argnums=(1,), out_shardings=(PINS, DEVS)), ids
    elif kind == "res_pinned":
        f, a = jax.jit(step_resident, donate_argnums=(1, 2), out_shardings=(PINS, DEVS, DEVS)), state
    else:
        f, a = jax.jit(step_resident, donate_argnums=(1, 2)), state
    t0 = time.perf_counter()
    c = f.lower(params, cache, a).compile()
    return c, time.perf_counter() - t0


def run_pattern(name, prog, params, cache):
    """(per-call seconds, dispatch seconds, cache): WARM calls, then CALLS timed calls."""
    pos = [0]

    def ids_now():
        pos[0] = (pos[0] + 1) % MAXLEN
        return np.array([7, 0, pos[0]], np.int32)

    same = jax.device_put(ids_now(), DEVS)
    state = jax.device_put(np.array([7, 0], np.int32), DEVS)
    per, disp = [], []

    def one(cache, state, timed, prev=None):
        t0 = time.perf_counter()
        if name.endswith("_fresh"):  # a fresh device buffer per call, as lpjax's Programs.put makes it
            out, cache = prog(params, cache, jax.device_put(ids_now(), DEVS))
        elif name in ("device_same", "pinned_same", "nodonate_same"):
            out, cache = prog(params, cache, same)
        else:
            out, state, cache = prog(params, cache, state)
        t1 = time.perf_counter()
        if name in ("res_nosync", "resdev_nosync"):
            pass
        elif name == "res_overlap":  # JetStream / SGLang overlap: read step n-1's token after launching step n
            if prev is not None:
                np.asarray(prev)
        else:
            np.asarray(out)
        t2 = time.perf_counter()
        if timed:
            per.append(t2 - t0)
            disp.append(t1 - t0)
        return cache, state, out

    prev = None
    for _ in range(WARM):
        cache, state, prev = one(cache, state, False, prev)
    jax.block_until_ready((cache, state, prev))
    mark(f"TIMED_BEGIN variant={VARIANT} pattern={name}")
    t0 = time.perf_counter()
    for _ in range(CALLS):
        cache, state, prev = one(cache, state, True, prev)
    jax.block_until_ready((cache, state, prev))
    wall = time.perf_counter() - t0
    mark(f"TIMED_END variant={VARIANT} pattern={name}")
    if name in ("res_nosync", "resdev_nosync", "res_overlap"):  # pipelined: the pace is wall time per call
        per = [wall / CALLS] * CALLS
    return per, disp, cache


def main():
    params, cache = make_inputs()
    emit(dict(kind="info", platform=DEV.platform, device=DEV.device_kind, jax=jax.__version__, memory_kinds=KINDS,
              layers=LAYERS, calls=CALLS, warm=WARM, xla_flags=E.get("XLA_FLAGS", ""),
              allocator=E.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default")))
    kinds = []
    for p in PATTERNS:
        k = NEEDS[p]
        if k in ("pinned", "res_pinned") and not HAS_PINNED:
            k = {"pinned": "device", "res_pinned": "res_device"}[k]
        if k not in kinds:
            kinds.append(k)
    progs = {}
    for k in kinds:  # all compiles first: a new executable evicts every other one's CUDA graphs
        mark(f"COMPILE {k}")
        progs[k], secs = build(k, params, cache)
        emit(dict(kind="compile", program=k, seconds=round(secs, 2)))
    for p in PATTERNS:
        k = NEEDS[p]
        k = k if k in progs else {"pinned": "device", "res_pinned": "res_device"}[k]
        mark(f"PATTERN_BEGIN variant={VARIANT} pattern={p} program={k}")
        per, disp, cache = run_pattern(p, progs[k], params, cache)
        ms = np.asarray(per) * 1e3
        emit(dict(kind="timing", pattern=p, program=k, pinned_out=k in ("pinned", "res_pinned"), calls=len(per),
                  median_ms=round(float(np.median(ms)), 4), p10_ms=round(float(np.percentile(ms, 10)), 4),
                  p90_ms=round(float(np.percentile(ms, 90)), 4),
                  dispatch_median_ms=round(float(np.median(np.asarray(disp) * 1e3)), 4)))
    mark(f"DONE variant={VARIANT}")


main()
PYEOF

cat > "$WORK/summary.py" <<'PYEOF'
"""Join timing runs with the counts parsed from their log twins; print one table."""
import collections
import json
import os
import re
import sys

out = sys.argv[1]
recs = [json.loads(line) for line in open(os.path.join(out, "results.jsonl")) if line.strip()]
TIMED = re.compile(r"@@PROBE TIMED_(BEGIN|END) variant=(\S+) pattern=(\S+)")
CHANGED = re.compile(r"Buffer allocations changed address between module (\S+) executions: \[(.*)\]")
UPDATED_US = re.compile(r"Updated command buffer in (\d+)")
CMDS = re.compile(r"Updated (\d+) commands in (\d+) .*skipped (\d+) command updates")
BUFS = re.compile(r"Buffer (\d+) -> (\S+) \((\d+) B\)")


def parse(path):
    """Per pattern (timed calls only): executes, updates, update us, commands updated, moved allocations."""
    res, cur, sizes = {}, None, {}
    if not os.path.exists(path):
        return res
    for line in open(path, errors="replace"):
        m = TIMED.search(line)
        if m:
            cur = m.group(3) if m.group(1) == "BEGIN" else None
            if cur:
                res[cur] = dict(execs=0, updates=0, records=0, upd_us=[], cmds=[], moved=collections.Counter(),
                                copyprot=0, fallback=0)
            continue
        if "Buffer 0 -> " in line:
            sizes = {int(i): int(b) for i, _, b in BUFS.findall(line)}
        if cur is None:
            continue
        r = res[cur]
        if "Execute command buffer; num_executions" in line or "Execute command buffer;" in line:
            r["execs"] += 1
        elif "Create/Update command buffer" in line:
            if "is_first_record=1" in line or "is_first_record=true" in line:
                r["records"] += 1
            else:
                r["updates"] += 1
        elif "as a regular thunk sequence" in line:
            r["fallback"] += 1
        elif "Using copy-protection" in line:
            r["copyprot"] += 1
        m = UPDATED_US.search(line)
        if m:
            r["upd_us"].append(int(m.group(1)))
        m = CMDS.search(line)
        if m:
            r["cmds"].append(int(m.group(1)) - int(m.group(3)))
        m = CHANGED.search(line)
        if m:
            for item in m.group(2).split(", "):
                if ":" in item:
                    idx, kind = item.split(":", 1)
                    kb = sizes.get(int(idx), -1)
                    r["moved"][f"{kind}#{idx}({kb}B)"] += 1
    return res


LOGS = {"base": "log_base.txt", "tempcolor": "log_tempcolor.txt", "skiptemp": "log_skiptemp.txt",
        "skipprofiled": "log_skipprofiled.txt"}
counts = {cfg: parse(os.path.join(out, f)) for cfg, f in LOGS.items()}
runs = [r for r in recs if r.get("kind") == "run"]
info = {r["variant"]: r for r in recs if r.get("kind") == "info"}
lines = []
w = lines.append
first = next(iter(info.values()), {})
w(f"platform={first.get('platform')} device={first.get('device')} jax={first.get('jax')} "
  f"memory_kinds={first.get('memory_kinds')} layers={first.get('layers')}")
w("")
w("runs (rc 139 = SIGSEGV, 134 = abort, 124 = timeout):")
for r in runs:
    w(f"  {r['variant']:<18} rc={r['rc']:<4} {r['secs']:>4}s  {r.get('note', '')}")
w("")
hdr = (f"{'variant':<16} {'pattern':<14} {'out':<6} {'median':>7} {'p10':>7} {'p90':>7} {'disp':>7} | "
       f"{'upd/exec':>9} {'upd_us':>7} {'cmds/upd':>8} moved allocations (timed calls of the log twin)")
w("per-call wall time in ms (host to host; pipelined patterns: wall/calls); disp = until the call returned")
w(hdr)
w("-" * len(hdr))
for r in recs:
    if r.get("kind") != "timing":
        continue
    c = counts.get(r["config"], {}).get(r["pattern"]) if r["config"] in counts else None
    if c:
        ex = max(c["execs"], 1)
        upd = f"{c['updates']}/{c['execs']}"
        us = f"{sum(c['upd_us']) / len(c['upd_us']):.0f}" if c["upd_us"] else "-"
        cm = f"{sum(c['cmds']) / len(c['cmds']):.0f}" if c["cmds"] else "-"
        mv = ", ".join(f"{k} x{n}" for k, n in c["moved"].most_common(4)) or "none"
        extra = []
        if c["fallback"]:
            extra.append(f"op-by-op {c['fallback']}")
        if c["copyprot"]:
            extra.append(f"copy-protection {c['copyprot']}")
        if c["records"]:
            extra.append(f"re-records {c['records']}")
        mv += (" [" + "; ".join(extra) + "]") if extra else ""
        del ex
    else:
        upd = us = cm = "-"
        mv = ""
    tag = r["variant"] + ("*" if r["log"] else "")
    w(f"{tag:<16} {r['pattern']:<14} {'pinned' if r['pinned_out'] else 'device':<6} {r['median_ms']:>7.3f} "
      f"{r['p10_ms']:>7.3f} {r['p90_ms']:>7.3f} {r['dispatch_median_ms']:>7.3f} | {upd:>9} {us:>7} {cm:>8} {mv}")
w("")
w("* = log twin (VLOGs on, fewer calls): its times are inflated by logging; its counts fill the right-hand columns")
w("    of every row of the same configuration. upd/exec: command-buffer updates / executions over the timed calls;")
w("    upd_us: XLA's own update time; cmds/upd: commands actually re-recorded per update (of all in the graph).")
print("\n".join(lines))
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
PYEOF

VMOD="command_buffer_thunk=3,command_executor=1,gpu_executable=5,gpu_executable_buffer_allocator=3"
VMOD="$VMOD,gpu_executable_va_remap_allocator=3"
AUTOTUNE="--xla_gpu_per_fusion_autotune_cache_dir=$WORK/autotune"
ALL="device_fresh,device_same,nodonate_same,pinned_fresh,pinned_same,res_sync,res_overlap,res_nosync"
MAIN="device_fresh,device_same,pinned_fresh,pinned_same,res_sync,res_overlap,res_nosync"
VMM_SAFE_FIRST="device_fresh,device_same,resdev_sync,resdev_nosync,pinned_same"  # pinned last: suspected crash

# name | config | log? | XLA_FLAGS (besides the autotune cache) | extra env | patterns
VARIANTS=(
  "base|base|0||-|$ALL"
  "tempcolor|tempcolor|0|--xla_gpu_temp_buffer_use_separate_color=true|-|$MAIN"
  "base_log|base|1||-|$ALL"
  "tempcolor_log|tempcolor|1|--xla_gpu_temp_buffer_use_separate_color=true|-|$MAIN"
  "skiptemp_log|skiptemp|1|--xla_gpu_command_buffer_update_mode=SKIP_TEMP|-|$VMM_SAFE_FIRST"
  "vmm_alloc|vmm|0||XLA_PYTHON_CLIENT_ALLOCATOR=vmm|device_same,resdev_sync,pinned_same"
  "skiptemp|skiptemp|0|--xla_gpu_command_buffer_update_mode=SKIP_TEMP|-|$VMM_SAFE_FIRST"
  "nocmdbuf|nocmdbuf|0|--xla_gpu_enable_command_buffer=|-|device_same,pinned_fresh,pinned_same,res_sync,res_nosync"
  "skipprofiled_log|skipprofiled|1|--xla_gpu_command_buffer_update_mode=SKIP_PROFILED|-|$VMM_SAFE_FIRST"
  "skipprofiled|skipprofiled|0|--xla_gpu_command_buffer_update_mode=SKIP_PROFILED|-|$VMM_SAFE_FIRST"
)

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
  $PY -c 'import jax, jaxlib, numpy; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "numpy", numpy.__version__); print(jax.devices())' 2>&1 | tail -3
  echo "TF_CPP_VMODULE for log twins: $VMOD"
} > "$OUT/env.txt"

for v in "${VARIANTS[@]}"; do
  IFS='|' read -r name config logged flags extra patterns <<< "$v"
  if [ -n "${PROBE_VARIANTS:-}" ] && [[ ",$PROBE_VARIANTS," != *",$name,"* ]]; then continue; fi
  left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 25 )); then
    printf '{"kind":"run","variant":"%s","rc":-1,"secs":0,"note":"skipped: the %ss budget is spent"}\n' "$name" "$BUDGET" >> "$PROBE_RESULTS"
    continue
  fi
  tmo=$(( left < 80 ? left : 80 ))
  envs=(PROBE_VARIANT="$name" PROBE_CONFIG="$config" PROBE_LOG="$logged" PROBE_PATTERNS="$patterns"
        XLA_FLAGS="$AUTOTUNE $flags")
  [ "$extra" != "-" ] && envs+=("$extra")
  if [ "$logged" = 1 ]; then
    envs+=(TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE="$VMOD")
    errf="$OUT/log_$config.txt"
  else
    errf="$WORK/stderr_$name.txt"
  fi
  t0=$SECONDS
  echo "[$(( SECONDS - START ))s] $name: XLA_FLAGS='$flags' ${extra/-/} patterns=$patterns" >&2
  env "${envs[@]}" timeout -k 5 "$tmo" "$PY" "$WORK/probe.py" > "$WORK/stdout_$name.txt" 2> "$errf"
  rc=$?
  note=""
  if [ $rc -ne 0 ]; then
    last=$(grep -o "PATTERN_BEGIN variant=$name pattern=[a-z_]*\|COMPILE [a-z_]*" "$errf" | tail -1)
    if grep -q "Flag parsing failed\|Unknown flag\|Illegal value" "$errf"; then
      note="flag rejected"
    else
      note="died in: ${last:-startup}"
    fi
  fi
  printf '{"kind":"run","variant":"%s","rc":%d,"secs":%d,"note":"%s"}\n' "$name" "$rc" $(( SECONDS - t0 )) "$note" >> "$PROBE_RESULTS"
  if [ "$logged" != 1 ]; then
    { echo "===== $name rc=$rc $note"; tail -c 20000 "$errf"; echo; } >> "$OUT/stderr_runs.txt"
  else
    { echo "===== $name rc=$rc $note (full stderr: log_$config.txt)"; grep -v "^I[0-9]\|^@@PROBE" "$errf" | tail -c 6000; echo; } >> "$OUT/stderr_runs.txt"
  fi
  echo "   rc=$rc $note ($(( SECONDS - t0 ))s)" >&2
done

for f in "$OUT"/log_*.txt; do  # keep each log under the 16 MB a returned file may have
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15000000 ] && { head -c 7000000 "$f"; echo "... [cut] ..."; tail -c 7000000 "$f"; } > "$f.cut" && mv "$f.cut" "$f"
done
"$PY" "$WORK/summary.py" "$OUT"
echo "[total $(( SECONDS - START ))s] files: $(ls "$OUT" | tr '\n' ' ')"
