"""Fine-tuning by distillation from the sequential model: the loss is zero when the student is the teacher, falls
under LP and brings the student's distributions closer to the teacher's; frozen weights stay bit for bit; the
teacher-written corpus comes back from its seed; an exported fine-tune keeps its plan."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from lpjax import finetune
from lpjax.finetune import corpus as corpus_cli
from lpjax.training import programs
from lpjax.training.corpus import CorpusSpec, read_prompts, read_sidecar, write_text

PLAN = "1:3"
TEXT = "The quick brown fox jumps over the lazy dog. Layer parallelism evaluates pairs of layers on one input."
TUNE = ["--seq-len", 16, "--batch-size", 4, "--warmup", 2, "--compute-dtype", "float32", "--devices", 1,
        "--log-every", 1, "--save-every", 0]


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """The CPU backend's optimisation level 0 halves these tests' compile times (same programs, less optimised)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(programs, "XLA_OPTIONS", {"xla_backend_optimization_level": 0})
        yield


def run_json(main, argv) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*map(str, argv), "--json"]) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


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


def mean_kl(teacher_logits, student_logits) -> float:
    """KL(teacher || student) of the next-token distributions, averaged over positions (float64)."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(teacher_logits), log_softmax(student_logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


# short prompts (one prefill bucket in the tiny tokenizer; a round of 4 holds all of them, so one prefill program
# serves every round) and a comment line
PROMPTS = "# what the tiny model is asked\nThe quick brown fox\nLayer parallelism\nJAX compiles the\nA pretrained\n"


@pytest.fixture(scope="module")
def teacher_text(checkpoints, tmp_path_factory):
    """A corpus the tiny MHA model wrote itself, through the command line: (text file, sidecar)."""
    src, _ = checkpoints("mha")
    d = tmp_path_factory.mktemp("corpus")
    (d / "prompts.txt").write_text(PROMPTS)
    meta = run_json(corpus_cli.main, ["--model", src, "--prompts", d / "prompts.txt", "--tokens", 120, "--seed", 3,
                                      "--max-new-tokens", 16, "--batch-size", 4, "--devices", 1,
                                      "--out", d / "teacher.txt"])
    return d / "teacher.txt", meta


@pytest.fixture(scope="module")
def distilled(checkpoints, teacher_text, tmp_path_factory):
    """A distillation fine-tune of layers 1 and 2 of the MHA checkpoint under --lp 1:3, on the teacher's own text:
    (OUT, its JSON summary)."""
    src, _ = checkpoints("mha")
    out = tmp_path_factory.mktemp("distill") / "model"
    res = run_json(finetune.main, ["--model", src, "--lp", PLAN, "--distill", "--distill-temperature", 2,
                                   "--text", teacher_text[0], "--out", out, "--steps", 12, "--lr", 3e-3, *TUNE])
    return out, res


def test_teacher_written_corpus_is_reproducible_from_its_seed(engines, teacher_text):
    text_file, meta = teacher_text
    text = text_file.read_text()
    spec = meta["spec"]
    assert read_sidecar(text_file, text) == meta  # the sidecar beside the text describes it
    assert spec["seed"] == 3 and spec["prompts"] == ["The quick brown fox", "Layer parallelism", "JAX compiles the",
                                                      "A pretrained"]
    assert meta["generated_tokens"] >= 120 and meta["samples"] >= 8 and meta["teacher"].startswith("Hugging Face")
    assert text.count("Layer parallelism") >= 2  # every prompt, each epoch in a fresh order
    engine = engines("mha")  # the same model, float32, one device: what the command ran
    assert write_text(engine, CorpusSpec.from_json(spec)).text == text
    other = write_text(engine, CorpusSpec.from_json(dict(spec, seed=4))).text
    assert other != text and len(other) > 100
    builtin = read_prompts("builtin")  # the shipped default: ~50 varied prompts
    assert len(set(builtin)) == len(builtin) >= 50


def test_distillation_loss_is_zero_when_the_student_is_the_teacher(checkpoints, teacher_text, tmp_path):
    """`--control` trains the layers without LP: the student starts as the sequential model, the teacher itself."""
    src, _ = checkpoints("mha")
    res = run_json(finetune.main, ["--model", src, "--lp", PLAN, "--control", "--distill", "--text",
                                   teacher_text[0], "--out", tmp_path / "same", "--steps", 3, "--lr", 3e-3, *TUNE,
                                   "--stop-after", 1])
    assert res["loss"] == "distill" and res["steps"] == 1
    assert res["history"][0][0] == 1 and abs(res["history"][0][1]) < 1e-6


def test_distillation_under_lp_lowers_the_loss_and_nears_the_sequential_model(distilled, engines, teacher_text):
    from lpjax.engine import Engine

    out, res = distilled
    losses = [loss for _, loss in res["history"]]
    assert res["loss"] == "distill" and res["distill_temperature"] == 2.0 and len(losses) == 12
    assert losses[0] > 1e-3 and np.mean(losses[-3:]) < np.mean(losses[:3])
    # measured outside training: the LP model's next-token distributions move toward the sequential model's
    sequential, lp = engines("mha"), engines("mha", PLAN)
    ids = np.array([sequential.tokenizer.encode(teacher_text[0].read_text())[:96]])
    tuned = Engine.load(str(out), PLAN, 1, "float32")
    teacher = sequential.logits(ids)
    assert mean_kl(teacher, tuned.logits(ids)) < 0.8 * mean_kl(teacher, lp.logits(ids))
    # the run records its loss and its text, and where the text came from
    run = json.loads((out / "train_run.json").read_text())
    assert run["setup"]["loss"] == {"kind": "distill", "temperature": 2.0}
    written = run["about"]["texts"]["train"][0]["teacher_written"]
    assert written["seed"] == 3 and written["generated_tokens"] == teacher_text[1]["generated_tokens"]
    assert json.loads((out / "lpjax.json").read_text())["training"]["loss"]["kind"] == "distill"


def test_distillation_leaves_frozen_weights_bit_identical(checkpoints, distilled):
    src, _ = checkpoints("mha")
    before, after = canonical(src), canonical(distilled[0])
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert {"wq@1", "w_down@2"} <= changed and all(k.partition("@")[2] in ("1", "2") for k in changed)


def test_exported_finetune_keeps_its_plan(distilled, tmp_path):
    """config.json records the plan; transformers still loads the directory; lpjax runs it under the plan when no
    --lp is given, and then computes the fine-tune's logits."""
    from transformers import LlamaForCausalLM

    from lpjax.convert import convert_model
    from lpjax.engine import Engine
    from lpjax.sources import open_source, plan_for

    out = tmp_path / "hf"
    _, note = convert_model(open_source(str(distilled[0])), out, "float32", fmt="hf")
    assert json.loads((out / "config.json").read_text())["lpjax"]["lp"] == PLAN and "records that plan" in note
    model = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    tuned = Engine.load(str(distilled[0]), PLAN, 1, "float32")
    ids = np.array([tuned.tokenizer.encode(TEXT)])
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(ids)).logits.float().numpy()
    sequential = tuned.with_plan("").logits(ids)
    assert np.abs(hf_logits - sequential).max() <= 1e-4 * np.abs(sequential).max()  # transformers runs it sequentially
    source = open_source(str(out))
    assert plan_for(source, None) == PLAN and plan_for(source, "") == ""  # an explicit --lp still wins
    assert plan_for(open_source(str(distilled[0])), None) == PLAN  # the fine-tune's own lpjax directory too
    exported = Engine.load(str(out), None, 1, "float32")  # no --lp: the plan its config.json records
    assert np.allclose(exported.logits(ids), tuned.logits(ids), rtol=0, atol=1e-5)


