"""The Hugging Face transformers baselines on one GPU: `hf-eager` and `hf-static-compile`.

    python -m bench.hf_baselines --impl hf-eager|hf-static-compile --model llama2-7b --delta 0 --batch 1 \
        [--metrics ...] [--repeats 5] [--json-out FILE] [--device cpu]

- hf-eager: `LlamaForCausalLM` (attn_implementation "sdpa") and `model.generate` with its default dynamic cache.
- hf-static-compile: the same model with a `StaticCache` handed to `generate` (reset before every call, so one cache
  and one compiled graph serve every call) and transformers' own compilation of the decode step: with a static cache
  `generate` runs its forward through `torch.compile` (inductor, mode "reduce-overhead": CUDA graphs), asked here for
  `fullgraph=True` (falling back to transformers' default `fullgraph=False` if that fails). This is the documented
  transformers 5.x route (docs "Optimizing inference": static kv-cache and torch.compile). Warm-up calls finish the
  compilation and CUDA-graph recording before anything is timed. Prefill stays eager in both (as in generate).
  On CPU transformers does not compile (it compiles on accelerators only): the static cache runs eagerly, and the
  records say so.

Random weights built directly on the device in the target dtype (7B in seconds), from the HF config lpjax writes
for the preset (`lpjax.config.to_hf`). Greedy decoding with min_new_tokens = max_new_tokens, so EOS never stops a
run; the prompt is every runner's (`bench.common.prompt_ids`). Definitions (records as bench.torch_tp writes them):
  prefill_1024, prefill_4096  ms        one forward of the prompt with use_cache=True (logits of the last position
                                        only, as generate asks for), host clock with device syncs
  decode                      ms/token  one generate of 129 new tokens after the 128-token prompt: the time from the
                                        first token to the last over 128, stamped by a stopping criterion (CUDA
                                        events, no added sync): generate's own loop. The record's
                                        forward_loop_ms_per_token is the model alone: its decode forward called 128
                                        times in a Python loop, no generate (--decode-tokens N: N + 1 tokens timed
                                        over N, and N calls, for 129 over 128 and 128 calls)
  single_token                ms        after a 256-token prompt: the token ids up, one call of the forward generate
                                        uses (compiled for hf-static-compile), argmax on the device, ids back
  generate_4096               s         wall time of generate(4096 new tokens) after a 128-token prompt
  peak_memory                 GiB       torch.cuda.max_memory_allocated over the configuration's run
LP (`--delta`): the paired decoder layers are replaced by one module that runs the pair by the LP equations
(docs/design.md section 1) from the two HF layers' own norms, attention and MLP; each attention keeps its `layer_idx`,
so it keeps its own slot of the dynamic or static cache.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from bench import common
from bench.common import emit, host_peak_gib, log
from bench.records import DECODE_TOKENS, GENERATE_TOKENS, PROMPT_LEN, SINGLE_TOKEN_AT
from bench.torch_tp.context import (
    add_torch_args,
    check_device,
    default_dtype,
    free,
    make_record,
    prompt_tokens,
    torch_dtype,
)
from lpjax.config import ModelConfig, round_up, to_hf
from lpjax.engine import CACHE_MULTIPLE
from lpjax.errors import LPJaxError, first_line
from lpjax.plan import LPPlan

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMPLS = ("hf-eager", "hf-static-compile")


# ---------------------------------------------------------------------------------------------- model


def build_model(config: ModelConfig, device: str, dtype: str, seed: int = 0):
    """Random `LlamaForCausalLM` of `config` (its HF config as lpjax writes it, SDPA attention) created on `device` in
    `dtype` (no float32 copy on the host, no host->device copy: transformers' own init runs on the device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**to_hf(config, dtype), attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_model(directory, device: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device).eval()


class LPPair(nn.Module):
    """Two consecutive HF decoder layers run as one LP stage:
    h = x + A_a(n1_a(x)) + A_b(n1_b(x)); out = h + M_a(n2_a(h)) + M_b(n2_b(h)).
    Built from the layers' own modules; each attention keeps its `layer_idx`, hence its own cache slot. The call
    signature is the decoder layer's, and the attentions get exactly what a decoder layer passes them."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        x = hidden_states

        def attention(layer):
            return layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)[0]

        h = x + attention(self.first) + attention(self.second)
        return h + self.first.mlp(self.first.post_attention_layernorm(h)) + \
            self.second.mlp(self.second.post_attention_layernorm(h))


def apply_lp(model, plan: LPPlan) -> None:
    """Run `model` (a LlamaForCausalLM) under `plan`: its layer list becomes the plan's stages (a decoder layer or an
    LPPair). The original layers are kept, so the plan can be changed again (an empty plan restores the model)."""
    base = model.model
    if not hasattr(base, "_lp_original_layers"):
        base._lp_original_layers = list(base.layers)
    layers = base._lp_original_layers
    if plan.n_layers != len(layers):
        raise LPJaxError(f"LP plan is for {plan.n_layers} layers but the model has {len(layers)}")
    base.layers = nn.ModuleList([LPPair(layers[s.layers[0]], layers[s.layers[1]]) if s.is_pair
                                 else layers[s.layers[0]] for s in plan.stages])


# ---------------------------------------------------------------------------------------------- measuring


class Runner:
    """One (model, impl, batch) configuration: generate / forward calls timed on the host with device syncs."""

    def __init__(self, model, impl: str, device: str, config: ModelConfig, decode_tokens: int = DECODE_TOKENS):
        self.model, self.impl, self.device, self.config = model, impl, device, config
        self.decode_tokens = decode_tokens  # the decode metric's steps
        self.static = impl == "hf-static-compile"
        self.caches: dict[tuple[int, int], object] = {}
        self.fullgraph = True
        self.warm_calls = 2 if self.static and device == "cuda" else 1  # compile, then record the CUDA graphs
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def decode_cache_len(self) -> int:
        """The static cache of the decode metric and of single_token: room for both, in lpjax's cache multiple."""
        return round_up(max(PROMPT_LEN + self.decode_tokens + 1, SINGLE_TOKEN_AT + 2), CACHE_MULTIPLE)

    def cache(self, batch: int, length: int):
        """The static cache of this shape (reused across calls, so the compiled decode graph is too)."""
        from transformers import StaticCache

        key = (batch, length)
        if key not in self.caches:
            self.caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self.caches[key]
        cache.reset()
        return cache

    def generation_config(self, new_tokens: int):
        from transformers import CompileConfig, GenerationConfig

        c = self.config
        eos = list(c.eos_token_ids) or None
        kwargs = {"compile_config": CompileConfig(fullgraph=self.fullgraph)} if self.static else {}
        return GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                eos_token_id=eos, pad_token_id=eos[0] if eos else 0, bos_token_id=c.bos_token_id,
                                **kwargs)

    def generate(self, ids: torch.Tensor, new_tokens: int, cache_len: int, clock: StepClock | None = None):
        kwargs = {"past_key_values": self.cache(ids.shape[0], cache_len)} if self.static else {}
        if clock is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([clock])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=self.generation_config(new_tokens), **kwargs)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
        return out

    def warm_generate(self, ids: torch.Tensor, new_tokens: int, cache_len: int, times: int) -> None:
        """Untimed calls; for hf-static-compile they compile and record the decode graph. A fullgraph compile that
        fails falls back to transformers' default (graph breaks allowed), once."""
        try:
            for _ in range(times):
                self.generate(ids, new_tokens, cache_len)
        except Exception as e:  # any compile failure: retry with the documented default once
            if not (self.static and self.fullgraph and self.device == "cuda"):
                raise
            log(f"[{self.impl}] fullgraph compile failed ({e.__class__.__name__}: {first_line(e)[:200]}); retrying "
                "with fullgraph=False")
            self.fullgraph = False
            torch._dynamo.reset()
            for _ in range(times):
                self.generate(ids, new_tokens, cache_len)

    def cache_arg(self, cache) -> dict:
        """The cache as the forward takes it: `cache=` in newer transformers, `past_key_values=` before."""
        return {self._cache_kw: cache}

    def prefilled(self, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
        """The cache generate would use (static, of the decode metric's length, or dynamic) after one forward of
        `ids`, and the next cache position [1]."""
        from transformers import DynamicCache

        cache = self.cache(ids.shape[0], self.decode_cache_len()) if self.static else \
            DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **self.cache_arg(cache))
        return cache, torch.tensor([ids.shape[1]], device=self.device)

    def decode_forward(self) -> Callable:
        """The forward generate runs for each new token: with a static cache on the GPU, transformers' compiled call
        (the same compile config, so the same compiled function); otherwise the model itself."""
        if self.static and self.device == "cuda":
            from transformers import CompileConfig

            return self.model.get_compiled_call(CompileConfig(fullgraph=self.fullgraph))
        return self.model

    def prefill_ms(self, ids: torch.Tensor) -> float:
        """One forward of the prompt. The static cache is reset before the clock starts (zeroing a 4096-slot
        cache is not prefill work); the dynamic cache is created inside the forward, as generate does."""
        kwargs = self.cache_arg(self.cache(ids.shape[0], round_up(ids.shape[1], CACHE_MULTIPLE))) if self.static else {}

        def run():
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits.argmax(-1)

        return 1000 * self.timed(run)

    def note(self) -> str:
        if not self.static:
            return "transformers generate, dynamic cache, eager"
        if self.device != "cuda":
            return "static cache; torch.compile skipped on cpu (transformers compiles on accelerators only)"
        return ("static cache; decode step compiled by generate (inductor, reduce-overhead, "
                f"fullgraph={self.fullgraph}); prefill eager")


