"""`python -m lpjax.generate`: stream text from a Llama, with or without Layer Parallelism.

With no arguments it runs the embedded default model twice, without and with LP, and prints both timings. With
`--chat` each prompt is a user's message wrapped in the checkpoint's chat template, and the reply ends at the
template's end-of-turn token; `--chat` without `--prompt` is a conversation on stdin (one message per line; the
history is kept, an empty line or end of input ends it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lpjax import cli, launch
from lpjax.errors import LPJaxError

# A 16-layer, 3.9M-parameter Llama trained by bench/quality.sh on the Python standard library (README: Quality).
DEFAULT_MODEL = str(Path(__file__).parent / "default_model")
DEFAULT_LP = "6:14"  # Δ=8 ending two layers before the last: 12 sequential steps instead of 16
DEFAULT_PROMPT = "def read_config(path):\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lpjax.generate", description=__doc__.splitlines()[0])
    cli.add_model_args(p, model_required=False)
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="prompts are user messages in the model's chat template; without --prompt: a conversation "
                        "on stdin")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (stops early at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and random-weight seed)")
    p.add_argument("--stream-chunk", type=int, default=16,
                   help="decode steps per on-device loop call between streamed prints (0 = one loop, no streaming)")
    return p.parse_args(argv)


class Streamer:
    """Prints the first row's new text as it grows (holding back an incomplete UTF-8 tail)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled, self.shown = tokenizer, enabled, ""

    def __call__(self, rows: list[list[int]]):
        if not self.enabled:
            return
        text = self.tokenizer.decode(rows[0]).rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):
            cli.say(text[len(self.shown):], end="")
            self.shown = text


