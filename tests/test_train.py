"""Training from scratch and LP fine-tuning: loss goes down, only paired layers change, a resumed run ends where an
uninterrupted one does, outputs load in the engine, and bad input gets one line."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import CONFIGS, CORPUS, ROOT, subprocess_env

from lpjax import finetune, train
from lpjax.errors import LPJaxError
from lpjax.training import programs
from lpjax.training.rundir import STATE_DIR

VAL = "Layer parallelism evaluates pairs of consecutive layers on the same input. The quick brown fox jumps. " * 3
TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--vocab-size", "300",
        "--seq-len", "16", "--batch-size", "4", "--warmup", "3", "--lr", "1e-2", "--compute-dtype", "float32",
        "--devices", "1", "--log-every", "1", "--save-every", "10", "--save-dtype", "float32"]
STEPS = 30


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """The CPU backend's optimisation level 0 halves these tests' compile times (same programs, less optimised)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(programs, "XLA_OPTIONS", {"xla_backend_optimization_level": 0})
        yield


def run_json(main, argv, capsys) -> dict:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def canonical(path) -> dict[str, np.ndarray]:
    """Every canonical weight of a model directory, as float32 numpy."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from lpjax.schema import canonical_shapes
    from lpjax.sources import open_source

    source = open_source(str(path))
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), PartitionSpec())
    got = source.read({k: sharding for k in canonical_shapes(source.config)}, jnp.float32)
    return {k: np.asarray(v) for k, v in got.items()}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_text")
    (d / "train.txt").write_text(CORPUS * 3)
    (d / "val.txt").write_text(VAL)
    return d / "train.txt", d / "val.txt"


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    """One uninterrupted run from scratch: (OUT, its JSON summary)."""
    out = tmp_path_factory.mktemp("runs") / "whole"
    argv = ["--text", texts[0], "--val", texts[1], "--out", out, "--steps", STEPS, *TINY, "--json"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert train.main(list(map(str, argv))) == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_train_from_scratch_lowers_loss_and_loads_in_the_engine(trained):
    from transformers import LlamaConfig

    from lpjax.engine import Engine

    out, res = trained
    losses = [loss for _, loss in res["history"]]
    assert res["steps"] == STEPS and res["tokens_seen"] == STEPS * 4 * 16 and len(losses) == STEPS
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert res["val_ppl"] < res["unigram_ppl"] and res["tokens_per_s"] > 0
    cfg = json.loads((out / "config.json").read_text())
    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.vocab_size) == (32, 2, 1, 300)
    engine = Engine.load(str(out), "", 1, "float32")
    tok = engine.tokenizer
    assert tok.encode("fox")[0] == engine.config.bos_token_id == 1
    result = engine.generate([tok.encode("fox")], 6)
    assert 1 <= len(result.tokens[0]) <= 6 and isinstance(tok.decode(result.tokens[0]), str)
    # the run's val perplexity is lpjax.eval's with --window seq_len --stride seq_len-1
    from lpjax.quality.perplexity import perplexity

    assert perplexity(engine, [tok.encode(VAL)], 16, 15)["ppl"] == pytest.approx(res["val_ppl"], rel=1e-4)


def test_resume_after_interruption_matches_the_uninterrupted_run(trained, texts, tmp_path, capsys):
    whole, _ = trained
    out = tmp_path / "resumed"
    argv = ["--text", texts[0], "--val", texts[1], "--out", out, "--steps", STEPS, *TINY]
    stopped = run_json(train.main, [*argv, "--stop-after", 13], capsys)
    assert stopped["stopped"] and stopped["steps"] == 13 and not (out / "lpjax.json").exists()
    assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == ["10", "13"]
    resumed = run_json(train.main, argv, capsys)
    assert resumed["resumed_from"] == 13 and resumed["steps"] == STEPS
    assert [s for s, _ in resumed["history"]] == list(range(14, STEPS + 1))  # no step lost or repeated
    a, b = canonical(whole), canonical(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a finished run re-run is a no-op that rewrites the same model; another setup is refused
    again = run_json(train.main, argv, capsys)
    assert again["resumed_from"] == STEPS and again["val_ppl"] == resumed["val_ppl"]
    with pytest.raises(LPJaxError, match=r"another setup \(hyper.steps 30 there, 31 now"):
        train.main(list(map(str, [*argv, "--steps", 31])))
    # --overwrite starts over in it
    fresh = run_json(train.main, [*argv, "--overwrite", "--stop-after", 2], capsys)
    assert fresh["resumed_from"] == 0 and fresh["steps"] == 2 and not (out / "lpjax.json").exists()
    assert [p.name for p in (out / STATE_DIR).iterdir()] == ["2"]


def test_data_parallel_run_follows_the_single_device_run(trained, texts, tmp_path, capsys):
    """The batch split over 2 devices: the same windows and updates, up to the order of float sums."""
    _, whole = trained
    argv = ["--text", texts[0], "--out", tmp_path / "dp", "--steps", STEPS, *TINY, "--devices", 2, "--stop-after", 4]
    res = run_json(train.main, argv, capsys)
    assert res["devices"] == 2
    assert np.allclose([v for _, v in res["history"]], [v for _, v in whole["history"][:4]], rtol=1e-5, atol=0)


def test_finetune_trains_only_paired_layers(checkpoints, texts, tmp_path, capsys):
    src, _ = checkpoints("mha")
    out = tmp_path / "ft"
    res = run_json(finetune.main, ["--model", src, "--lp", "1:3", "--text", texts[0], "--val", texts[0], "--out", out,
                                   "--steps", 10, "--warmup", 2, "--lr", 3e-3, "--seq-len", 16, "--batch-size", 4,
                                   "--log-every", 1, "--compute-dtype", "float32", "--devices", 1], capsys)
    losses = [loss for _, loss in res["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert res["val_ppl_after"] < res["val_ppl_before"] and res["val_ppl_sequential"] > 1
    assert json.loads((out / "lpjax.json").read_text())["training"]["lp"] == "1:3"
    before, after = canonical(src), canonical(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.partition("@")[2] in ("1", "2") for k in changed)  # only layers 1 and 2 trained
    assert {"wq@1", "w_down@2"} <= changed


def test_finetune_control_trains_the_same_layers_without_lp(checkpoints, texts, tmp_path, capsys):
    src, _ = checkpoints("mha")
    out = tmp_path / "control"
    res = run_json(finetune.main, ["--model", src, "--lp", "1:3", "--control", "--text", texts[0], "--val", texts[0],
                                   "--out", out, "--steps", 6, "--warmup", 2, "--lr", 3e-3, "--seq-len", 16,
                                   "--batch-size", 4, "--compute-dtype", "float32", "--devices", 1], capsys)
    assert res["control"] and res["val_ppl_before"] == pytest.approx(res["val_ppl_sequential"], rel=1e-5)
    assert res["val_ppl_after"] < res["val_ppl_before"]
    training = json.loads((out / "lpjax.json").read_text())["training"]
    assert training["lp"] == "" and training["trained_layers"] == "1:3" and training["control"]
    before, after = canonical(src), canonical(out)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.partition("@")[2] in ("1", "2") for k in changed)


@pytest.mark.parametrize("name", [*CONFIGS, "bias_gqa"])
def test_disassemble_inverts_assemble(name):
    import jax

    from lpjax.config import from_hf
    from lpjax.plan import LPPlan
    from lpjax.schema import global_shapes, layer_shapes
    from lpjax.sharding import Layout, make_mesh
    from lpjax.weights import assemble_globals, assemble_stage, disassemble_globals, disassemble_stage

    hf = dict(CONFIGS["bias"], num_attention_heads=8, num_key_value_heads=2) if name == "bias_gqa" else CONFIGS[name]
    config = from_hf(dict({"model_type": "llama", "vocab_size": 320}, **hf))
    rng = np.random.default_rng(0)
    draw = lambda shapes: {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}  # noqa: E731
    repeats = set()
    for n in (1, 4):  # 4 devices repeat the KV heads of GQA models
        layout = Layout.build(config, LPPlan.parse("0:2", config.n_layers), make_mesh(n))
        g = draw(global_shapes(config))
        back = jax.jit(lambda g, layout=layout: disassemble_globals(layout, assemble_globals(layout, g)))(g)
        assert back.keys() == g.keys() and all(np.array_equal(back[k], g[k]) for k in g)
        for s in layout.stages[:2]:  # the pair and one sequential layer
            layers = [draw(layer_shapes(config)) for _ in s.stage.layers]
            got = jax.jit(lambda ls, s=s: disassemble_stage(s, config, assemble_stage(s, config, ls)))(layers)
            assert len(got) == len(layers)
            for w, b in zip(layers, got):
                assert w.keys() == b.keys() and all(np.array_equal(w[k], np.asarray(b[k])) for k in w), (n, s.name)
            repeats.add(s.kv_repeat)
    assert (max(repeats) > 1) == (config.n_kv_heads < 4)  # KV-head repeats are undone


def test_bad_input_is_refused_before_anything_is_written(checkpoints, texts, tmp_path):
    src, _ = checkpoints("mha")
    with pytest.raises(LPJaxError, match="no training text"):
        train.main(["--out", str(tmp_path / "a"), *TINY])
    with pytest.raises(LPJaxError, match="nothing to fine-tune"):
        finetune.main(["--model", str(src), "--text", str(texts[0]), "--out", str(tmp_path / "b")])
    with pytest.raises(LPJaxError, match="no training text"):
        finetune.main(["--model", str(src), "--lp", "0:2", "--out", str(tmp_path / "b")])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(LPJaxError, match="shorter than one training window"):
        finetune.main(["--model", str(src), "--lp", "0:2", "--text", str(short), "--out", str(tmp_path / "c")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra, words in (([], "already exists and is not empty"), (["--overwrite"], "not one")):
        with pytest.raises(LPJaxError, match=words):
            train.main(["--text", str(texts[0]), "--out", str(mine), *TINY, *extra])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert not any((tmp_path / d).exists() for d in "abc")


def test_cli_error_is_one_line(checkpoints, texts, tmp_path):
    src, _ = checkpoints("mha")
    p = subprocess.run([sys.executable, "-m", "lpjax.finetune", "--model", str(src), "--text", str(texts[0]),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, env=subprocess_env(1), cwd=ROOT,
                       timeout=120)
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert lines == ["error: nothing to fine-tune: give --lp START:END, the LP plan whose paired layers to train"]