class StepClock:
    """A stopping criterion that stops nothing: each time `generate` has chosen a token it stamps the time (a CUDA
    event on the GPU, so it adds no synchronisation; the host clock on CPU). The gaps between stamps are generate's
    own per-token cost, its Python loop included."""

    def __init__(self, device: str):
        self.cuda, self.stamps = device == "cuda", []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.cuda:
            self.stamps.append(torch.cuda.Event(enable_timing=True))
            self.stamps[-1].record()
        else:
            self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_step(self) -> float:
        """Mean ms between the first stamp (the prefill's token) and the last."""
        first, last = self.stamps[0], self.stamps[-1]
        if self.cuda:
            last.synchronize()
            total = first.elapsed_time(last)
        else:
            total = 1000 * (last - first)
        return total / (len(self.stamps) - 1)


def _decode_samples(r: Runner, batch: int, repeats: int) -> list[float]:
    """records' decode for generate: one generate of r.decode_tokens + 1 tokens; the time from the first token's
    stamp to the last, over r.decode_tokens (StepClock)."""
    ids = prompt_tokens(PROMPT_LEN, batch, r.config, r.device)
    length, new_tokens = r.decode_cache_len(), r.decode_tokens + 1
    r.warm_generate(ids, new_tokens, length, r.warm_calls)
    samples = []
    for _ in range(repeats):
        clock = StepClock(r.device)
        r.generate(ids, new_tokens, length, clock)
        samples.append(clock.ms_per_step())
    return samples


