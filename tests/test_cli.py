"""The command-line tools end to end, as a user runs them: `python -m` subprocesses for the entry points (and the
README's demo, whose printed text must be the README's), the rest of each command line in this process
(`run_main`: the same `cli.run` contract of exit codes and one-line errors, without a JAX start-up per run)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env


def run(*args, devices: int = 1, timeout: int = 300, stdin: str | None = None):
    """`python -m ARGS` in a process that sees `devices` CPU devices, compiling as this session does."""
    p = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                       env=subprocess_env(devices), timeout=timeout, cwd=ROOT, input=stdin)
    return p.returncode, p.stdout, p.stderr


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_clean_error(rc, stderr, words):
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert lines[-1].startswith("error:") and words in lines[-1], stderr
    assert sum(x.startswith("error:") for x in lines) == 1


def test_generate_json_with_and_without_lp(checkpoints, run_main):
    directory, _ = checkpoints("gqa_head_dim")
    rc, out, err = run_main("lpjax.generate", "--model", directory, "--prompt", "The quick brown", "--max-new-tokens",
                            8, "--json", "--dtype", "float32")
    assert rc == 0, err
    seq = last_json(out)
    assert {"text", "tokens", "prefill_ms", "decode_tokens_per_s", "lp"} <= seq.keys()
    assert len(seq["tokens"]) >= 1 and seq["lp"] == "" and seq["devices"] == 1
    assert out.startswith("The quick brown")  # streamed: prompt, then new text
    rc, out, err = run_main("lpjax.generate", "--model", directory, "--prompt", "The quick brown", "--max-new-tokens",
                            8, "--lp", "2:6", "--json", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9",
                            "--seed", "3")
    assert rc == 0, err
    lp = last_json(out)
    assert lp["lp"] == "2:6" and lp["delta"] == 4 and lp["depth"] == 4 and "mesh" in lp


def readme_demo() -> tuple[str, str]:
    """The README's demo command (the bash block of `python -m lpjax.generate` alone) and the next fenced block, its
    output (prose may come between)."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"```bash\n(python -m lpjax\.generate)\n```\n(?:(?!```).)*```\n(.*?)```", readme, re.S)
    assert m, "README.md: no `python -m lpjax.generate` block followed by its output"
    return m.group(1), m.group(2)


def comparable(out: str) -> list[str]:
    """The demo's output from its first run on, numbers of the timing lines masked: the text must match exactly."""
    lines = out[out.index("== LP plan"):].rstrip("\n").split("\n")
    return [re.sub(r"\d+(\.\d+)?", "#", x) if x.startswith(("[prompt ", "sequential ")) else x for x in lines]


def test_readme_demo_prints_what_the_readme_shows():
    command, shown = readme_demo()
    rc, out, err = run(*command.split()[2:])  # python -m lpjax.generate, nothing else
    assert rc == 0, err
    assert "== LP plan: 6:14" in out and "[prompt " in out  # both runs, with their summaries
    assert comparable(out) == comparable(shown)


def test_generate_without_arguments_runs_the_embedded_default():
    """The demo again with --json (after the test above, in the same kind of process: its programs are compiled)."""
    from lpjax.generate import parse_args

    rc, out, err = run("lpjax.generate", "--json")
    assert rc == 0, err
    assert "trained here" in out and "sequential" in out
    res = last_json(out)
    assert [r["lp"] for r in res["runs"]] == ["", "6:14"] and all(r["decode_tokens_per_s"] > 0 for r in res["runs"])
    assert all(len(r["tokens"]) == parse_args([]).max_new_tokens for r in res["runs"])


def test_embedded_default_model_is_a_handful_of_hf_files_read_without_torch():
    from lpjax.generate import DEFAULT_MODEL
    from lpjax.sources import open_source
    from lpjax.sources.hf import HFSource

    files = sorted(p.name for p in Path(DEFAULT_MODEL).iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert isinstance(open_source(DEFAULT_MODEL), HFSource)


def test_embedded_default_model_speaks_python(tmp_path):
    """The shipped model is trained, not random: on standard-library source it is far better than chance (a
    vocabulary of 4096) and than a unigram model (~560 on held-out stdlib files)."""
    import sysconfig

    from lpjax.generate import DEFAULT_MODEL

    source = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    text = tmp_path / "textwrap.txt"
    text.write_text(source.read_text()[:6000])
    rc, out, err = run("lpjax.eval", "--model", DEFAULT_MODEL, "--text", text, "--json")
    assert rc == 0, err
    assert last_json(out)["ppl"] < 30


def test_eval_json_and_windows(checkpoints, text_file, run_main):
    directory, _ = checkpoints("mha")
    rc, out, err = run_main("lpjax.eval", "--model", directory, "--text", text_file, "--window", 64, "--stride", 48,
                       "--json")
    assert rc == 0, err
    seq = last_json(out)
    assert {"ppl", "nll", "tokens", "lp", "devices"} <= seq.keys() and seq["devices"] == 1 and seq["windows"] > 1
    rc, out, err = run_main("lpjax.eval", "--model", directory, "--text", text_file, "--window", 64, "--stride", 48,
                            "--lp", "0:2", "--json")
    assert rc == 0, err
    lp = last_json(out)
    assert lp["tokens"] == seq["tokens"] and lp["ppl"] != seq["ppl"] and lp["lp"] == "0:2"


def test_convert_then_generate_from_converted(checkpoints, tmp_path, run_main):
    directory, _ = checkpoints("tied")
    out_dir = tmp_path / "conv"
    rc, out, err = run_main("convert", "--hf", directory, "--out", out_dir, "--dtype", "float32")
    assert rc == 0, err
    hf = last_json(run_main("lpjax.generate", "--model", directory, "--prompt", "fox", "--max-new-tokens", 5,
                            "--json")[1])
    conv = last_json(run_main("lpjax.generate", "--model", out_dir, "--prompt", "fox", "--max-new-tokens", 5,
                              "--json")[1])
    assert hf["tokens"] == conv["tokens"]
    assert_clean_error(*run_main("convert", "--hf", directory, "--out", out_dir)[::2], "already exists")


@pytest.fixture(scope="module")
def bad_dirs(checkpoints, tmp_path_factory):
    import shutil

    from safetensors.numpy import load_file, save_file

    src, _ = checkpoints("mha")
    root = tmp_path_factory.mktemp("bad")
    (root / "noconfig").mkdir()
    made = {"noconfig": root / "noconfig"}
    for name, edit in {
        "malformed": lambda d: (d / "config.json").write_text("{not json"),
        "gpt2": lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')),
        "missing": lambda d: save_file({k: v for k, v in load_file(d / "model.safetensors").items()
                                        if k != "model.norm.weight"}, d / "model.safetensors"),
        "misshapen": lambda d: save_file(dict(load_file(d / "model.safetensors"),
                                              **{"model.layers.0.self_attn.q_proj.weight":
                                                 __import__("numpy").zeros((3, 3), "float32")}),
                                         d / "model.safetensors"),
    }.items():
        shutil.copytree(src, root / name)
        edit(root / name)
        made[name] = root / name
    return made


@pytest.mark.parametrize("case,args,words", [
    ("missing path", ["lpjax.generate", "--model", "/nonexistent/model"], "no such file"),
    ("no config", ["lpjax.generate", "--model", "{noconfig}"], "no config.json"),
    ("malformed config", ["lpjax.eval", "--model", "{malformed}", "--text", "{text}"], "malformed JSON"),
    ("non-llama", ["lpjax.generate", "--model", "{gpt2}"], "model_type"),
    ("missing tensor", ["lpjax.generate", "--model", "{missing}"], "model.norm.weight is missing"),
    ("misshapen tensor", ["lpjax.generate", "--model", "{misshapen}"], "has shape (3, 3)"),
    ("odd lp", ["lpjax.generate", "--model", "{good}", "--lp", "1:4"], "odd number"),
    ("lp out of range", ["lpjax.eval", "--model", "{good}", "--lp", "2:6", "--text", "{text}"], "0 <= START"),
    ("prompt too long", ["lpjax.generate", "--model", "{good}", "--max-new-tokens", "300"], "does not fit"),
    ("empty text", ["lpjax.eval", "--model", "{good}", "--text", "{empty}"], "empty"),
    ("bad device count", ["lpjax.generate", "--model", "{good}", "--devices", "3"], "even number"),
    ("too many devices", ["lpjax.generate", "--model", "{good}", "--devices", "16"], "visible"),
    ("bad sampling", ["lpjax.generate", "--model", "{good}", "--top-p", "0"], "top-p"),
    ("convert missing", ["convert", "--hf", "/nonexistent", "--out", "{tmp}/x"], "no such directory"),
])
def test_bad_input_gets_one_line_and_exit_2(checkpoints, bad_dirs, text_file, tmp_path, run_main, case, args,
                                           words):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    names = dict(bad_dirs, good=checkpoints("mha")[0], text=text_file, empty=empty, tmp=tmp_path)
    args = [a.format(**names) for a in args]
    if args[0] == "lpjax.generate":
        args += ["--prompt", "hello"]
    rc, _, err = run_main(*args, devices=4)
    assert_clean_error(rc, err, words)


def test_every_dtype_flag_offers_the_weight_dtypes(monkeypatch):
    """Every tool's --dtype / --save-dtype choices are lpjax.weights.DTYPES (training's --compute-dtype: those
    without float16), in one definition."""
    import argparse

    from lpjax import eval as eval_tool
    from lpjax import finetune, generate, sweep, train
    from lpjax.convert import __main__ as convert
    from lpjax.plan import __main__ as plan
    from lpjax.training.settings import COMPUTE_DTYPES
    from lpjax.weights import DTYPES

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, args=None, namespace=None: self)
    choices = {}
    for tool in (generate, eval_tool, sweep, plan, convert, finetune, train):
        for action in tool.parse_args([])._actions:
            if action.dest.endswith("dtype"):
                choices[(tool.__name__, action.dest)] = tuple(action.choices)
    assert {k[1] for k in choices} == {"dtype", "save_dtype", "compute_dtype"}
    for (tool, dest), got in choices.items():
        assert got == (COMPUTE_DTYPES if dest == "compute_dtype" else tuple(DTYPES)), (tool, dest)
    assert COMPUTE_DTYPES == ("bfloat16", "float32")


CACHE_PROBE = """
import json, sys
import jax
from lpjax.cli import enable_compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
enable_compile_cache()
jax.jit(lambda x: x * 2 + 1).lower(1.0).compile()  # a program that compiles in milliseconds
print(json.dumps({"hit": "/jax/compilation_cache/cache_hits" in events}))
"""


def test_compile_cache_lives_where_the_variable_says(tmp_path, monkeypatch):
    from lpjax.cli import compile_cache_dir

    monkeypatch.delenv("LPJAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "lpjax" / "xla")
    monkeypatch.setenv("LPJAX_COMPILE_CACHE", str(tmp_path / "moved"))
    assert compile_cache_dir() == str(tmp_path / "moved")
    for off in ("off", "0", "no", "false", "OFF"):
        monkeypatch.setenv("LPJAX_COMPILE_CACHE", off)
        assert compile_cache_dir() is None


def test_compile_cache_keeps_every_program_for_the_next_process(tmp_path):
    """Every tool calls `cli.enable_compile_cache`: a program that compiles in milliseconds is kept, and the next
    process reads it back instead of compiling it."""
    env = subprocess_env(1, LPJAX_COMPILE_CACHE=str(tmp_path / "xla"))

    def probe() -> bool:
        p = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])["hit"]

    assert [probe(), probe()] == [False, True]
    assert len(list((tmp_path / "xla").iterdir())) == 1
