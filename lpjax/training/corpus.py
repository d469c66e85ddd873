"""A corpus the teacher writes itself: text sampled from the sequential model, for fine-tuning (LM loss or
distillation) without labelled text. `python -m lpjax.finetune.corpus` is its command line.

Prompts (a shipped list of varied short ones, `training/prompts.py`, or the user's) are taken in rounds of
`batch_size`, in an order drawn from the seed, each epoch over the list in a fresh order; each round is one
`Engine.generate` call sampling on the device at temperature 1 (no top-k or top-p: the teacher's own distribution)
with a seed derived from (seed, round). A checkpoint with a chat template gets each prompt as a user message and
answers in its template, stopping at its end-of-turn token. Rounds go on until `tokens` new tokens are written.

Each sample is its prompt and the teacher's reply as plain text (a blank line between them in chat form); samples
are separated by blank lines. The JSON sidecar beside the text (`sidecar_path`) holds the spec (model, prompts,
seed, sizes, dtype) and the text's digest: the same spec on the same platform and dtype writes the same text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lpjax.errors import LPJaxError
from lpjax.sampling import Sampling
from lpjax.training.prompts import BUILTIN_PROMPTS

FORMAT = "lpjax-corpus-v1"
BUILTIN = "builtin"
SAMPLE_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Everything that decides a teacher-written corpus."""

    model: str  # as given to --model
    prompts: tuple[str, ...]
    prompts_from: str  # "builtin" or the prompt file
    tokens: int  # new tokens to write, at least (whole samples: the last round may pass it)
    seed: int
    max_new_tokens: int = 256  # per sample
    batch_size: int = 8  # samples per generate call
    temperature: float = 1.0
    dtype: str = "float32"

    def check(self) -> None:
        if not self.prompts:
            raise LPJaxError(f"--prompts {self.prompts_from}: no prompts in it")
        for name in ("tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise LPJaxError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        Sampling(self.temperature)

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), prompts=list(self.prompts))

    @classmethod
    def from_json(cls, d: dict) -> CorpusSpec:
        return cls(**dict(d, prompts=tuple(d["prompts"])))


@dataclasses.dataclass(frozen=True)
class Corpus:
    text: str
    samples: int
    generated_tokens: int
    chat: bool  # the prompts went through the checkpoint's chat template


def read_prompts(where: str) -> tuple[str, ...]:
    """`builtin` (the shipped list) or a UTF-8 file of one prompt a line (blank lines and `#` comments skipped)."""
    if where == BUILTIN:
        return BUILTIN_PROMPTS
    path = Path(where)
    if not path.is_file():
        raise LPJaxError(f"--prompts {where}: no such file (or give 'builtin')")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LPJaxError(f"--prompts {where}: not UTF-8 text") from None
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def prompt_order(n_prompts: int, seed: int, rounds: int, batch: int) -> list[int]:
    """Prompt indices for `rounds` rounds of `batch`: epochs over the prompts, each in an order drawn from
    (seed, epoch)."""
    order: list[int] = []
    epoch = 0
    while len(order) < rounds * batch:
        order.extend(np.random.default_rng([seed, epoch]).permutation(n_prompts).tolist())
        epoch += 1
    return order[: rounds * batch]


def round_seed(seed: int, r: int) -> int:
    """The sampling seed of round `r` (distinct per round, fixed by the corpus seed)."""
    return int(np.random.default_rng([seed, 1 << 20, r]).integers(2**31 - 1))


def uses_chat(tokenizer) -> bool:
    try:
        tokenizer.chat_ids([{"role": "user", "content": "hi"}])
    except LPJaxError:
        return False
    return True