def _forward_loop_ms(r: Runner, batch: int) -> float:
    """The model alone, without generate: after a prefill, r.decode_tokens calls of the forward generate uses (for
    hf-static-compile its compiled call) in a Python loop, each fed the previous argmax on the device; ms per step.
    Set beside `decode`, it tells generate's own overhead from the model's time."""
    ids = prompt_tokens(PROMPT_LEN, batch, r.config, r.device)
    forward, (cache, position) = r.decode_forward(), r.prefilled(ids)
    token = ids[:, -1:]

    def loop(steps: int) -> None:
        nonlocal token, position
        for _ in range(steps):
            token = forward(input_ids=token, cache_position=position, **r.cache_arg(cache)).logits[:, -1:].argmax(-1)
            position = position + 1

    with torch.no_grad():
        loop(3)  # compile and record the graphs of this call's shapes
        return 1000 * r.timed(lambda: loop(r.decode_tokens)) / r.decode_tokens


def _single_token_samples(r: Runner, batch: int, repeats: int) -> list[float]:
    """records' single_token for transformers: after a prefill of SINGLE_TOKEN_AT tokens, the token ids go up, one
    call of the forward generate uses (hf-static-compile: its compiled call on the static cache), argmax on the
    device, the next ids come back. Three untimed calls first (compile, CUDA graph recording)."""
    ids = prompt_tokens(SINGLE_TOKEN_AT, batch, r.config, r.device)
    forward, (cache, position) = r.decode_forward(), r.prefilled(ids)
    current = ids[:, -1].cpu()

    def step() -> None:
        nonlocal current, position
        with torch.no_grad():
            logits = forward(input_ids=current[:, None].to(r.device), cache_position=position,
                             **r.cache_arg(cache)).logits
        current = logits[:, -1].argmax(-1).cpu()
        position = position + 1

    return [1000 * r.timed(step) for _ in range(repeats + 3)][3:]


