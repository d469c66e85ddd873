"""Multi-host: two processes on localhost (JAX's CPU collectives) form one 4-device mesh and agree with one process."""

import json
import re
import socket
import subprocess
import sys

from helpers import CORPUS, ROOT, subprocess_env

# gloo's connection report, which its threads may write interleaved with each other's (split across lines, even
# between a report's colon and its number)
GLOO_CHATTER = re.compile(r"\[Gloo\]|Rank|\d+ is connected to \d+ peer ranks\. Expected number of connected peer "
                          r"ranks is :\s*\d+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module_args, processes=2, local_devices=2, timeout=300):
    port = free_port()
    # compiled as in this process (tests/conftest.py): the reference is compiled the same way
    env = subprocess_env(local_devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, "-m", *map(str, module_args)], cwd=ROOT, text=True,
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(processes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [o for o, _ in outs]


def test_two_processes_equal_one(checkpoints, engines, tmp_path):
    """Perplexity over 28 windows (CORPUS once: each window's forward pass runs its collectives between the two
    processes, ~40 ms apiece) and greedy tokens."""
    from lpjax.quality.perplexity import perplexity

    text_file = tmp_path / "corpus.txt"
    text_file.write_text(CORPUS)
    directory = checkpoints("shardable")[0]
    outs = launch(["lpjax.eval", "--model", directory, "--lp", "2:6", "--text", text_file, "--window", 48,
                   "--dtype", "float32", "--json"])
    assert GLOO_CHATTER.sub("", outs[1]).strip() == ""  # only process 0 prints
    got = json.loads(outs[0].strip().splitlines()[-1])
    assert got["devices"] == 4
    engine = engines("shardable", "2:6", 4)
    ids = engine.tokenizer.encode(text_file.read_text())
    ref = perplexity(engine, [ids], 48, 24)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["nll"] - ref["nll"]) <= 1e-5 * abs(ref["nll"])

    outs = launch(["lpjax.generate", "--model", directory, "--lp", "2:6", "--prompt", "The quick brown fox",
                   "--max-new-tokens", 6, "--dtype", "float32", "--json"])
    gen = json.loads(outs[0].strip().splitlines()[-1])
    single = engine.generate([engine.tokenizer.encode("The quick brown fox")], 6, eos=engine.tokenizer.eos_ids,
                             pad_id=engine.tokenizer.pad_id)
    assert gen["devices"] == 4 and gen["tokens"] == single.tokens[0]
