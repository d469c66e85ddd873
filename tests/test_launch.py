"""`--processes per-device`: a tool started once runs as one worker process per device (lpjax/launch.py), gives what
one process gives, and ends as its first failing worker does, leaving no process behind."""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, subprocess_env

from lpjax import launch

# the parent keeps conftest's 8 CPU devices: each worker must see 1 of them
ENV = subprocess_env()


def run(*args, timeout: int = 300, env: dict[str, str] | None = None):
    p = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                       env=dict(ENV, **(env or {})), timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("error:")]


def processes_with(marker: str) -> list[int]:
    """The live processes whose command line or environment holds `marker`."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and any(marker.encode() in (d / f).read_bytes() for f in ("cmdline", "environ")):
                found.append(int(d.name))
        except OSError:
            pass
    return found


def test_per_device_generate_prints_what_one_process_prints(checkpoints, engines):
    directory, prompt = checkpoints("mha")[0], "The quick brown fox"
    rc, out, err = run("lpjax.generate", "--model", directory, "--devices", 2, "--prompt", prompt, "--max-new-tokens",
                       6, "--dtype", "float32", "--json", "--processes", "per-device")
    assert rc == 0, err
    engine = engines("mha", "", 2)
    tok = engine.tokenizer
    one = engine.generate([tok.encode(prompt)], 6, eos=tok.eos_ids, pad_id=tok.pad_id).tokens[0]
    got = last_json(out)
    assert got["tokens"] == one and got["text"] == tok.decode(one) and got["devices"] == 2
    assert out == prompt + tok.decode(one) + "\n" + out.splitlines()[-1] + "\n"  # worker 0's stdout alone


def test_engine_calls_agree_across_processes(checkpoints, engines):
    """logits, generate and host-called next_token steps under an LP plan, with 2 workers of 1 device each."""
    from engine_tool import engine_calls

    rc, out, err = run("engine_tool", "--model", checkpoints("mha")[0], "--lp", "2:4", "--devices", 2, "--dtype",
                       "float32", "--processes", "per-device")
    assert rc == 0, err
    got, one = last_json(out), engine_calls(engines("mha", "2:4", 2))
    assert got["processes"] == 2 and got["devices"] == one["devices"] == 2
    assert got["generate"] == one["generate"] and got["next_token"] == one["next_token"]
    np.testing.assert_allclose(got["logits"], one["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args,words", [
    (["--lp", "2:6", "--prompt", "hello"], "0 <= START"),
    (["--chat"], "runs in one process"),  # workers other than 0 have no stdin to read a conversation from
])
def test_a_bad_input_found_by_the_workers_ends_the_run_with_one_error_line(checkpoints, args, words):
    marker = f"marker-{uuid.uuid4()}"  # in every worker's environment
    rc, _, err = run("lpjax.generate", "--model", checkpoints("mha")[0], *args, "--devices", 2, "--processes",
                     "per-device", env={"LPJAX_TEST_MARKER": marker})
    assert rc == 2, err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and words in error_lines(err)[0]
    assert processes_with(marker) == []


def test_per_device_with_an_explicit_coordinator_is_refused(checkpoints):
    rc, _, err = run("lpjax.eval", "--model", checkpoints("mha")[0], "--text", "x.txt", "--processes", "per-device",
                     "--coordinator", "127.0.0.1:1", "--num-processes", 2, "--process-id", 0)
    assert rc == 2 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and "does not combine with --coordinator" in err


# Stand-ins for workers, to exercise the launcher alone: worker i writes its pid to DIR/i, joins (reports to the
# launcher) unless told to hang, then does what argv[2 + i] says, or sleeps.
FAKE_WORKER = """
import os, signal, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
open(os.path.join(sys.argv[1], str(i)), "w").write(str(os.getpid()))
what = sys.argv[2 + i]
if what != "hang":
    os.write(int(os.environ["LPJAX_WORKER_READY_FD"]), b"j")
print(f"worker {i} up", file=sys.stderr, flush=True)
if what == "error":
    print("error: boom", file=sys.stderr)
    sys.exit(3)
if what == "signal":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "done":
    sys.exit(0)