def _generate_samples(r: Runner, batch: int, repeats: int) -> list[float]:
    ids = prompt_tokens(PROMPT_LEN, batch, r.config, r.device)
    length = round_up(PROMPT_LEN + GENERATE_TOKENS, CACHE_MULTIPLE)
    r.warm_generate(ids, 16, length, r.warm_calls)  # a new cache shape: compiled and recorded here
    return [r.timed(lambda: r.generate(ids, GENERATE_TOKENS, length)) for _ in range(repeats)]


def _prefill_samples(r: Runner, batch: int, length: int, repeats: int) -> list[float]:
    ids = prompt_tokens(length, batch, r.config, r.device)
    return [r.prefill_ms(ids) for _ in range(repeats + 1)][1:]  # the first is the warm-up


def measure(model, impl: str, name: str, config: ModelConfig, plan: LPPlan, batch: int, metrics: list[str],
            repeats: int, long_repeats: int, device: str, dtype: str, json_out: str | None,
            decode_tokens: int = DECODE_TOKENS) -> list[dict]:
    """Every asked metric of one configuration; records emitted as they are measured, and returned."""
    import transformers

    r = Runner(model, impl, device, config, decode_tokens)
    records = []

    def done(metric: str, samples: list[float], **extra) -> None:
        rec = make_record(impl, name, 1, plan, batch, metric, samples, device, dtype=dtype, note=r.note(),
                          versions={"transformers": transformers.__version__}, **extra)
        log(f"[{impl}] batch {batch} {metric}: {rec['value']} {rec['unit']}")
        emit(rec, json_out)
        records.append(rec)

    if "decode" in metrics or metrics == ["peak_memory"]:
        samples = _decode_samples(r, batch, repeats if "decode" in metrics else 1)
        if "decode" in metrics:
            done("decode", samples, forward_loop_ms_per_token=round(_forward_loop_ms(r, batch), 4),
                 decode_tokens=decode_tokens)
    if "single_token" in metrics:
        done("single_token", _single_token_samples(r, batch, repeats))
    if "generate_4096" in metrics:
        done("generate_4096", _generate_samples(r, batch, long_repeats))
    for length in (1024, 4096):
        if f"prefill_{length}" in metrics:
            done(f"prefill_{length}", _prefill_samples(r, batch, length, repeats))
    if "peak_memory" in metrics:
        done("peak_memory", [torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else host_peak_gib()])
    r.caches.clear()
    return records


def _drop_compiled(model) -> None:
    """Forget generate's compiled forward (and its CUDA graphs) before the model's structure or batch changes."""
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hf_baselines", description=__doc__.splitlines()[0])
    p.add_argument("--impl", required=True, help=f"{' or '.join(IMPLS)} (or both, comma-separated)")
    common.add_runner_args(p, "must be 1 (the transformers baselines run on one device)")
    add_torch_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    impls = common.parse_names(args.impl)
    if not impls or any(i not in IMPLS for i in impls):
        raise LPJaxError(f"--impl {args.impl}: choose {' or '.join(IMPLS)}")
    if args.devices != 1:
        raise LPJaxError(f"--devices {args.devices}: the transformers baselines run on one GPU (use bench.torch_tp "
                         "for more)")
    common.check_counts(args)
    name, config, directory = common.resolve_model(args.model)
    check_device(args.device, 1)
    common.check_json_out(args.json_out)
    plans = common.runner_plans(args, config)
    batches = common.parse_ints(args.batch, "--batch", 1)
    metrics = common.parse_metrics(args.metrics)
    dtype = default_dtype(args.device, args.dtype)
    t0 = time.perf_counter()
    model = load_model(directory, args.device, torch_dtype(dtype)) if directory else \
        build_model(config, args.device, dtype, args.seed)
    if args.device == "cuda":
        torch.cuda.synchronize()
    log(f"[hf] {name}: {config.n_params / 1e9:.3g}B params, {dtype}, on {args.device}, "
        f"ready in {time.perf_counter() - t0:.1f} s")
    for impl in impls:
        for plan in plans:
            apply_lp(model, plan)
            for batch in batches:
                free(args.device)
                log(f"[{impl}] LP {plan.describe()}, batch {batch}")
                measure(model, impl, name, config, plan, batch, metrics, args.repeats, args.long_repeats,
                        args.device, dtype, args.json_out, args.decode_tokens)
                _drop_compiled(model)
    return 0


if __name__ == "__main__":
    sys.exit(common.exit_code(main))
