"""A small command-line tool over the engine's host-facing calls, for tests/test_launch.py: it starts like the real
tools (`launch.start`, so `--processes per-device` runs it as one worker per device) and prints, as one JSON line,
what `engine_calls` returns; the test runs `engine_calls` in its own process for the reference."""

import argparse

import numpy as np

from lpjax import cli, launch

PROMPTS = ["The quick brown fox", "Layer parallelism"]
NEW_TOKENS = 4


def engine_calls(engine) -> dict:
    """`logits`, `generate`, and a chain of host-called `next_token` steps fed their own tokens, on PROMPTS."""
    tok = engine.tokenizer
    ids = [tok.encode(x) for x in PROMPTS]
    width = max(map(len, ids))
    rows = np.array([[tok.pad_id] * (width - len(i)) + i for i in ids], np.int32)
    logits = engine.logits(rows, np.array([width - len(i) for i in ids], np.int32))
    cache = engine.init_cache(len(ids), engine.cache_length(width, NEW_TOKENS, None))
    first, cache, n, pad = engine.prefill(cache, ids, tok.pad_id)
    tokens = np.argmax(np.asarray(first.addressable_data(0)), axis=-1).astype(np.int32)
    steps = [tokens.tolist()]
    for t in range(NEW_TOKENS - 1):
        tokens, cache = engine.next_token(cache, tokens, n + t, pad)
        steps.append(tokens.tolist())
    return {"logits": np.asarray(logits, np.float64).tolist(), "next_token": steps,
            "generate": engine.generate(ids, NEW_TOKENS, eos=(), pad_id=tok.pad_id).tokens,
            "devices": engine.layout.n_devices}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="engine_tool")
    cli.add_model_args(p)
    args = p.parse_args(argv)
    if (code := launch.start(args, "engine_tool", argv)) is not None:
        return code
    import jax

    from lpjax.engine import Engine

    engine = Engine.load(args.model, args.lp, args.devices, args.dtype)
    cli.emit_json(dict(engine_calls(engine), processes=jax.process_count()))
    return 0


if __name__ == "__main__":
    cli.run(main)
