"""Tokenizers: a checkpoint's own (transformers' AutoTokenizer, read from its directory, never the network) or the
byte-level fallback that random-weight models use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lpjax.errors import LPJaxError, first_line


class Tokenizer:
    """What the engine needs of a tokenizer. `encode` adds the tokenizer's default special tokens (BOS)."""

    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    description: str = ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation `messages` ({"role", "content"} dicts) rendered by the checkpoint's chat template, ending
        with the cue for the assistant's turn."""
        raise LPJaxError(f"--chat: the {self.description} tokenizer has no chat template")

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant's turn in a chat (and end generation there)."""
        return self.eos_ids


# Tokens that chat templates close a turn with (ChatML, Llama 3, Gemma, Phi-3); a template's own ones are used.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258. Ids past 258 (random models' larger vocabularies)
    decode to nothing."""

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, vocab_size: int = 264):
        if vocab_size < 259:
            raise LPJaxError(f"byte tokenizer needs a vocabulary of at least 259, the model has {vocab_size}")
        self.eos_ids = (self.EOS,)
        self.pad_id = self.PAD
        self.description = "byte-level (UTF-8 bytes)"

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
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
        self.description = f"{type(self.tok).__name__} from {directory}"

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
    return HFTokenizer(directory, eos_ids)
