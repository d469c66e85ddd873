"""Export to a Hugging Face Llama directory: transformers loads it and computes lpjax's logits; an exported LP
fine-tune keeps its trained weights; nothing a user wrote is replaced unasked."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, subprocess_env, torch_lp_logits

from lpjax.convert import convert_model
from lpjax.engine import Engine
from lpjax.errors import LPJaxError
from lpjax.sources import open_source
from lpjax.sources.safetensors import read_safetensors

TEXT = "The quick brown fox jumps over the lazy dog. Layer parallelism evaluates pairs of layers on one input."


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def transformers_model(directory):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()


def transformers_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def export_hf(model: str, out: Path) -> Path:
    convert_model(open_source(model), out, "float32", fmt="hf")
    return out


@pytest.mark.parametrize("name", ["tied", "mha", "gqa_head_dim", "bias"])
def test_hf_export_loads_in_transformers_with_lpjax_logits(checkpoints, engines, tmp_path, name):
    """tied + GQA, untied + MHA, untied GQA with an explicit head_dim, biases: exported from the HF directory, the
    tensors are the source's bit for bit and transformers' logits are lpjax's."""
    src, _ = checkpoints(name)
    out = export_hf(str(src), tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["lpjax"]["lp"] == ""
    original = {k: np.asarray(v) for k, v in read_safetensors(src / "model.safetensors").items()}
    exported = read_safetensors(out / "model.safetensors")
    if json.loads((src / "config.json").read_text()).get("tie_word_embeddings"):
        original.pop("lm_head.weight", None)
    assert exported.keys() == original.keys()
    assert all(np.array_equal(exported[k], original[k]) for k in original)
    engine = engines(name)
    ids = np.array([engine.tokenizer.encode(TEXT)])
    assert rel_err(transformers_logits(transformers_model(out), ids), engine.logits(ids)) <= 1e-4
    assert np.array_equal(Engine.load(str(out), "", 1, "float32").logits(ids), engine.logits(ids))


@pytest.fixture(scope="module")
def finetuned(checkpoints, tmp_path_factory):
    """A short LP fine-tune of layers 1 and 2 of the MHA checkpoint (float32), as `lpjax.finetune` writes it."""
    from helpers import CORPUS

    from lpjax import finetune
    from lpjax.training import programs

    d = tmp_path_factory.mktemp("ft")
    (d / "train.txt").write_text(CORPUS * 3)
    src, _ = checkpoints("mha")
    argv = ["--model", src, "--lp", "1:3", "--text", d / "train.txt", "--out", d / "model", "--steps", 4,
            "--warmup", 1, "--lr", 1e-2, "--seq-len", 16, "--batch-size", 4, "--compute-dtype", "float32",
            "--devices", 1, "--save-every", 0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(programs, "XLA_OPTIONS", {"xla_backend_optimization_level": 0})
        assert finetune.main(list(map(str, argv))) == 0
    return d / "model"


def test_exported_lp_finetune_keeps_its_weights_and_its_plan_note(checkpoints, finetuned, tmp_path):
    src, _ = checkpoints("mha")
    out = export_hf(str(finetuned), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["lpjax"]["lp"] == "1:3"
    exported, before = (read_safetensors(d / "model.safetensors") for d in (out, src))
    changed = {k for k in exported if not np.array_equal(exported[k], before[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in changed)
    model = transformers_model(out)
    engine = Engine.load(str(finetuned), "1:3", 1, "float32")
    ids = np.array([engine.tokenizer.encode(TEXT)])
    # sequentially, as transformers runs it; and under the plan, by the PyTorch LP reference over the HF modules
    assert rel_err(transformers_logits(model, ids), engine.with_plan("").logits(ids)) <= 1e-4
    assert rel_err(torch_lp_logits(model, ids, [(1, 2)]), engine.logits(ids)) <= 1e-4


def test_convert_command_exports_and_never_overwrites_unasked(checkpoints, tmp_path):
    """`python -m convert` in a checkout forwards to `python -m lpjax.convert`; --hf keeps working."""
    src, _ = checkpoints("tied")
    out = tmp_path / "hf"

    def run(*args):
        return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                              env=subprocess_env(1), timeout=300)

    p = run("convert", "--model", src, "--out", out, "--format", "hf", "--dtype", "float32")
    assert p.returncode == 0, p.stderr
    assert (out / "model.safetensors").is_file() and "Hugging Face" in p.stdout
    p = run("lpjax.convert", "--hf", src, "--out", out, "--format", "hf")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:") and "already exists" in p.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(LPJaxError, match="not one"):
        convert_model(open_source(str(src)), mine, fmt="hf", overwrite=True)
    assert (mine / "notes.txt").read_text() == "mine"
    convert_model(open_source(str(src)), out, fmt="hf", overwrite=True)  # an earlier export is ours to replace


def test_hf_config_of_every_preset_reads_back_as_the_same_config():
    """Models without an HF config of their own (random presets, trained models) get one that says the same,
    RoPE scaling included."""
    from lpjax.config import PRESETS, from_hf, to_hf

    for name, config in PRESETS.items():
        assert from_hf(to_hf(config, "bfloat16")) == config, name


def test_random_weights_export_to_both_formats_with_the_same_logits(tmp_path):
    """`random:NAME` is a source like any other: exported as lpjax it reloads bit for bit, exported as HF
    transformers computes its logits."""
    ids = np.array([[256, 40, 41, 42, 43, 44, 45, 46, 47]])
    engine = Engine.load("random:tiny", "", 1, "float32")
    for fmt in ("lpjax", "hf"):
        _, note = convert_model(open_source("random:tiny"), tmp_path / fmt, "float32", fmt=fmt)
        assert "no tokenizer" in note
    assert np.array_equal(Engine.load(str(tmp_path / "lpjax"), "2:4", 1, "float32").logits(ids),
                          engine.with_plan("2:4").logits(ids))
    assert rel_err(transformers_logits(transformers_model(tmp_path / "hf"), ids), engine.logits(ids)) <= 1e-4