time.sleep(600)
"""


# JAX, once started in this test process, warns on any fork; the launcher's child only execs
quiet_fork = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


def fake_workers(tmp_path, *behaviour) -> list[launch.WorkerCommand]:
    argv = (sys.executable, "-c", FAKE_WORKER, str(tmp_path), *behaviour)
    return [launch.WorkerCommand(argv, dict(ENV, JAX_PROCESS_ID=str(i))) for i in range(len(behaviour))]


@pytest.mark.parametrize("failure,code,line", [
    ("error", 3, "error: boom"),
    ("signal", 128 + 9, "error: --processes per-device: worker 1 of 3 was killed by SIGKILL"),
])
@quiet_fork
def test_a_failing_worker_stops_the_others_and_its_error_is_told_once(tmp_path, capfd, failure, code, line):
    assert launch.run_workers(fake_workers(tmp_path, "sleep", failure, "sleep")) == code
    err = capfd.readouterr().err
    assert error_lines(err) == [line] and "worker 1 up" in err
    assert processes_with(str(tmp_path)) == []


@quiet_fork
def test_workers_that_finish_end_the_run_with_0(tmp_path, capfd):
    assert launch.run_workers(fake_workers(tmp_path, "done", "done")) == 0
    assert sorted(capfd.readouterr().err.splitlines()) == ["worker 0 up", "worker 1 up"]


@quiet_fork
def test_workers_that_never_join_time_out_with_one_line(tmp_path, capfd):
    assert launch.run_workers(fake_workers(tmp_path, "sleep", "hang"), start_timeout_s=2) == 2
    assert error_lines(capfd.readouterr().err) == [
        "error: --processes per-device: worker(s) 1 of 2 did not join the others within 2 s (is 127.0.0.1 "
        "reachable? a proxy variable can stop it)"]
    assert processes_with(str(tmp_path)) == []


def launcher_with_sleeping_workers(tmp_path) -> subprocess.Popen:
    """A launcher process (as a tool's would be) of 2 sleeping stand-in workers, returned once both are up."""
    code = ("from lpjax import cli, launch; from test_launch import fake_workers; "
            f"cli.run(lambda argv: launch.run_workers(fake_workers({str(tmp_path)!r}, 'sleep', 'sleep')))")
    p = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / str(i)).exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return p


def test_sigterm_to_the_launcher_ends_every_worker(tmp_path):
    p = launcher_with_sleeping_workers(tmp_path)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert err.splitlines().count("interrupted") == 1
    assert processes_with(str(tmp_path)) == []


def test_a_killed_launcher_takes_its_workers_with_it(tmp_path):
    p = launcher_with_sleeping_workers(tmp_path)
    p.kill()
    p.communicate(timeout=60)
    deadline = time.monotonic() + 60  # the kernel kills them (PR_SET_PDEATHSIG) as the launcher goes
    while processes_with(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(str(tmp_path)) == []


def test_the_launcher_refuses_to_start_workers_once_it_holds_a_backend():
    import argparse

    import jax

    jax.devices()
    args = argparse.Namespace(processes="per-device", devices=2, coordinator=None, num_processes=None,
                              distributed=False)
    with pytest.raises(RuntimeError, match="already runs in the launcher"):
        launch.start(args, "lpjax.generate", [])


def test_worker_i_sees_the_i_th_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,6")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    gpu = launch.worker_commands("lpjax.generate", ["--devices", "2"], launch.LocalDevices("gpu", 3, 2))
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in gpu] == ["3", "5"]
    assert [c.env["JAX_PROCESS_ID"] for c in gpu] == ["0", "1"]
    assert {c.env["JAX_NUM_PROCESSES"] for c in gpu} == {"2"}
    assert len({c.env["JAX_COORDINATOR_ADDRESS"] for c in gpu}) == 1
    assert gpu[0].argv == (sys.executable, "-m", "lpjax.generate", "--devices", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cpu = launch.worker_commands("lpjax.eval", [], launch.LocalDevices("cpu", 8, 4))
    assert {c.env["XLA_FLAGS"] for c in cpu} == {"--xla_cpu_foo=1 --xla_force_host_platform_device_count=1"}
    assert [c.env.get("CUDA_VISIBLE_DEVICES") for c in cpu] == [None] * 4
    gpu = launch.worker_commands("lpjax.eval", [], launch.LocalDevices("gpu", 2, 2))
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in gpu] == ["0", "1"]


def test_worker_0_draws_progress_in_place_when_the_launchers_stderr_is_a_terminal(monkeypatch, capsys):
    from lpjax import cli

    monkeypatch.setenv(cli.STDERR_TERMINAL_ENV, "1")  # what run_workers sets for worker 0 when its stderr is a tty
    cli.progress_bar("loading")(1, 2)
    assert capsys.readouterr().err.startswith("\rloading [")


def test_stderr_passes_as_drawn_but_ending_lines_are_held():
    s = launch._Stderr()
    assert s.feed(b"\rloading [#..] 1/3") == "\rloading [#..] 1/3"
    assert s.feed(b"\rloading [###] 3/3\nwarn") == "\rloading [###] 3/3\nwarn"
    assert s.feed(b"ing\nerr") == "ing\n"
    assert s.feed(b"or: bad --lp\ninterrupted\n") == "" and s.ending == "interrupted"
    assert s.feed(b"interrupting\n") == "interrupting\n"
    assert s.feed(b"text then ") == "text then " and s.feed(b"error: not an ending\n") == "error: not an ending\n"
    assert s.feed(b"\xc3") == "" and s.feed(b"\xa9", final=True) == "\u00e9"
