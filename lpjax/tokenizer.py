"""Tokenizers: a checkpoint's own (its `tokenizer.json` run by the `tokenizers` library; transformers' AutoTokenizer
only for a checkpoint without one), read from its directory, never the network; or the byte-level fallback that
random-weight models use."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from lpjax.errors import LPJaxError, first_line


class Tokenizer:
    """What the engine needs of a tokenizer. `encode` adds the tokenizer's default special tokens (BOS)."""

    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    bos_id: int | None = None
    eos_id: int | None = None  # the tokenizer's own EOS token (eos_ids adds the model config's)
    n_tokens: int = 0  # the vocabulary, added tokens included
    chat_template: str | None = None
    description: str = ""  # says whose tokenizer it is, in error messages

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation `messages` ({"role", "content"} dicts) rendered by the checkpoint's chat template, ending
        with the cue for the assistant's turn."""
        raise LPJaxError(f"--chat: {self.description} has no chat template")

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant's turn in a chat (and end generation there)."""
        return self.eos_ids


# Tokens that chat templates close a turn with (ChatML, Llama 3, Gemma, Phi-3); a template's own ones are used.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258. Ids past 258 (random models' larger vocabularies) decode
    to `<id>`, so that every token a random model writes shows, and a stream of them arrives token by token (as a
    real tokenizer's would: a server's timings under load read alike)."""

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, vocab_size: int = 264):
        if vocab_size < 259:
            raise LPJaxError(f"byte tokenizer needs a vocabulary of at least 259, the model has {vocab_size}")
        self.eos_ids = (self.EOS,)
        self.pad_id, self.bos_id, self.eos_id, self.n_tokens = self.PAD, self.BOS, self.EOS, self.PAD + 1
        self.description = "the byte-level tokenizer (UTF-8 bytes)"

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            if run:
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
            if i > self.PAD:
                parts.append(f"<{i}>")
        return "".join(parts) + run.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A checkpoint's `tokenizer.json`, run by the `tokenizers` library as written (no transformers, no torch: it
    loads in milliseconds). Its post-processor decides BOS/EOS, as in transformers' generic tokenizer (which ignores
    add_bos_token / add_eos_token). `tokenizer_config.json` (else `special_tokens_map.json`) names the special
    tokens; the chat template comes from `chat_template.jinja` or the config and is rendered as transformers renders
    it (`render_chat`)."""

    def __init__(self, directory: Path, eos_ids: tuple[int, ...]):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        try:
            self.tok = Backend.from_file(str(directory / "tokenizer.json"))
            config = _read_json(directory / "tokenizer_config.json")
            specials = _read_json(directory / "special_tokens_map.json")
        except Exception as e:  # noqa: BLE001 -- OSError, bad JSON, or the Rust side's plain Exception
            raise LPJaxError(f"{directory}: cannot load its tokenizer ({first_line(e)})") from None
        self.special = {k: name for k in SPECIAL_TOKENS if (name := _token_text(config.get(k, specials.get(k))))}
        missing = [t for t in self.special.values() if self.tok.token_to_id(t) is None]
        if missing:  # as transformers does: named special tokens the vocabulary lacks are added
            self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and not self._is_bpe()
        self.chat_template = _chat_template(directory, config)
        ids = {k: self.tok.token_to_id(t) for k, t in self.special.items()}
        self.bos_id, self.eos_id = ids.get("bos_token"), ids.get("eos_token")
        self.eos_ids = tuple(sorted(set(eos_ids) | ({self.eos_id} if self.eos_id is not None else set())))
        pad = ids.get("pad_token")
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.n_tokens = self.tok.get_vocab_size(with_added_tokens=True)
        self.description = f"the tokenizer of {directory} (tokenizer.json)"

    def _is_bpe(self) -> bool:
        """transformers skips the clean-up of spaces for BPE models (it would strip real spaces)."""
        return type(self.tok.model).__name__ == "BPE"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=True)
        if self.clean_up_spaces:
            for a, b in CLEAN_UP:
                text = text.replace(a, b)
        return text

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.chat_template:
            return super().chat_ids(messages)
        text = render_chat(self.chat_template, messages, self.special)
        return self.tok.encode(text, add_special_tokens=False).ids  # the template writes its own specials

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        template = self.chat_template or ""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        ends = {vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab}
        return tuple(sorted(ends.union(self.eos_ids)))


class TransformersTokenizer(Tokenizer):
    """A checkpoint without `tokenizer.json` (a SentencePiece `tokenizer.model` only): transformers' AutoTokenizer
    builds it (reads the directory, never the network)."""

    def __init__(self, directory: Path, eos_ids: tuple[int, ...]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise LPJaxError(f"{directory}: cannot load its tokenizer ({first_line(e)})") from None
        eos = set(eos_ids)
        if self.tok.eos_token_id is not None:
            eos.add(int(self.tok.eos_token_id))
        self.eos_ids = tuple(sorted(eos))
        pad = self.tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.n_tokens = len(self.tok)
        self.chat_template = self.tok.chat_template
        self.description = f"the tokenizer of {directory} ({type(self.tok).__name__})"

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tok.chat_template:
            return super().chat_ids(messages)
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])  # the template writes its own specials

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        template = self.tok.chat_template or ""
        vocab = self.tok.get_vocab()
        ends = {vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab}
        return tuple(sorted(ends.union(self.eos_ids)))


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' clean_up_tokenization (applied when the config asks and the model is not BPE)
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def render_chat(template: str, messages: list[dict[str, str]], special_tokens: dict[str, str]) -> str:
    """`template` rendered for `messages` with the cue for the assistant's turn, in the environment transformers'
    `apply_chat_template` gives templates: a sandbox, trim_blocks and lstrip_blocks, loop controls, `tojson`
    without HTML escapes, `raise_exception`, `strftime_now`, a `{% generation %}` block, the special tokens."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile_template(template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=True, **special_tokens)
    except TemplateError as e:
        raise LPJaxError(f"--chat: the chat template fails ({first_line(e)})") from None


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks: rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _chat_template(directory: Path, config: dict) -> str | None:
    """`chat_template.jinja` if the directory has one, else the config's template (of several named ones, the
    default)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template or None


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def copy_tokenizer(src: Path, out: Path) -> None:
    """Copy the tokenizer files `src` has (any of TOKENIZER_FILES) into `out`."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_tokenizer(directory: Path | None, vocab_size: int, eos_ids: tuple[int, ...]) -> Tokenizer:
    """The directory's tokenizer; the byte-level one when there is no directory (random weights)."""
    if directory is None:
        return ByteTokenizer(vocab_size)
    if not has_tokenizer(directory):
        raise LPJaxError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)")
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory, eos_ids)
    return TransformersTokenizer(directory, eos_ids)
