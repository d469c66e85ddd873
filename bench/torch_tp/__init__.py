"""PyTorch tensor-parallel Llama with Layer Parallelism: the hand-written baseline lpjax is measured against.

    python -m bench.torch_tp --model llama2-7b --devices 2 --delta 14 --batch 1 \
        [--compile default] [--quantize int8|int4 [--group-size 128]] [--metrics decode,prefill_1024,...] \
        [--repeats 5] [--json-out FILE] [--device cpu] [--check]

The paper's own method, written plainly: one process per GPU (spawned with torch.multiprocessing),
torch.distributed + NCCL, random weights at the preset's real shapes initialised as lpjax's weight schema says
(values do not change speed), fused qkv and gate/up matmuls, a static preallocated KV cache, and a decode step
captured once in a CUDA graph that feeds itself: the token, its position and the output slot live in device buffers
the graph updates, so the decode loop is graph replays only, greedy argmax on the device, no host round-trip per
token. Prefill runs eagerly (SDPA, causal).

`--compile MODE` (the harness's `torch-compile`) is the same model written the way gpt-fast writes fast PyTorch:
prefill (per prompt length) and the whole greedy decode step go through `torch.compile` (inductor, fullgraph, static
shapes); the all-reduces and the logits' all-gather become functional collectives so they trace and compile inside
the graph; the compiled step is then captured in the same CUDA graph and replayed.

`--quantize int8|int4` is gpt-fast's weight-only quantization of the layer products (`quantize`): int8 per output
channel, the LM head too; int4 in groups of `--group-size` inputs through torch's int4pack kernel, the LM head kept
in the compute dtype. Embedding, norms and KV cache stay in the compute dtype, the plans are unchanged, and each rank
quantizes its own shard. Compiled, it runs with inductor's coordinate-descent tuning, as gpt-fast compiles it.

The model is lpjax's, in PyTorch: its layout rules (`lpjax.sharding.Layout`, docs/design.md section 3), weight
schema, RoPE frequencies (HF's rotate-half layout, `llama3` and `linear` scaling) and cache multiple.
- A sequential layer is Megatron tensor-parallel over all N ranks: heads and MLP columns split N ways, one
  all-reduce after the attention half and one after the MLP half.
- An LP pair (a, b) puts layer a on ranks 0..N/2-1 and layer b on ranks N/2..N-1, each split N/2 ways. The same two
  all-reduces over all N ranks sum the tensor-parallel partials and the pair at once: 2 a pair instead of 4.
- N = 1: the plain model on one device (a pair runs both its layers there), no collectives.
- Embedding replicated (a lookup of B rows needs no collective); LM head split over the (padded) vocabulary, logits
  all-gathered. Tied embeddings take the LM head's rows from the embedding.

Modules: `model` (a rank's shard and where its weights come from), `quantize` (the int8 / int4 weights and their
product), `decoder` (prefill, the decode step, the CUDA graph, `torch.compile`), `launch` (the ranks), `measure`
(the timed metrics), `check` (correctness), `context` (what `bench.hf_baselines` shares), `cli`. `--device cpu`
(gloo, float32, eager decode instead of a graph) exists for tests; `check` / `full_logits` return the full-sequence
logits and the cached greedy tokens for correctness tests, and `--check` runs that comparison on the chosen device.
`--no-cuda-graph` decodes eagerly on CUDA (a fallback if capture fails somewhere; records say cuda_graph: false).
"""

from bench.common import UNITS
from bench.torch_tp.check import check, full_logits
from bench.torch_tp.cli import main
from bench.torch_tp.decoder import _PROGRAMS, greedy_step, prefill
from bench.torch_tp.model import check_layout, kv_head_range, layer_slots, load_hf

__all__ = ["UNITS", "_PROGRAMS", "check", "check_layout", "full_logits", "greedy_step", "kv_head_range",
           "layer_slots", "load_hf", "main", "prefill"]
