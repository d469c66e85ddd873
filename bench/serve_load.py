"""Load test of an OpenAI-compatible server (`python -m lpjax.serve`, or any server with /v1/completions).

    python -m bench.serve_load --url http://127.0.0.1:8000/v1 --concurrency 8 --requests 64 --prompt-len 128 \\
        --max-tokens 128 [--warmup 2] [--seed 0] [--out FILE [--overwrite]]

`--concurrency` clients each send their next request as soon as the last one ended (a closed loop) until
`--requests` have been sent. Every request is streamed (`stream: true`, usage in the last event), greedy, with
`ignore_eos` so that it generates exactly `--max-tokens` tokens. Its prompt is `--prompt-len` token ids drawn at
random (seeded) from the vocabulary `/v1/models` reports (`vocab_size`); without one, a text of that many words.
`--warmup` requests run first, one at a time and untimed, so compiles (a new prompt bucket) stay out.

Prints and, with `--out`, saves one JSON object: output tokens/s and requests/s over the wall time of the whole run;
time to first token (TTFT: request sent to first text) and inter-token latency (ITL: gaps between streamed text
events) at p50 / p99 in ms; time per output token (TPOT: a request's decode time over its tokens after the first);
plus the settings and what the server says of itself in `/v1/models` (context, LP plan, mesh, and lpjax's
`steps_per_call`: its text events then carry that many tokens each, so ITL is the gap between chunks, TPOT the time
a token). Only the standard library and httpx, on purpose: it runs from any machine that can reach the server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import random
import sys
import time

import httpx


@dataclasses.dataclass
class Outcome:
    """One request: when it was sent, when each text event came, its token counts, or why it failed."""

    sent: float
    events: list[float] = dataclasses.field(default_factory=list)
    ended: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between order statistics; None without values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def make_prompts(count: int, length: int, vocab: int | None, seed: int) -> list:
    """`count` prompts of `length` token ids (ids of the lowest tenth of the vocabulary, where special tokens
    usually sit, are left out), or of `length` words when the vocabulary is not known."""
    rng = random.Random(seed)
    if vocab is None:
        words = ["the", "model", "layer", "pair", "token", "cache", "batch", "server"]
        return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(count)]
    low = max(1, vocab // 10)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt, max_tokens: int) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    out = Outcome(sent=time.perf_counter())
    try:
        async with client.stream("POST", url + "/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                out.error = f"HTTP {r.status_code}: {text}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    out.error = event["error"].get("message", "error event")
                    continue
                if event.get("choices") and event["choices"][0].get("text"):
                    out.events.append(time.perf_counter())
                if event.get("usage"):
                    out.prompt_tokens = event["usage"]["prompt_tokens"]
                    out.completion_tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.ended = time.perf_counter()
    return out


async def run_load(url: str, model: str, prompts: list, concurrency: int, max_tokens: int) -> tuple[list, float]:
    """Send every prompt with `concurrency` clients in a closed loop: (outcomes, wall seconds)."""
    pending = list(enumerate(prompts))
    outcomes: list[Outcome | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def worker():
            while pending:
                i, prompt = pending.pop(0)
                outcomes[i] = await one_request(client, url, model, prompt, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return outcomes, wall


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    ttft = [1000 * (o.events[0] - o.sent) for o in ok if o.events]
    itl = [1000 * (b - a) for o in ok for a, b in zip(o.events, o.events[1:])]
    tpot = [1000 * (o.events[-1] - o.events[0]) / (o.completion_tokens - 1) for o in ok
            if len(o.events) > 1 and o.completion_tokens > 1]
    tokens = sum(o.completion_tokens for o in ok)

    def ms(x):
        return None if x is None else round(x, 3)

    return {
        "requests_ok": len(ok), "requests_failed": len(failed),
        "errors": sorted({o.error for o in failed})[:5],
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "prompt_tokens_mean": round(sum(o.prompt_tokens for o in ok) / len(ok), 1) if ok else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(itl, 50)), "itl_ms_p99": ms(percentile(itl, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)),
    }


def server_info(client: httpx.Client, url: str) -> dict:
    r = client.get(url + "/models")
    r.raise_for_status()
    return r.json()["data"][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--concurrency", type=int, required=True, help="clients sending at once")
    p.add_argument("--requests", type=int, required=True, help="requests in all")
    p.add_argument("--prompt-len", type=int, required=True, help="prompt tokens of each request")
    p.add_argument("--max-tokens", type=int, required=True, help="tokens each request generates")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first, one at a time (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    for name in ("concurrency", "requests", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.out and os.path.exists(args.out) and not args.overwrite:
        print(f"error: --out {args.out} exists (--overwrite replaces it)", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    try:
        with httpx.Client(timeout=60) as client:
            info = server_info(client, url)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        print(f"error: --url {url}: cannot read /models ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    model = args.model or info["id"]
    vocab = info.get("vocab_size")
    prompts = make_prompts(args.warmup + args.requests, args.prompt_len, vocab, args.seed)
    if args.warmup:
        print(f"warm-up: {args.warmup} request(s)", file=sys.stderr, flush=True)
        warm, _ = asyncio.run(run_load(url, model, prompts[:args.warmup], 1, args.max_tokens))
        errors = [o.error for o in warm if o.error]
        if errors:
            print(f"error: the warm-up request failed: {errors[0]}", file=sys.stderr)
            return 1
    print(f"{args.requests} requests, {args.concurrency} at a time, {args.prompt_len} prompt tokens, "
          f"{args.max_tokens} new tokens each", file=sys.stderr, flush=True)
    outcomes, wall = asyncio.run(run_load(url, model, prompts[args.warmup:], args.concurrency, args.max_tokens))
    result = {
        "date": datetime.date.today().isoformat(), "url": url, "model": model,
        "server": {k: info[k] for k in ("max_model_len", "lp", "mesh", "steps_per_call") if k in info},
        "concurrency": args.concurrency, "requests": args.requests, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "prompt_kind": "token ids" if vocab else "words",
        **summarize(outcomes, wall),
    }
    print(f"{result['output_tokens_per_s']} output tokens/s, {result['requests_per_s']} requests/s | TTFT p50 "
          f"{result['ttft_ms_p50']} ms, p99 {result['ttft_ms_p99']} ms | ITL p50 {result['itl_ms_p50']} ms, p99 "
          f"{result['itl_ms_p99']} ms | {result['requests_ok']} ok, {result['requests_failed']} failed"
          + (f" | {info['steps_per_call']} steps a call" if "steps_per_call" in info else ""))
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0 if result["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