def test_val_scores_are_lpjax_evals_perplexity_and_accuracy(engines):
    """What every fine-tune reports on val, whatever its loss: the perplexity and next-token accuracy `lpjax.eval`
    computes with --window seq_len --stride seq_len-1. Scored in one window over a prompt and the model's own greedy
    continuation, whose tokens it predicts, so the accuracy is far from 0."""
    import jax.numpy as jnp

    from lpjax.plan import LPPlan
    from lpjax.quality.perplexity import perplexity
    from lpjax.sharding import make_mesh
    from lpjax.training.data import val_windows
    from lpjax.training.programs import Programs, data_mesh, single_device_layout
    from lpjax.training.settings import Hyper
    from lpjax.weights import load_params

    engine = engines("mha", PLAN)
    prompt = engine.tokenizer.encode(TEXT)
    ids = prompt + engine.generate([prompt], 24, eos=()).tokens[0]
    window = len(ids)
    expected = perplexity(engine, [ids], window, window - 1)
    layout = single_device_layout(engine.config, LPPlan.parse(PLAN, engine.config.n_layers))
    params = load_params(engine.source, layout, make_mesh(1), jnp.float32)
    hp = Hyper(steps=1, batch_size=1, seq_len=window, lr=1e-3, warmup=0, weight_decay=0.0, clip=1.0, seed=0,
               compute_dtype="float32")
    val = val_windows([ids], window)
    got = Programs(layout, hp, frozenset(), data_mesh(1)).evaluator(val, {}, params)({}, params)
    assert expected["accuracy"] > 0.2 and got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert got["ppl"] == pytest.approx(expected["ppl"], rel=1e-4) and got["tokens"] == expected["tokens"]


