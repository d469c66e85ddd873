"""Perplexity of a model (with or without LP) on tokenised texts: the library under `python -m lpjax.eval`.

Each file is tokenised as `tokenizer(text)["input_ids"]` (the tokenizer's default special tokens, e.g. BOS). A text
longer than the window is scored in sliding windows of `--window` tokens that start `--stride` tokens apart: each
window scores only the tokens no earlier window scored, each predicted from everything before it inside its window.
So every token after the text's first is scored exactly once, with at least `window - stride` tokens of context
(except near the start). PPL = exp(total NLL / scored tokens), over all files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from lpjax.errors import LPJaxError

DEFAULT_WINDOW = 1024


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) for a text of n tokens: the window is tokens[begin:end], and tokens
    first_scored..end-1 are scored in it (first_scored >= begin + 1)."""
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + window, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            return
        begin += stride


def perplexity(engine, texts: list[list[int]], window: int, stride: int, batch_size: int = 1,
               progress=None) -> dict:
    """Mean NLL, perplexity, next-token accuracy (how often the most likely token was the next one) and token
    count over `texts` (token id lists), scored as the module docstring says."""
    if not 0 < stride <= window - 1 and window > 1:
        raise LPJaxError(f"--stride {stride}: must be between 1 and --window - 1 ({window - 1})")
    jobs = [(k, w) for k, t in enumerate(texts) for w in windows(len(t), window, stride)]
    pad_id = 0
    total, hits, count, per_text = 0.0, 0.0, 0, [[0.0, 0] for _ in texts]
    for start in range(0, len(jobs), batch_size):
        group = jobs[start:start + batch_size]
        tokens = np.full((len(group), window), pad_id, np.int32)
        for r, (k, (b, e, _)) in enumerate(group):
            tokens[r, : e - b] = texts[k][b:e]
        scores = engine.token_scores(tokens)  # scores[r, j] = (NLL, hit) of tokens[r, j+1]
        for r, (k, (b, e, first)) in enumerate(group):
            part = scores[r, first - b - 1 : e - b - 1, 0].astype(np.float64)
            hits += float(scores[r, first - b - 1 : e - b - 1, 1].sum())
            total += float(part.sum())
            count += part.size
            per_text[k][0] += float(part.sum())
            per_text[k][1] += part.size
        if progress:
            progress(min(start + batch_size, len(jobs)), len(jobs))
    return {"nll": total / count, "ppl": math.exp(total / count), "accuracy": hits / count, "tokens": count,
            "windows": len(jobs),
            "per_text": [{"nll": s / c, "ppl": math.exp(s / c), "tokens": c} for s, c in per_text]}


def resolve_window(window: int | None, stride: int | None, max_len: int | None, context: int) -> tuple[int, int]:
    """`lpjax.eval`'s window and stride defaults and checks."""
    window = window or max_len or min(context, DEFAULT_WINDOW)
    if window > context:
        raise LPJaxError(f"--window {window}: longer than the model's context of {context} tokens")
    if window < 2:
        raise LPJaxError(f"--window {window}: needs at least 2 tokens")
    stride = stride or max(1, window // 2)
    if not 0 < stride < window:
        raise LPJaxError(f"--stride {stride}: must be between 1 and --window - 1 ({window - 1})")
    return window, stride


def encode_texts(tokenizer, paths: list[str], contents: list[str], max_tokens: int = 0) -> list[list[int]]:
    """Token ids of each text (as `lpjax.eval` tokenises them), keeping only the first `max_tokens` tokens of all
    texts together when `max_tokens` > 0 (texts left with fewer than 2 tokens are dropped: nothing to score)."""
    out, left = [], max_tokens or None
    for path, text in zip(paths, contents):
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            raise LPJaxError(f"--text {path}: has fewer than 2 tokens, nothing to score")
        if left is not None:
            ids, left = ids[:left], max(0, left - len(ids))
        if len(ids) >= 2:
            out.append(ids)
    if not out:
        raise LPJaxError(f"--max-tokens {max_tokens}: keeps fewer than 2 tokens, nothing to score")
    return out
