"""Checkpoint loading and conversion: round trip, validation of every tensor, nothing overwritten unasked."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lpjax.engine import Engine
from lpjax.errors import LPJaxError

IDS = np.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


def test_convert_round_trip_gives_the_same_logits(checkpoints, engines, tmp_path):
    from convert import convert

    directory, _ = checkpoints("tied")
    out = tmp_path / "converted"
    convert(directory, out, "float32", show_progress=False)
    assert (out / "lpjax.json").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "params").iterdir())[:2] == ["globals", "layer_0000"]
    converted = Engine.load(str(out), "1:3", 1, "float32")
    assert np.array_equal(converted.logits(IDS), engines("tied", "1:3").logits(IDS))
    assert converted.tokenizer.encode("fox") == engines("tied").tokenizer.encode("fox")
    # bfloat16 conversion loads too, close to float32
    convert(directory, tmp_path / "bf16", "bfloat16", show_progress=False)
    bf16 = Engine.load(str(tmp_path / "bf16"), "", 1, "float32").logits(IDS)
    assert np.abs(bf16 - engines("tied").logits(IDS)).max() < 0.1


def test_convert_never_overwrites_unasked(checkpoints, tmp_path):
    from convert import convert

    directory, _ = checkpoints("mha")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(LPJaxError, match="already exists"):
        convert(directory, mine, show_progress=False)
    with pytest.raises(LPJaxError, match="not one"):
        convert(directory, mine, overwrite=True, show_progress=False)
    assert (mine / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    convert(directory, out, show_progress=False)
    convert(directory, out, overwrite=True, show_progress=False)  # replacing our own checkpoint is fine
    assert (out / "lpjax.json").is_file()


def broken_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors")
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case,words", [
    ("missing", "is missing"),
    ("misshapen", "has shape"),
    ("extra", "not used"),
    ("truncated", "safetensors"),
    ("model_type", "model_type"),
])
def test_bad_checkpoints_are_explained(checkpoints, tmp_path, case, words):
    src, _ = checkpoints("mha")
    dst = tmp_path / case
    if case == "missing":
        broken_copy(src, dst, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "misshapen":
        broken_copy(src, dst, lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
    elif case == "extra":
        broken_copy(src, dst, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.ones(2, np.float32)}))
    elif case == "truncated":
        broken_copy(src, dst)
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        broken_copy(src, dst, edit_config=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(LPJaxError, match=words):
        Engine.load(str(dst), "", 1, "float32")


def test_random_presets_are_plan_independent():
    """Random weights depend only on the canonical weight, so LP and sequential runs compare the same model."""
    a = Engine.load("random:tiny", "", 1, "float32")
    b = a.with_plan("2:4")
    la, lb = a.params["layer_2"]["attn"]["wqkv"][0], b.params["pair_2_3"]["attn"]["wqkv"][0]
    assert np.array_equal(np.asarray(la), np.asarray(lb))
    assert not np.array_equal(np.asarray(b.params["pair_2_3"]["attn"]["wqkv"][1]), np.asarray(la))
