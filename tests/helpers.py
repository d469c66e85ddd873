"""Tiny HF Llama checkpoints and tokenizers built on the spot (no downloads), and a PyTorch LP reference."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
# The test session's XLA compile flags (tests/conftest.py puts them in XLA_FLAGS, unless it sets them already, and
# the command lines tests start inherit them): the CPU backend's LLVM optimisation level 0, and XLA's loop emitters
# instead of its newer fusion emitters. The same HLO programs (fusions, shardings, collectives) compiled in about
# half the time; the fusion emitters' choice leaves every logit bit for bit as it was.
COMPILE_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
_DEVICE_COUNT = re.compile(r"\s*--xla_force_host_platform_device_count=\S*")


def with_device_count(xla_flags: str, devices: int) -> str:
    """XLA_FLAGS with `devices` forced CPU devices instead of any count they gave."""
    return f"{_DEVICE_COUNT.sub('', xla_flags)} --xla_force_host_platform_device_count={devices}".strip()


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command line a test starts: the session's (its compile cache and compile flags, PyTorch
    on one thread, offline HF), the checkout first on PYTHONPATH, `devices` CPU devices (default: the session's 8)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra)
    if devices is not None:
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices)
    return env

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Layer parallelism evaluates pairs of consecutive layers on the "
    "same input. A pretrained language model keeps most of its quality when a few middle layers run in parallel. "
    "JAX compiles the whole decode loop; the cache is static and donated. Tensor parallelism splits heads. "
) * 4

# name -> transformers LlamaConfig kwargs (vocab_size is set from the tokenizer)
CONFIGS = {
    "mha": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256),
    "gqa_head_dim": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=500000.0),
    "llama3_rope": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256),
    "bias": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, attention_bias=True, mlp_bias=True, max_position_embeddings=256,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # tied embeddings and a vocabulary (322) that 4 devices do not divide: the vocabulary is padded
    "tied_odd_vocab": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
                           vocab_size=322),
    # every matrix row a multiple of 256 values, so each GGUF block type (K-quants included) can hold it
    "gguf_blocks": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rope_theta=100000.0),
    # divides over 8 devices: 8 heads, 2 KV heads (repeated), MLP 128
    "shardable": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=256),
    # the same layers, 4 of them: a sequential layer before and after one pair, for inductor's programs (each distinct
    # fusion between stages is one more C++ kernel compiled on a fresh machine)
    "shardable_4_layers": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=2, max_position_embeddings=256),
}


def make_tokenizer(directory: Path, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on CORPUS that prepends <s>, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def make_checkpoint(directory: Path, name: str, seed: int = 0, dtype: str = "float32",
                    max_shard_size: str | None = None):
    """Save a random tiny `LlamaForCausalLM` (and tokenizer) in `directory`; return the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tok = make_tokenizer(directory)
    kwargs = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2) | CONFIGS[name]
    config = LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger-than-default weights so layers actually change the residual stream
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            elif p.ndim == 1 and "norm" not in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.05)
            else:
                p.uniform_(0.8, 1.2)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def torch_lp_logits(model, input_ids, pairs):
    """Independent PyTorch reference of docs/design.md section 1, built from the HF model's own modules:
    for each pair (a, b), h = x + A_a(n1_a(x)) + A_b(n1_b(x)); out = h + M_a(n2_a(h)) + M_b(n2_b(h))."""
    import torch

    m = model.model
    firsts = {a: b for a, b in pairs}
    seconds = set(firsts.values())
    with torch.no_grad():
        ids = torch.as_tensor(input_ids)
        x = m.embed_tokens(ids)
        T = ids.shape[1]
        pos = torch.arange(T)[None].expand(ids.shape[0], T)
        cos_sin = m.rotary_emb(x, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None].to(x.dtype)

        def attn(layer, h):
            return layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=cos_sin,
                                   attention_mask=mask)[0]

        def mlp(layer, h):
            return layer.mlp(layer.post_attention_layernorm(h))

        for i, layer in enumerate(m.layers):
            if i in seconds:
                continue
            if i in firsts:
                other = m.layers[firsts[i]]
                h = x + attn(layer, x) + attn(other, x)
                x = h + mlp(layer, h) + mlp(other, h)
            else:
                h = x + attn(layer, x)
                x = h + mlp(layer, h)
        return model.lm_head(m.norm(x)).float().numpy()
