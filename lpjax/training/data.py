"""Training data: one token stream of the training texts, windows drawn on the device from (seed, step) alone, fixed
held-out windows scored as `lpjax.eval` scores them, and the byte-level BPE tokenizer `train` makes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lpjax.errors import LPJaxError
from lpjax.quality.perplexity import windows
from lpjax.training.settings import Hyper

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


@dataclasses.dataclass(frozen=True)
class ValSet:
    """Fixed held-out windows: `tokens` [N, T+1] (input = the first T, targets = the last T), `mask` [N, T] marks
    the scored targets. Scored as `lpjax.eval --window T --stride T-1` scores: every token after a file's first
    exactly once."""

    tokens: np.ndarray
    mask: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All training texts as one int32 stream: each tokenised with the tokenizer's BOS, followed by EOS."""
    eos = list(tokenizer.eos_ids[:1])
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.extend(eos)
    return np.asarray(ids, np.int32)


def sample_windows(stream, seed: int, step, batch: int, length: int):
    """`batch` windows of `length` tokens at random starts drawn from (seed, step) alone (threefry, the same on every
    platform). Traceable: the training step calls it on the device."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), step)
    starts = jax.random.randint(key, (batch,), 0, stream.shape[0] - length + 1)
    return stream[starts[:, None] + jnp.arange(length)]


def val_windows(texts: list[list[int]], seq_len: int, limit: int = 0) -> ValSet:
    """Windows of `seq_len` tokens, `seq_len - 1` apart, over each tokenised text (see `ValSet`); `limit` > 0 keeps
    that many of them, evenly spaced."""
    rows, masks = [], []
    for ids in texts:
        for begin, end, first in windows(len(ids), seq_len, seq_len - 1):
            row = np.zeros(seq_len + 1, np.int32)
            row[: end - begin] = ids[begin:end]
            mask = np.zeros(seq_len, np.float32)
            mask[first - begin - 1 : end - begin - 1] = 1.0
            rows.append(row)
            masks.append(mask)
    if limit and len(rows) > limit:
        keep = np.linspace(0, len(rows) - 1, limit).round().astype(int)
        rows, masks = [rows[i] for i in keep], [masks[i] for i in keep]
    return ValSet(np.stack(rows), np.stack(masks))


def unigram_nll(stream: np.ndarray, val: ValSet, vocab: int) -> float:
    """Mean NLL of the scored val tokens under the training stream's token frequencies (add-one smoothed): the
    baseline a model must beat by far."""
    counts = np.bincount(stream, minlength=vocab).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))
    targets = val.tokens[:, 1:]
    return float(-(logp[targets] * val.mask).sum() / val.mask.sum())


def text_digest(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest()[:16] for t in texts]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    """A byte-level BPE tokenizer trained on `texts` (special tokens <unk>, <s>, </s>; <s> prepended), saved in `out`
    as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LPJaxError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((line for t in texts for line in t.splitlines(keepends=True)), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))


def prepare_data(tokenizer, texts: list[str], val_text: str | None, hp: Hyper, val_limit: int):
    """(training stream, val windows or None), checking each is long enough to use."""
    stream = token_stream(tokenizer, texts)
    if len(stream) < hp.seq_len + 1:
        raise LPJaxError(f"--text: {len(stream)} tokens in all, shorter than one training window of --seq-len "
                         f"{hp.seq_len} + 1 tokens (give more text or a smaller --seq-len)")
    val = None
    if val_text is not None:
        ids = tokenizer.encode(val_text)
        if len(ids) < 2:
            raise LPJaxError("--val: has fewer than 2 tokens, nothing to score")
        val = val_windows([ids], hp.seq_len, val_limit)
    return stream, val