def write_text(engine, spec: CorpusSpec, progress: Callable[[int, int], None] | None = None) -> Corpus:
    """Sample the corpus `spec` describes from `engine` (the teacher: run it sequentially). `progress(tokens
    written, tokens wanted)` after each round."""
    spec.check()
    tok = engine.tokenizer
    chat = uses_chat(tok)
    if chat:
        ids = [tok.chat_ids([{"role": "user", "content": p}]) for p in spec.prompts]
        eos = tok.end_of_turn_ids
    else:
        ids = [tok.encode(p) for p in spec.prompts]
        eos = tok.eos_ids
    if any(len(i) == 0 for i in ids):
        raise LPJaxError("a prompt encodes to no tokens")
    engine.cache_length(max(map(len, ids)), spec.max_new_tokens, None)  # the longest prompt fits the context
    sampling = Sampling(spec.temperature)
    samples: list[str] = []
    generated, r = 0, 0
    while generated < spec.tokens:
        rows = prompt_order(len(ids), spec.seed, r + 1, spec.batch_size)[r * spec.batch_size:]
        res = engine.generate([ids[i] for i in rows], spec.max_new_tokens, sampling, seed=round_seed(spec.seed, r),
                              eos=eos, pad_id=tok.pad_id)
        for i, new in zip(rows, res.tokens):
            generated += len(new)
            reply = plain_lines(tok.decode(new))
            if reply.strip():
                prompt = spec.prompts[i]
                samples.append(f"{prompt}\n\n{reply.strip()}" if chat else prompt + reply.rstrip())
        r += 1
        if progress:
            progress(min(generated, spec.tokens), spec.tokens)
    return Corpus(SAMPLE_SEPARATOR.join(samples) + "\n", len(samples), generated, chat)


def plain_lines(text: str) -> str:
    """`text` with its line ends as "\n" only: a text file read back (universal newlines) is then the text written,
    so its digest matches the sidecar's."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def sidecar_path(text_file: Path) -> Path:
    """The JSON sidecar of a corpus text file: `corpus.txt` -> `corpus.json`."""
    return Path(text_file).with_suffix(".json")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sidecar(spec: CorpusSpec, corpus: Corpus, text_file: Path, engine) -> dict:
    """What the sidecar records: the spec, what came out, and where it was made."""
    return {"format": FORMAT, "text_file": Path(text_file).name, "sha256": digest(corpus.text),
            "spec": spec.to_json(), "teacher": engine.source.description, "chat": corpus.chat,
            "samples": corpus.samples, "generated_tokens": corpus.generated_tokens,
            "platform": engine.mesh.devices.flat[0].platform, "devices": int(engine.mesh.devices.size),
            "reproduce": reproduce_command(spec, text_file)}


def reproduce_command(spec: CorpusSpec, text_file: Path) -> str:
    return (f"python -m lpjax.finetune.corpus --model {spec.model} --prompts {spec.prompts_from} --tokens "
            f"{spec.tokens} --seed {spec.seed} --max-new-tokens {spec.max_new_tokens} --batch-size {spec.batch_size} "
            f"--dtype {spec.dtype} --out {text_file}")


def read_sidecar(text_file: Path, text: str | None = None) -> dict | None:
    """The sidecar of `text_file` when it is a teacher-written corpus's and, given `text`, describes that text;
    None otherwise."""
    path = sidecar_path(text_file)
    if path == Path(text_file) or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if text is not None and meta.get("sha256") != digest(text):
        return None
    return meta


def text_provenance(paths: list[str], texts: list[str]) -> list[dict]:
    """For a run's records: each training text's file and digest, and for a teacher-written corpus who wrote it
    from what seed."""
    out = []
    for path, text in zip(paths, texts):
        entry = {"path": str(path), "sha256": digest(text)[:16]}
        meta = read_sidecar(Path(path), text)
        if meta is not None:
            spec = meta["spec"]
            entry["teacher_written"] = {"teacher": meta.get("teacher"), "seed": spec.get("seed"),
                                        "prompts_from": spec.get("prompts_from"),
                                        "generated_tokens": meta.get("generated_tokens")}
        out.append(entry)
    return out
