"""A player's desktop on a closed machine: a private virtual screen (Xvfb) and a private sound server
(user-mode PulseAudio with a null sink), for the windowed game, the live tests and the soak.

Both are context managers that stop what they started, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    """Terminate ``proc`` (kill it if it does not go within ``timeout``) and reap it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def virtual_screen(size: str = "1280x720x24") -> Iterator[str]:
    """A private Xvfb on a free display number; yields its ``DISPLAY`` (``:N``)."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", size, "-br", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as fh:
            number = fh.readline().strip().decode()
        if not number.isdigit():
            raise RuntimeError("Xvfb did not report its display")
        yield f":{number}"
    finally:
        stop(proc)


@contextlib.contextmanager
def sound_server(home: Path, sink: str) -> Iterator[dict[str, str]]:
    """A private PulseAudio with a null sink named ``sink``, its runtime files under ``home``; yields the
    environment that reaches it (``PULSE_SERVER``, and ``PULSE_SINK`` so players play into the sink)."""
    runtime = home / "pulse"
    runtime.mkdir(mode=0o700)
    sock = runtime / "native"
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    env.pop("PULSE_SERVER", None)
    proc = subprocess.Popen(["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                             "--disallow-exit", f"--load=module-null-sink sink_name={sink}",
                             f"--load=module-native-protocol-unix socket={sock} auth-anonymous=1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError("pulseaudio exited")
            if time.monotonic() > deadline:
                raise RuntimeError("pulseaudio did not start")
            time.sleep(0.05)
        yield dict(env, PULSE_SERVER=f"unix:{sock}", PULSE_SINK=sink)
    finally:
        stop(proc)
