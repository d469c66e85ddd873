"""`python -m lpjax.train`: train a small Llama from scratch on local text, and the training loop that
`lpjax.finetune` shares.

The loss is next-token cross-entropy over random windows of `--seq-len` + 1 tokens cut from one long token stream
(each training file tokenised with BOS and closed with EOS, then joined). Window starts depend only on `--seed` and
the step number and are drawn on the device, so a resumed run sees exactly the batches an uninterrupted one would,
and no data crosses from the host during training.

Parameters live in the lpjax model tree of the plan's layout on one device (`LlamaLM(per_device=False)`), kept in
float32 with float32 AdamW state; the loss casts them to the compute dtype (bfloat16 by default). With several
devices the batch is split over them (data parallelism) and the parameters replicated; `jit` inserts the gradient
all-reduce. Training state is saved with Orbax under OUT/train_state (atomically, the last few steps kept), so
re-running the same command into the same OUT resumes where the last save left off. The trained model is written
to OUT in lpjax's converted format (canonical per-layer weights, HF `config.json`, tokenizer files), so
`python -m lpjax.generate --model OUT` and `python -m lpjax.eval --model OUT` load it as they load any model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
import tempfile
from pathlib import Path

from lpjax import cli
from lpjax.config import ModelConfig, round_up, to_hf
from lpjax.errors import LPJaxError
from lpjax.plan import LPPlan
from lpjax.tokenizer import copy_tokenizer, has_tokenizer, load_tokenizer
from lpjax.training import cli as training_cli
from lpjax.training.data import prepare_data, text_digest, train_tokenizer, unigram_nll
from lpjax.training.loop import fit
from lpjax.training.programs import Programs, data_mesh, init_params, single_device_layout
from lpjax.training.rundir import check_run, start_run, write_model
from lpjax.weights import DTYPES


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lpjax.train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", type=Path, default=None,
                   help="directory with an HF tokenizer to use (default: train a byte-level BPE on --text)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary; the BPE trained here gets this many tokens (default 4096; with "
                        "--tokenizer: its size rounded up to a multiple of 64)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    g.add_argument("--head-dim", type=int, default=None, help="default: dim / heads")
    g.add_argument("--ffn", type=int, default=None, help="MLP width (default: 8/3 dim rounded up to 64)")
    g.add_argument("--tie-embeddings", action="store_true", help="share the embedding with the LM head")
    g.add_argument("--rope-theta", type=float, default=10000.0)
    training_cli.add_training_args(p, steps=1000, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.1, seq_len=256)
    p.add_argument("--save-dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="dtype of the written model (default bfloat16)")
    return p.parse_args(argv)


def model_config(args, vocab: int, bos: int | None, eos: int | None):
    if args.head_dim is None and args.heads > 0 and args.dim % args.heads:
        raise LPJaxError(f"--dim {args.dim} is not divisible by --heads {args.heads}: give --head-dim")
    return ModelConfig(
        vocab_size=vocab, dim=args.dim, ffn_dim=args.ffn or round_up(int(8 * args.dim / 3), 64),
        n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim or (args.dim // args.heads if args.heads > 0 else 0), norm_eps=1e-5,
        rope_theta=args.rope_theta, max_seq_len=args.seq_len, tied_embeddings=args.tie_embeddings,
        bos_token_id=bos, eos_token_ids=() if eos is None else (eos,),
    )


def tokenizer_setup(args) -> dict:
    if args.tokenizer is None:
        return {"trained_bpe": args.vocab_size or 4096}
    if not (args.tokenizer / "tokenizer.json").is_file() and not (args.tokenizer / "tokenizer.model").is_file():
        raise LPJaxError(f"--tokenizer {args.tokenizer}: no tokenizer.json or tokenizer.model there")
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (args.tokenizer / name).is_file():
            digest.update((args.tokenizer / name).read_bytes())
    return {"given": digest.hexdigest()[:16], "vocab_size": args.vocab_size}


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.enable_compile_cache()
    texts, val_text = training_cli.read_texts(args)
    hp = training_cli.hyper_from_args(args, args.seq_len)
    cadence = training_cli.cadence_from_args(args)
    setup = {"kind": "train", "hyper": dataclasses.asdict(hp), "tokenizer": tokenizer_setup(args),
             "model": {k: getattr(args, k) for k in ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn",
                                                     "tie_embeddings", "rope_theta", "vocab_size")},
             "text": text_digest(texts), "val": text_digest([val_text]) if val_text else None}
    out: Path = args.out
    resuming = check_run(out, setup, args.overwrite, args.resume)
    with tempfile.TemporaryDirectory(prefix="lpjax-tokenizer-") as scratch:
        if resuming and has_tokenizer(out):  # the run's own tokenizer, made when it started
            tok_dir = out
        elif args.tokenizer is None:
            cli.say(f"training a byte-level BPE tokenizer ({args.vocab_size or 4096} tokens) on --text",
                    file=sys.stderr)
            tok_dir = Path(scratch)
            train_tokenizer(texts, args.vocab_size or 4096, tok_dir)
        else:
            tok_dir = args.tokenizer
        tok = load_tokenizer(tok_dir, 0, ())
        n_tok = tok.n_tokens
        vocab = args.vocab_size or (4096 if args.tokenizer is None else round_up(n_tok, 64))
        if n_tok > vocab:
            raise LPJaxError(f"--vocab-size {vocab}: smaller than the tokenizer's {n_tok} tokens")
        config = model_config(args, vocab, tok.bos_id, tok.eos_id)
        layout = single_device_layout(config, LPPlan(config.n_layers))
        stream, val = prepare_data(tok, texts, val_text, hp, args.val_windows)
        mesh = data_mesh(args.devices)
        params = init_params(layout, hp.seed)
        programs = Programs(layout, hp, frozenset(params), mesh, args.attention, training_cli.note)
        if not resuming:
            start_run(out, setup, tok_dir)
        elif tok_dir != out:  # resuming a run whose start was cut short before its tokenizer was saved
            copy_tokenizer(tok_dir, out)
    cli.say(f"[{'resuming' if resuming else 'training'} a {config.n_layers}-layer Llama, {config.n_params / 1e6:.2f}M "
            f"params, vocab {vocab}; {len(stream):,} training tokens; {hp.steps} steps of {hp.batch_size} x "
            f"{hp.seq_len} tokens on {mesh.devices.size} {programs.platform.upper()} device(s), "
            f"{hp.compute_dtype}]", file=sys.stderr)
    res = fit(programs, params, stream, val, out, cadence, training_cli.step_bar(hp, "training"), training_cli.note)
    summary = dict(res.summary(hp), params=config.n_params, devices=mesh.devices.size, out=str(out))
    to = sys.stderr if args.json else sys.stdout
    if not res.completed:
        return training_cli.report_stopped(res, hp, out, summary, args.json)
    write_model(out, layout, res.params, to_hf(config, args.save_dtype), args.save_dtype,
                f"trained by lpjax.train ({res.step} steps)",
                {"kind": "train", "steps": res.step, "tokens": res.step * hp.tokens_per_step})
    line = "trained " + training_cli.summary_line(res, hp)
    if val is not None:
        uni = unigram_nll(stream, val, vocab)
        summary.update(val_loss=res.final_val["loss"], val_ppl=res.final_val["ppl"], val_tokens=val.n_tokens,
                       unigram_ppl=math.exp(uni))
        line += (f"; val loss {res.final_val['loss']:.4f} (ppl {res.final_val['ppl']:.2f}) vs unigram ppl "
                 f"{math.exp(uni):.2f}")
    cli.say(line, file=to)
    cli.say(f"wrote {out}: load it with --model {out}", file=to)
    if args.json:
        cli.emit_json(summary)
    return 0


if __name__ == "__main__":
    cli.run(main)
