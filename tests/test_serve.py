"""`python -m lpjax.serve`: the OpenAI-compatible HTTP API with continuous batching, over real HTTP (the `openai`
client and raw httpx) against servers started as a user starts them, on a tiny model; and its pieces in process (the
scheduler over decode slots, token ids to text with stop strings). The real SmolLM2 model is served in
tests/test_gguf.py, on the engine its other tests load."""

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gguf_helpers import CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 128  # --max-len of the main server: the cache length `generate` picks for these short prompts
LONG_CONTEXT = 16384  # --max-len of the one-slot server: a request of ignore_eos runs for minutes, not milliseconds
PROMPTS = ["JAX", "The quick brown fox", "Layer parallelism evaluates pairs of consecutive layers on the same",
           "A pretrained language model keeps most of its quality when a few middle layers run in parallel."]


class ServerProcess:
    """`python -m lpjax.serve ... --port 0 --json` in a subprocess; ready once it printed its JSON ready line."""

    def __init__(self, args: list, stderr_path: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lpjax.serve", *map(str, args), "--port", "0", "--json"],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.stderr()}")
        self.ready = json.loads(line)
        self.url = self.ready["url"]
        self.base = self.url.removesuffix("/v1")
        self.model = self.ready["model"]

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode

    def post(self, path: str, body, timeout: float = 300) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.post(self.url + path, content=body, headers={"content-type": "application/json"},
                              timeout=timeout)
        return httpx.post(self.url + path, json=body, timeout=timeout)

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=60).json()

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=300)


