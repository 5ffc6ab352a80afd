"""An Atari game in a real window, with sound, for live-capture tests.

``python -m bench.games.window --game Breakout [--seconds N] [--seed S] [--title T]``

The emulator (:class:`engines.atari_game.AtariGame`) runs at 60 Hz of wall-clock time;
its picture is drawn nearest-neighbour upscaled to 640x480 in a Tk window and its audio
(u8, 30720 Hz) is piped to ``pacat`` (PulseAudio / PipeWire), so it plays on the default
output, or on ``--sink``.  Without a sound server it prints one warning line and goes on
silently.  When the picture is ready it prints one line, ``window ready: ...``, on stdout.
If drawing falls behind, frames are skipped but the emulator and the sound keep to the
clock.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

import numpy as np

from copilot.errors import UsageError
from engines.atari_game import AUDIO_RATE, EMULATOR_FPS, AtariGame, upscale_indices

WIDTH, HEIGHT = 640, 480
_MAX_CATCH_UP = 6  # emulator frames per tick before we give up and re-anchor the clock


class AudioOut:
    """Raw u8 mono samples to ``pacat``; a bounded queue so the game never blocks."""

    def __init__(self, rate: int, sink: str | None = None, name: str = "atari") -> None:
        self.ok = False
        self.dropped = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=30)
        exe = shutil.which("pacat")
        if exe is None:
            self._warn("pacat not found (Debian package pulseaudio-utils)")
            return
        cmd = [exe, "--playback", "--raw", "--format=u8", f"--rate={rate}", "--channels=1"]
        cmd += [f"--client-name={name}", "--stream-name=game", "--latency-msec=60"]
        if sink:
            cmd.append(f"--device={sink}")
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self._warn(f"cannot start pacat ({exc.strerror})")
            return
        with contextlib.suppress(subprocess.TimeoutExpired):  # no server: pacat quits at once
            proc.wait(timeout=0.3)
        if proc.returncode is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            self._warn(err.splitlines()[-1] if err else f"pacat exited ({proc.returncode})")
            return
        self._proc = proc
        self.ok = True
        self._thread = threading.Thread(target=self._pump, name="audio-out", daemon=True)
        self._thread.start()

    @staticmethod
    def _warn(why: str) -> None:
        print(f"warning: no audio output ({why}); playing without sound", file=sys.stderr)

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin: IO[bytes] = self._proc.stdin
        while True:
            data = self._queue.get()
            if data is None:
                break
            try:
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, OSError):
                self.ok = False
                self._warn("pacat stopped")
                return

    def write(self, samples: np.ndarray) -> None:
        if not self.ok:
            return
        try:
            self._queue.put_nowait(samples.tobytes())
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        if self._proc is None:
            return
        if self.ok:
            self._queue.put(None)
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            if self._proc.stdin:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(timeout=2)
        self._proc = None


class WindowGame:
    """The emulator in a Tk window at 60 Hz of wall-clock time."""

    def __init__(
        self,
        game: str,
        seed: int = 0,
        policy: str = "random",
        title: str | None = None,
        seconds: float | None = None,
        position: tuple[int, int] | None = None,
        audio: bool = True,
        sink: str | None = None,
    ) -> None:
        self.atari = AtariGame(game, seed=seed, policy=policy)
        self.title = title or f"{self.atari.name} (Gameplay Copilot test game)"
        self.seconds = seconds
        self.position = position
        self.want_audio = audio
        self.sink = sink
        rows, cols = upscale_indices(self.atari.screen_shape[:2], (WIDTH, HEIGHT))
        self._idx = (rows[:, None] * self.atari.screen_shape[1] + cols[None, :]).ravel()
        self._header = f"P6 {WIDTH} {HEIGHT} 255\n".encode()
        self.frames_drawn = 0
        self._stop = False

    def _ppm(self, rgb: np.ndarray) -> bytes:
        pixels: bytes = rgb.reshape(-1, 3)[self._idx].tobytes()
        return self._header + pixels

    def run(self) -> None:
        import tkinter as tk

        try:
            root = tk.Tk(className="atari")
        except tk.TclError as exc:
            raise UsageError(f"cannot open a window: {exc} (is DISPLAY set?)") from None
        root.title(self.title)
        root.resizable(False, False)
        if self.position is not None:
            root.geometry(f"+{self.position[0]}+{self.position[1]}")
        photo = tk.PhotoImage(master=root, width=WIDTH, height=HEIGHT)
        label = tk.Label(root, image=photo, borderwidth=0, highlightthickness=0)
        label.pack()
        root.protocol("WM_DELETE_WINDOW", self.stop)
        audio = AudioOut(AUDIO_RATE, self.sink) if self.want_audio else None

        def on_signal(signum: int, frame: Any) -> None:
            self.stop()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        period = 1.0 / EMULATOR_FPS
        start = t0 = time.monotonic()
        done = 0  # emulator frames since t0

        def tick() -> None:
            nonlocal t0, done
            now = time.monotonic()
            if self._stop or (self.seconds is not None and now - start >= self.seconds):
                root.quit()
                return
            due = int((now - t0) / period) + 1 - done
            if due > _MAX_CATCH_UP:  # stalled (window dragged, machine busy): skip ahead
                t0, done, due = now, 0, 1
            last = None
            for _ in range(max(due, 0)):
                last = self.atari.step()
                done += 1
                if audio is not None:
                    audio.write(last.audio)
            if last is not None:
                photo.configure(data=self._ppm(last.rgb), format="PPM")
                self.frames_drawn += 1
                if self.frames_drawn == 1:
                    root.update_idletasks()
                    print(
                        f"window ready: {self.title!r} {WIDTH}x{HEIGHT} "
                        f"at +{root.winfo_rootx()}+{root.winfo_rooty()}",
                        flush=True,
                    )
            wait = t0 + done * period - time.monotonic()
            root.after(max(1, int(wait * 1000)), tick)

        root.after(0, tick)
        try:
            root.mainloop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if audio is not None:
                audio.close()
            with contextlib.suppress(tk.TclError):
                root.destroy()
        played = self.atari.frame_index / EMULATOR_FPS
        dropped = audio.dropped if audio is not None else 0
        print(
            f"window done: {self.atari.frame_index} emulator frames ({played:.1f} s), "
            f"{self.frames_drawn} drawn, {dropped} audio chunks dropped",
            flush=True,
        )

    def stop(self) -> None:
        self._stop = True


def _position(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y, got {text!r}") from None
    return x, y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.games.window",
        description="Play an Atari game (random policy) in a window, with sound.",
    )
    ap.add_argument("--game", required=True, help="e.g. Breakout, SpaceInvaders, Pong")
    ap.add_argument("--seconds", type=float, default=None, help="stop after N s (default: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", choices=("random", "sticky"), default="random")
    ap.add_argument("--title", default=None, help="window title")
    ap.add_argument("--position", type=_position, default=None, metavar="X,Y")
    ap.add_argument("--sink", default=None, help="PulseAudio sink (default: the default one)")
    ap.add_argument("--no-audio", action="store_true")
    args = ap.parse_args(argv)
    try:
        WindowGame(
            args.game,
            seed=args.seed,
            policy=args.policy,
            title=args.title,
            seconds=args.seconds,
            position=args.position,
            audio=not args.no_audio,
            sink=args.sink,
        ).run()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
