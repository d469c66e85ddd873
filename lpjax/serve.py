"""`python -m lpjax.serve`: an LP model behind an OpenAI-compatible HTTP API, with continuous batching.

Up to `--max-batch` requests decode together, each in a slot of one static KV cache of `--max-len` tokens. The
engine runs `--steps-per-call` decode steps of every slot in one on-device program (a chunk); a new request is
prefilled into a free slot between two chunks. When every slot is busy, up to `--max-queue` requests wait; more are
refused with HTTP 429. The server prints one line when it is ready and stops cleanly on Ctrl-C or SIGTERM. It needs
the `serve` extra (`pip install -e ".[serve]"`: FastAPI and uvicorn).
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys

from lpjax import cli
from lpjax.errors import LPJaxError
from lpjax.runtime.decode_loop import STEPS_PER_CHECK

# Every slot holds a whole context of keys and values, so the model's own (128k tokens for Llama 3.1) is not the
# default: 8 slots of it would take 128 GB for an 8B model.
DEFAULT_CONTEXT = 4096


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lpjax.serve", description=__doc__.splitlines()[0])
    cli.add_model_args(p)
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: requests decoded together (default 8)")
    p.add_argument("--steps-per-call", type=int, default=STEPS_PER_CHECK,
                   help="decode steps of every slot per on-device call (default %(default)s): the host's cost of a "
                        "call is paid once per chunk, so tokens arrive this many at a time and a new request waits "
                        "at most two chunks to be admitted; 1 gives the lowest inter-token latency, at the cost of "
                        "throughput")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (random:NAME)")
    max_len = next(a for a in p._actions if a.dest == "max_len")  # add_model_args' flag, with this tool's default
    max_len.help = f"context of each slot: prompt + new tokens (default: the model's, at most {DEFAULT_CONTEXT})"
    next(a for a in p._actions if a.dest == "json").help = "print the ready line as a JSON object"
    args = p.parse_args(argv)
    if args.max_batch < 1:
        raise LPJaxError(f"--max-batch {args.max_batch}: must be at least 1")
    if args.steps_per_call < 1:
        raise LPJaxError(f"--steps-per-call {args.steps_per_call}: must be at least 1")
    if args.max_queue < 0:
        raise LPJaxError(f"--max-queue {args.max_queue}: must be at least 0")
    if not 0 <= args.port <= 65535:
        raise LPJaxError(f"--port {args.port}: must be in 0..65535")
    if args.max_len is not None and args.max_len < 2:
        raise LPJaxError(f"--max-len {args.max_len}: must be at least 2 (a prompt token and a new one)")
    return args


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model loads (a taken port fails at once); it listens once the server
    is ready, so a client that reads the ready line can connect at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LPJaxError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise LPJaxError(f"--host {host} --port {port}: cannot listen there ({why})") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quantize = cli.quantize_spec(args)
    try:
        from lpjax.serving.api import ServedModel, build_app
        from lpjax.serving.server import Server
    except ImportError as e:
        raise LPJaxError(f"lpjax.serve needs the serve extra ({e.name} is missing): "
                         "pip install -e \".[serve]\"") from None
    cli.init_distributed(args)
    import jax

    if jax.process_count() > 1:
        raise LPJaxError("lpjax.serve runs in one process; multi-host serving is not supported")
    from lpjax.engine import Engine
    from lpjax.runtime.slots import Slots
    from lpjax.serving.scheduler import Scheduler
    from lpjax.sharding import describe_mesh

    sock = bind(args.host, args.port)
    engine = Engine.load(args.model, args.lp, args.devices, args.dtype, seed=args.seed, progress=cli.load_bar(),
                         quantize=quantize, quant_kernel=args.quant_kernel, attention=args.attention)
    cli.say(f"[{engine.describe()}]", file=sys.stderr)
    context = args.max_len or min(engine.config.max_seq_len, DEFAULT_CONTEXT)
    tok = engine.tokenizer
    cli.say(f"compiling the prefill, insert and decode programs ({args.max_batch} slots x {context} tokens, "
            f"{args.steps_per_call} steps a call)", file=sys.stderr)
    try:
        slots = Slots(engine.programs, args.max_batch, context, pad_id=tok.pad_id)
        slots.warm_up(args.steps_per_call)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise LPJaxError(f"the KV cache of {args.max_batch} slots x {context} tokens does not fit in device memory: "
                         "lower --max-batch or --max-len") from None
    scheduler = Scheduler(slots, args.max_queue, args.steps_per_call)
    served = ServedModel(args.model, tok, context, engine.config.vocab_size, engine.plan.spec(),
                         describe_mesh(engine.mesh))
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    ready = {"url": url, "model": args.model, "lp": engine.plan.spec(), "plan": engine.plan.describe(),
             "mesh": served.mesh, "max_batch": args.max_batch, "max_len": context, "max_queue": args.max_queue,
             "steps_per_call": args.steps_per_call, "dtype": engine.dtype_name,
             "quantize": engine.quantization}
    scheduler.start()
    server = Server(build_app(scheduler, served), scheduler)
    if args.json:
        cli.emit_json(ready)
    else:
        cli.say(f"serving {args.model} at {url} | LP plan {ready['plan']} | {ready['mesh']} | {args.max_batch} slots "
                f"x {context} tokens, {args.steps_per_call} steps a call, queue {args.max_queue} | {engine.dtype_name}")
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    cli.say(json.dumps({"stopped": True, "steps": scheduler.steps}) if args.json else "stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
