"""A checkpoint's tokenizer.json runs on the `tokenizers` library alone (no torch, no transformers), and encodes,
decodes and renders chats as transformers' AutoTokenizer does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_tokenizer

from lpjax.errors import LPJaxError
from lpjax.tokenizer import HFTokenizer, TransformersTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The quick brown fox", "def read_config(path):\n    return {}\n", "  two  spaces,\ttabs and\n\nlines ,",
         "<s>special</s> tokens in text", "héllo ünïcode ✓ 🦊", "don 't , it 's"]
# ChatML-like, with what real templates use: the BOS variable, loop controls, tojson, raise_exception, a generation
# block (which marks the assistant's text for training masks)
CHAT_TEMPLATE = "\n".join([  # indented and on several lines, as templates are: trim_blocks and lstrip_blocks matter
    "{{ bos_token }}{% for m in messages %}",
    "  {% if m['role'] == 'system' and not loop.first %}",
    "    {{ raise_exception('system message must come first') }}",
    "  {% endif %}",
    "  {% if m['content'] == '' %}{% continue %}{% endif %}",
    "<|im_start|>{{ m['role'] }}",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}",
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "<|im_start|>assistant",
    "{% endif %}{{ {'n': messages | length} | tojson }}",
])
MESSAGES = [{"role": "system", "content": "Be brief & exact."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": ""},
            {"role": "user", "content": "And <b>Germany</b>?"}]


def tokenizer_dir(root: Path, name: str, post_processor: bool = True, **config) -> Path:
    """A tokenizer directory (make_tokenizer's, with ChatML's turn tokens added) with tokenizer_config.json entries
    replaced by `config` (None deletes one); without tokenizer.json's post-processor (which prepends <s>) unless
    `post_processor`."""
    directory = root / name
    directory.mkdir()
    fast = make_tokenizer(directory)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.save_pretrained(directory)
    if not post_processor:
        saved = json.loads((directory / "tokenizer.json").read_text())
        (directory / "tokenizer.json").write_text(json.dumps(dict(saved, post_processor=None)))
    path = directory / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    saved.update(config)
    path.write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))
    return directory


VARIANTS = {
    "as saved": {},
    "chat template in the config": {"chat_template": CHAT_TEMPLATE},
    "BOS/EOS flags in the config, tokenizer.json's post-processor decides": {"add_bos_token": False,
                                                                            "add_eos_token": True},
    "no post-processor, BOS/EOS flags in the config": {"post_processor": False, "add_bos_token": True,
                                                       "add_eos_token": True},
    "special tokens as AddedToken dicts": {"eos_token": {"__type": "AddedToken", "content": "</s>"},
                                           "pad_token": {"__type": "AddedToken", "content": "<unk>", "special": True}},
    "clean-up asked (ignored for BPE)": {"clean_up_tokenization_spaces": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_json_encodes_decodes_and_renders_chats_as_transformers_does(tmp_path, variant):
    from transformers import AutoTokenizer

    directory = tokenizer_dir(tmp_path, "tok", **VARIANTS[variant])
    if variant == "as saved":
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ours = load_tokenizer(directory, 0, ())
    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_id, ours.eos_id, ours.n_tokens) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    assert ours.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    if "chat" in variant or variant == "as saved":
        expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ours.chat_ids(MESSAGES) == list(expected["input_ids"])
        assert ours.end_of_turn_ids == tuple(sorted({hf.convert_tokens_to_ids("<|im_end|>"), hf.eos_token_id}))
        with pytest.raises(LPJaxError, match="the chat template fails .system message must come first"):
            ours.chat_ids(MESSAGES[1:2] + MESSAGES[:1])
    else:
        with pytest.raises(LPJaxError, match="has no chat template"):
            ours.chat_ids(MESSAGES)


def test_a_checkpoint_without_tokenizer_json_is_read_by_transformers(tmp_path):
    """Only vocab.json and merges.txt (as a SentencePiece-only checkpoint has only tokenizer.model): transformers'
    AutoTokenizer builds the tokenizer."""
    from transformers import AutoTokenizer

    source = tokenizer_dir(tmp_path, "source")
    directory = tmp_path / "slow"
    directory.mkdir()
    HFTokenizer(source, ()).tok.model.save(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    ours = load_tokenizer(directory, 0, ())
    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert isinstance(ours, TransformersTokenizer) and "GPT2Tokenizer" in ours.description
    for text in TEXTS[:3]:
        assert ours.encode(text) == hf(text)["input_ids"] and ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id, ours.eos_ids, ours.n_tokens) == (1, 2, (2,), len(hf))


def test_a_broken_tokenizer_json_is_one_line(tmp_path):
    directory = tokenizer_dir(tmp_path, "tok")
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(LPJaxError, match="cannot load its tokenizer") as e:
        load_tokenizer(directory, 0, ())
    assert "\n" not in str(e.value)


def test_the_generate_path_imports_neither_torch_nor_transformers():
    """A fresh interpreter imports the generate tool, loads the embedded model and its tokenizer: no torch, no
    transformers, none of the libraries only other tools need (matplotlib, orbax, optax)."""
    code = ("import sys; from lpjax.generate import DEFAULT_MODEL; from lpjax.engine import Engine; "
            "tok = Engine.load(DEFAULT_MODEL, '', 1, None).tokenizer; "
            "assert tok.decode(tok.encode('def f(x):')) == 'def f(x):'; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'matplotlib', 'orbax', 'optax'}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_a_random_models_byte_tokenizer_shows_every_token_and_streams_it_token_by_token():
    from lpjax.serving.text import TextStream

    tok = load_tokenizer(None, 32000, ())
    ids = [*"é".encode(), 300, tok.EOS, ord("a"), 31999]
    assert tok.encode("é") == [tok.BOS, *"é".encode()]
    assert tok.decode(ids) == "é<300>a<31999>"  # BOS/EOS/PAD show nothing; larger ids their number
    stream = TextStream(tok)
    shown = [stream.add([i]) for i in ids]
    assert shown == ["", "é", "<300>", "", "a", "<31999>"] and stream.flush() == ""  # half a character waits