def test_corpus_command_refuses_bad_input_and_never_overwrites_unasked(tmp_path):
    from lpjax.errors import LPJaxError

    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    base = ["--model", str(tmp_path / "no-model"), "--tokens", "10"]
    with pytest.raises(LPJaxError, match="already exists"):
        corpus_cli.main([*base, "--out", str(mine)])
    with pytest.raises(LPJaxError, match="--prompts .*: no such file"):
        corpus_cli.main([*base, "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "a.txt")])
    with pytest.raises(LPJaxError, match="--tokens 0: must be at least 1"):
        corpus_cli.main([*base[:-1], "0", "--out", str(tmp_path / "b.txt")])
    with pytest.raises(LPJaxError, match="the sidecar would be the text file itself"):
        corpus_cli.main([*base, "--out", str(tmp_path / "c.json")])
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_distill_report_measures_each_run_against_its_control_and_variants_against_the_best_control(tmp_path):
    from bench import distill_report

    def run(name, before, after, control=False, loss="distill", steps=10, tokens=640):
        r = {"val_ppl_before": before, "val_ppl_after": after, "val_ppl_sequential": 10.0, "control": control,
             "val_accuracy_before": 0.4, "val_accuracy_after": 0.45, "val_accuracy_sequential": 0.5, "loss": loss,
             "lp": "2:6", "steps": steps, "tokens_seen": tokens, "evals": [[steps, 2.5, 0.45]]}
        (tmp_path / f"{name}.json").write_text("progress\n" + json.dumps(r) + "\n")

    run("ft-d4-distill", 14.0, 12.0)
    run("ft-d4-distill-control", 10.0, 10.5, control=True)
    run("ft-d4-distill-lr1e-3", 14.0, 11.0)
    run("ft-d4-distill-lr1e-3-control", 10.0, 10.2, control=True)
    with contextlib.redirect_stdout(io.StringIO()):
        assert distill_report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "distill.md").read_text()
    assert (tmp_path / "out" / "distill.png").stat().st_size > 0
    # its own control: 1 - (12.0 - 10.5) / (14 - 10) = 62.5%; the variant against the best control (10.2): 80%
    assert "| 4 | distillation | 2:6 | 10 | 14.000 | 12.000 | 0.4000 | 0.4500 | 62% |" in md
    assert "| 4 | distill-lr1e-3 | distill | 64 | 10 | 14.000 | 11.000 | 0.4500 | 80% |" in md