def user_turn(history: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    return [*history, {"role": "user", "content": text}]


def run_once(engine, args, prompts: list[str], history: list[dict[str, str]] | None = None) -> dict:
    """Generate from `prompts`; with `args.chat`, each is the next user message after `history`, and only the reply
    is printed."""
    from lpjax.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    tok = engine.tokenizer
    if args.chat:
        ids = [tok.chat_ids(user_turn(history or [], p)) for p in prompts]
        eos, echo = tok.end_of_turn_ids, [""] * len(prompts)
    else:
        ids, eos, echo = [tok.encode(p) for p in prompts], tok.eos_ids, prompts
    if any(len(i) == 0 for i in ids):
        raise LPJaxError("a prompt encodes to no tokens")
    engine.cache_length(max(map(len, ids)), args.max_new_tokens, args.max_len)  # fits? (before echoing the prompt)
    stream = Streamer(tok, enabled=len(prompts) == 1)
    if len(prompts) == 1:
        cli.say(echo[0], end="")
    res = engine.generate(ids, args.max_new_tokens, sampling, seed=args.seed, max_len=args.max_len,
                          eos=eos, pad_id=tok.pad_id, on_tokens=stream, chunk=args.stream_chunk or None)
    texts = [tok.decode(t) for t in res.tokens]
    if len(prompts) == 1:
        cli.say(texts[0][len(stream.shown):])
    else:
        for p, e, t in zip(prompts, echo, texts):
            cli.say(f"--- {p!r}\n{e}{t}")
    summary = {
        "text": texts[0], "texts": texts, "tokens": res.tokens[0], "prompt_tokens": res.prompt_tokens,
        "batch": res.batch, "new_tokens": len(res.tokens[0]), "prefill_ms": round(1000 * res.prefill_s, 3),
        "decode_tokens_per_s": round(res.decode_tokens_per_s, 2),
        "decode_ms_per_token": round(res.decode_ms_per_step, 4), "compile_s": round(res.compile_s, 2),
        "lp": engine.plan.spec(), "delta": engine.plan.delta, "depth": engine.plan.depth,
        "devices": engine.layout.n_devices, "mesh": {"pair": engine.layout.pair_size, "tp": engine.layout.tp_size},
        "model": engine.source.description, "dtype": engine.dtype_name, "sampling": sampling.describe(),
        "quantize": engine.quantization, "weight_bytes": engine.weight_bytes,
        "quant_kernel": None if engine.quantize is None else engine.quant_kernel, "attention": engine.attention,
    }
    from lpjax.sharding import describe_mesh

    cli.say(
        f"[prompt {res.prompt_tokens} tokens x{res.batch} | prefill {summary['prefill_ms']:.1f} ms | decode "
        f"{res.decode_steps} steps, {res.decode_tokens_per_s:.1f} tokens/s ({res.decode_ms_per_step:.2f} ms/token) | "
        f"compile {res.compile_s:.1f} s]\n[LP plan {engine.plan.describe()} | {describe_mesh(engine.mesh)} | "
        f"{engine.dtype_name}{'' if engine.quantize is None else f', {engine.quantization} weights'} | "
        f"{sampling.describe()}]",
        file=sys.stderr if args.json or args.chat else sys.stdout,
    )
    return summary


def converse(engine, args, lines) -> list[dict]:
    """The interactive chat: each line of `lines` is the user's next message, answered with the history so far."""
    history: list[dict[str, str]] = []
    turns = []
    tty = sys.stdin.isatty()
    while True:
        if tty:
            cli.say("> ", end="", file=sys.stderr)
        line = next(lines, "").strip()
        if not line:
            return turns
        turn = run_once(engine, args, [line], history)
        history = [*user_turn(history, line), {"role": "assistant", "content": turn["text"].strip()}]
        turns.append(turn)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lpjax.sampling import Sampling

    Sampling(args.temperature, args.top_k, args.top_p)  # bad values fail before the model loads
    if args.max_new_tokens < 1:
        raise LPJaxError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.chat and not args.prompt and args.processes == "auto":
        args.processes = "one"  # a conversation on stdin is read by one process
    quantize = cli.quantize_spec(args)  # bad flags fail before anything starts
    if (code := launch.start(args, "lpjax.generate", argv)) is not None:
        return code  # this process launched per-device workers, which ran the tool
    if args.chat and not args.prompt and cli.process_count() > 1:  # only one process can read the user's stdin
        raise LPJaxError("--chat without --prompt (a conversation on stdin) runs in one process: give the messages "
                         "with --prompt, or use --processes one")
    from lpjax.engine import Engine

    default = args.model is None
    if default and args.chat:
        raise LPJaxError("--chat: the embedded default model has no chat template; give a chat model, e.g. "
                         "--model smollm2")
    if default:
        cli.say("No --model given: running the embedded default, a 16-layer Llama of 3.9M parameters trained here on "
                "the Python standard library's source (it writes Python-like code; see README, Quality). It runs "
                f"twice: sequential, then with --lp {args.lp or DEFAULT_LP}. Pass --model for your own model.\n")
        args.model = DEFAULT_MODEL
    prompts = args.prompt or [DEFAULT_PROMPT]
    engine = Engine.load(args.model, "" if default else args.lp, args.devices, args.dtype, seed=args.seed,
                         progress=cli.load_bar() if cli.is_main_process() and not default else None, quantize=quantize,
                         quant_kernel=args.quant_kernel, attention=args.attention)
    cli.say(f"[{engine.describe()}]", file=sys.stderr)
    if args.chat and not args.prompt:
        engine.tokenizer.chat_ids([{"role": "user", "content": "hi"}])  # no chat template: say so before reading
        result = {"turns": converse(engine, args, iter(sys.stdin))}
    elif not default:
        result = run_once(engine, args, prompts)
    else:
        runs = []
        for lp in ("", args.lp or DEFAULT_LP):
            e = engine if lp == "" else engine.with_plan(lp)
            cli.say(f"== LP plan: {e.plan.describe()}")
            runs.append(run_once(e, args, prompts))
        seq, par = runs
        cli.say(f"\nsequential {seq['decode_ms_per_token']:.3f} ms/token vs LP {par['lp']} "
                f"{par['decode_ms_per_token']:.3f} ms/token (on {seq['devices']} "
                f"{engine.mesh.devices.flat[0].platform.upper()} device(s); tiny models are overhead-bound)")
        result = dict(par, runs=runs, default_model=True)
    if args.json:
        cli.emit_json(result)
    return 0


if __name__ == "__main__":
    cli.run(main)