def sse(lines) -> list:
    """The data of server-sent events: JSON objects, and the final "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def chat_model(checkpoints, tmp_path_factory):
    """The `mha` checkpoint with a chat template and a long context (its weights, so `engines("mha")` is its
    reference)."""
    import shutil

    src, _ = checkpoints("mha")
    d = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(src, d, dirs_exist_ok=True)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"max_position_embeddings": LONG_CONTEXT}))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config | {"chat_template": CHAT_TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    """Sequential plan, 4 decode slots of CONTEXT tokens."""
    s = ServerProcess(["--model", chat_model, "--max-batch", 4, "--max-len", CONTEXT, "--dtype", "float32",
                       "--devices", 1], tmp_path_factory.mktemp("server") / "stderr.txt")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one_slot_lp_server(chat_model, tmp_path_factory):
    """An LP plan over 2 devices, one decode slot, a queue of one."""
    s = ServerProcess(["--model", chat_model, "--lp", "1:3", "--devices", 2, "--max-batch", 1, "--max-queue", 1,
                       "--max-len", LONG_CONTEXT, "--dtype", "float32"],
                      tmp_path_factory.mktemp("lp_server") / "stderr.txt")
    yield s
    s.stop()


def greedy_tokens(engine, ids, max_tokens, eos=()):
    return engine.generate([ids], max_tokens, eos=tuple(eos), pad_id=engine.tokenizer.pad_id).tokens[0]


# ---------------------------------------------------------------------------------------------- the API


def test_ready_line_and_models_and_health_describe_the_server(server, chat_model):
    assert server.ready["lp"] == "" and server.ready["max_batch"] == 4 and server.ready["max_len"] == CONTEXT
    assert "mesh pair=1 x tp=1" in server.ready["mesh"] and server.model == str(chat_model)
    models = httpx.get(server.url + "/models").json()
    assert [m["id"] for m in models["data"]] == [server.model] and models["data"][0]["max_model_len"] == CONTEXT
    health = server.health()
    assert health["status"] == "ok" and health["slots"] == 4


def test_chat_greedy_reply_is_generates_tokens_whole_and_streamed(server, engines, chat_model):
    from lpjax.tokenizer import load_tokenizer

    engine = engines("mha")
    tok = load_tokenizer(chat_model, engine.config.vocab_size, engine.config.eos_token_ids)  # with the template
    messages = [{"role": "user", "content": "The quick brown fox"}]
    expected = greedy_tokens(engine, tok.chat_ids(messages), 20, tok.end_of_turn_ids)
    client = server.openai()
    res = client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0)
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == tok.decode(expected)
    ended_at_eos = expected[-1] in tok.end_of_turn_ids
    assert choice.finish_reason == ("stop" if ended_at_eos else "length")
    n = len(tok.chat_ids(messages))
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (
        n, len(expected), n + len(expected))
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(expected)


def test_completion_whole_and_streamed_over_raw_http_end_with_done(server, engines):
    engine = engines("mha")
    tok = engine.tokenizer
    expected = greedy_tokens(engine, tok.encode(PROMPTS[1]), 12, tok.eos_ids)
    body = {"model": server.model, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
    r = server.post("/completions", body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == tok.decode(expected)
    assert whole["usage"]["completion_tokens"] == len(expected)
    with httpx.stream("POST", server.url + "/completions", json=body | {"stream": True}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_concurrent_requests_of_different_lengths_get_generates_greedy_tokens(server, engines):
    """Four requests at once share the decode batch, each in its own slot at its own position: each gets exactly
    the tokens `generate` gives it alone."""
    engine = engines("mha")
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 4
    new = 40
    expected = [greedy_tokens(engine, p, new) for p in prompts]

    def ask(ids):
        r = server.post("/completions", {"model": server.model, "prompt": ids, "max_tokens": new, "temperature": 0,
                                         "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, prompts))
    for reply, want in zip(replies, expected):
        assert reply["choices"][0]["text"] == tok.decode(want) and reply["usage"]["completion_tokens"] == new


def test_sampling_is_seeded_per_request(server):
    def ask(seed, prompt=PROMPTS[2]):
        return server.post("/completions", {"model": server.model, "prompt": prompt, "max_tokens": 16,
                                            "temperature": 1.0, "top_p": 0.95, "seed": seed,
                                            "ignore_eos": True}).json()["choices"][0]["text"]

    alone = ask(7)
    with ThreadPoolExecutor(2) as pool:  # the same seed with another request in the batch
        together, _ = pool.map(ask, [7, 8], [PROMPTS[2], PROMPTS[3]])
    assert together == alone
    assert ask(8) != alone


def test_a_stop_string_ends_the_reply_before_it(server, engines):
    engine = engines("mha")
    tok = engine.tokenizer
    full = tok.decode(greedy_tokens(engine, tok.encode(PROMPTS[0]), 30))
    stop = full[8:11]
    want = full[: full.index(stop)]
    body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "stop": [stop],
            "ignore_eos": True}
    whole = server.post("/completions", body).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (want, "stop")
    with httpx.stream("POST", server.url + "/completions", json=body | {"stream": True}, timeout=300) as r:
        events = sse(r.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 20
BAD = {
    "malformed JSON": ("/completions", b'{"model": "M", "prompt": "a",', "malformed JSON body", None),
    "not an object": ("/completions", b'["a"]', "must be a JSON object", None),
    "no messages": ("/chat/completions", {"model": "M"}, "missing required field 'messages'", "messages"),
    "no model": ("/completions", {"prompt": "a"}, "missing required field 'model'", "model"),
    "max_tokens 0": ("/completions", {"model": "M", "prompt": "a", "max_tokens": 0},
                     "max_tokens: must be at least 1, got 0", "max_tokens"),
    "max_tokens past the context": ("/completions", {"model": "M", "prompt": "a", "max_tokens": 1000},
                                    f"more than the context of {CONTEXT} tokens", "max_tokens"),
    "prompt past --max-len": ("/completions", {"model": "M", "prompt": LONG_PROMPT},
                              f"the server's context (--max-len) is {CONTEXT} tokens", "prompt"),
    "unknown model": ("/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]},
                      "model 'gpt-4o' is not served here", "model"),
    "n 2": ("/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "a"}], "n": 2},
            "only n=1", "n"),
    "negative temperature": ("/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "a"}],
                                                   "temperature": -0.5}, "temperature: must be >= 0", "temperature"),
    "token id outside the vocabulary": ("/completions", {"model": "M", "prompt": [1, 99999]},
                                        "token id 99999 is outside the vocabulary", "prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_400_with_an_openai_error_naming_it_and_the_server_goes_on(server, case):
    path, body, words, param = BAD[case]
    if isinstance(body, dict) and body.get("model") == "M":
        body = body | {"model": server.model}
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    good = server.post("/completions", {"model": server.model, "prompt": "a", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_raises_bad_request_with_the_servers_message(server):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        server.openai().completions.create(model=server.model, prompt="a", max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens: must be at least 1" in e.value.message


# ---------------------------------------------------------------------------------------------- one slot, LP plan


def test_an_lp_plan_is_served_with_its_greedy_tokens(one_slot_lp_server, engines):
    s = one_slot_lp_server
    assert s.ready["lp"] == "1:3" and "pair=2" in s.ready["mesh"]
    engine = engines("mha", "1:3", 2)
    tok = engine.tokenizer
    expected = greedy_tokens(engine, tok.encode(PROMPTS[2]), 16)
    reply = s.post("/completions", {"model": s.model, "prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0,
                                    "ignore_eos": True}).json()
    assert reply["choices"][0]["text"] == tok.decode(expected)


def wait_for(condition, limit_s: float = 300):
    """Poll `condition` until it holds (failing after `limit_s`, a guard against a hang, not a timing check)."""
    import time

    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.01)


def long_stream(s: ServerProcess, client: httpx.Client):
    """A streamed request that would run for LONG_CONTEXT - 16 tokens: (the open response, its lines)."""
    body = {"model": s.model, "prompt": PROMPTS[0], "max_tokens": LONG_CONTEXT - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = client.send(client.build_request("POST", s.url + "/completions", json=body), stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    assert next(x for x in lines if x.startswith("data: "))  # decoding: it holds the only slot
    return r, lines


def test_a_client_that_disconnects_mid_stream_frees_its_slot(one_slot_lp_server):
    s = one_slot_lp_server
    before = s.health()["steps"]
    with httpx.Client(timeout=300) as client:
        long_stream(s, client)
    # the only slot is free again: the next request is served, long before the first could have finished
    reply = s.post("/completions", {"model": s.model, "prompt": "a", "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert s.health()["steps"] - before < LONG_CONTEXT // 2


def test_a_client_that_disconnects_before_a_whole_reply_frees_its_slot(one_slot_lp_server):
    import socket
    from urllib.parse import urlsplit

    s = one_slot_lp_server
    before = s.health()["steps"]
    body = json.dumps({"model": s.model, "prompt": PROMPTS[0], "max_tokens": LONG_CONTEXT - 16,
                       "ignore_eos": True}).encode()
    where = urlsplit(s.url)
    with socket.create_connection((where.hostname, where.port)) as sock:  # a client that will hang up
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: s.health()["decoding"] == 1)
    reply = s.post("/completions", {"model": s.model, "prompt": "a", "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert s.health()["steps"] - before < LONG_CONTEXT // 2


def test_requests_past_the_slots_and_the_queue_get_429(one_slot_lp_server):
    s = one_slot_lp_server
    with httpx.Client(timeout=300) as client:
        r, _ = long_stream(s, client)
        waiting = {}
        queued = threading.Thread(target=lambda: waiting.update(reply=s.post(
            "/completions", {"model": s.model, "prompt": "a", "max_tokens": 2, "ignore_eos": True})))
        queued.start()
        wait_for(lambda: s.health()["waiting"] == 1)  # the second request is in the queue of one
        refused = s.post("/completions", {"model": s.model, "prompt": "a", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error" and "retry later" in refused.json()["error"][
            "message"]
        r.close()  # the first goes; the queued one gets its slot
    queued.join()
    assert waiting["reply"].status_code == 200 and waiting["reply"].json()["usage"]["completion_tokens"] == 2


def test_sigterm_ends_requests_in_flight_and_stops_the_server_cleanly(one_slot_lp_server):
    """(Last of the one-slot server's tests: it stops that server.)"""
    s = one_slot_lp_server
    with httpx.Client(timeout=300) as client:
        r, lines = long_stream(s, client)
        s.proc.send_signal(signal.SIGTERM)
        rest = sse(lines)
    assert rest[-1] == "[DONE]" and "shutting down" in rest[-2]["error"]["message"]
    assert s.proc.wait(120) == 0
    assert "Traceback" not in s.stderr() and '"stopped": true' in s.stderr()


# ---------------------------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("case", ["no slots", "port taken", "no such model"])
def test_bad_flags_end_in_one_error_line(chat_model, tmp_path, run_main, case):
    """The command line in this process (`run_main`: its exit code and one-line error as `python -m` gives them; the
    servers above start it as a process)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args, words = {
            "no slots": (["--model", chat_model, "--max-batch", 0], "--max-batch 0: must be at least 1"),
            "port taken": (["--model", chat_model, "--port", taken.getsockname()[1]], "already in use"),
            "no such model": (["--model", tmp_path / "nothing"], "no such file or directory"),
        }[case]
        rc, _, err = run_main("lpjax.serve", *args)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error:") and words in lines[-1], err


# ---------------------------------------------------------------------------------------------- in process


def test_scheduler_ends_requests_at_eos_at_max_tokens_and_on_cancel_and_bounds_its_queue(engines):
    from lpjax.runtime.slots import Slots
    from lpjax.serving.scheduler import GenerationRequest, QueueFull, Scheduler

    engine = engines("mha")
    tok = engine.tokenizer
    prompt = tuple(tok.encode(PROMPTS[2]))
    greedy = greedy_tokens(engine, list(prompt), 16)
    sched = Scheduler(Slots(engine.programs, 2, CONTEXT), max_queue=1)
    got: dict[str, list] = {}
    done = {}

    def sink(name, cancel_after=None):
        got[name], done[name] = [], threading.Event()

        def take(event):
            got[name].append(event)
            tokens = [t for e in got[name] for t in e.tokens]
            if event.finish or event.error or (cancel_after and len(tokens) == cancel_after):
                done[name].set()
            if cancel_after and len(tokens) == cancel_after:
                sched.cancel(tickets[name])

        return take

    tickets = {}
    first = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])  # its first time there
    eos = greedy[first]
    tickets["eos"] = sched.submit(GenerationRequest(prompt, 12, eos=frozenset({eos})), sink("eos"))
    tickets["length"] = sched.submit(GenerationRequest(prompt, 4), sink("length"))
    tickets["cancel"] = sched.submit(GenerationRequest(prompt, 12), sink("cancel", cancel_after=3))
    with pytest.raises(QueueFull):  # 2 slots + 1 waiting: the engine thread has not started, nothing has left
        sched.submit(GenerationRequest(prompt, 4), sink("refused"))
    sched.start()
    try:
        for name in ("eos", "length", "cancel"):
            assert done[name].wait(300), name
    finally:
        sched.stop()

    def tokens(name):
        return [t for e in got[name] for t in e.tokens]

    assert tokens("eos") == greedy[: first + 1] and got["eos"][-1].finish == "stop"
    assert tokens("length") == greedy[:4] and got["length"][-1].finish == "length"
    assert tokens("cancel") == greedy[:3] and all(e.finish is None for e in got["cancel"])
    assert not sched.slots.busy.any() and sched.stats()["decoding"] == 0
    # "eos" and "length" decoded side by side: fewer steps than one request after the other
    assert sched.steps < first + (4 - 1) + (3 - 1)


def test_text_stream_shows_text_as_it_grows_and_cuts_it_before_a_stop_string(engines):
    from lpjax.serving.text import TextStream

    tok = engines("mha").tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)[1:]  # without <s>
    assert tok.decode(ids) == text

    def feed(stream):
        shown = []
        for t in ids:
            shown.append(stream.add([t]))
            if stream.stopped:
                break
        return shown

    plain = TextStream(tok)
    assert "".join(feed(plain)) + plain.flush() == text and plain.tokens == len(ids)
    stopped = TextStream(tok, ("fox",))
    shown = feed(stopped)
    assert "".join(shown) == "The quick brown " and stopped.stopped and stopped.flush() == ""
    assert tok.decode(ids[:stopped.tokens]).endswith("fox") and not tok.decode(ids[:stopped.tokens - 1]).endswith(
        "fox")
    never = TextStream(tok, ("lazy cat",))
    shown = feed(never)
    assert "lazy d" in next(s for s in shown if "lazy" in s)  # held back while it could become the stop string
    assert "".join(shown) + never.flush() == text and not never.stopped


def test_load_benchmark_reports_throughput_and_latency_percentiles(server, tmp_path):
    out = tmp_path / "load.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "bench.serve_load", "--url", server.url, "--concurrency", "3",
                        "--requests", "6", "--prompt-len", "10", "--max-tokens", "8", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    assert result == json.loads(p.stdout.strip().splitlines()[-1])
    assert (result["requests_ok"], result["requests_failed"], result["output_tokens"]) == (6, 0, 48)
    assert result["prompt_tokens_mean"] == 10 and result["prompt_kind"] == "token ids"
    assert result["server"]["steps_per_call"] == 8  # the server's default, read from /v1/models
    assert result["output_tokens_per_s"] > 0 and result["requests_per_s"] > 0
    assert 0 < result["ttft_ms_p50"] <= result["ttft_ms_p99"] and 0 < result["itl_ms_p50"] <= result["itl_ms_p99"]
