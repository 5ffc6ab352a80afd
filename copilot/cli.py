"""The ``gamecopilot`` command line.

Only argparse is imported at start-up; each command imports what it needs, so ``--help`` is
instant and the cheap path never touches torch.  Every :class:`UsageError` (and a few
equivalent OS errors) ends as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable, Sequence

from copilot.args import OneLineParser, seed_number
from copilot.errors import UsageError

SPEEDS = "1|2|max or any positive factor"

# ``gamecopilot bench NAME ARGS`` for a NAME other than pipeline hands ARGS to the tool registered
# as NAME in the ``gamecopilot.benchmarks`` entry points (bench/ implements them; the core never
# imports bench: see copilot/registry.py).  These are the ones ``--help`` lists.
BENCHMARKS = {
    "bus": "one hop of a 720p frame over inproc/ipc/tcp/tcp+curve: our links vs raw pyzmq",
    "encoders": "per-encoder latency p50/p95/p99 on 640x480 and 1280x720 frames and audio",
    "atari": "the live Atari source at real time: fps, audio rate, drift",
    "reasoner": "event-to-advice latency per reasoner backend over a replay at real time, and wakes per minute",
    "overlay": "advice emitted -> drawn in a real browser (chromium) over a replay at real time; --screenshot",
    "soak": "a long live session beside the windowed game (Xvfb, PulseAudio): fps, drops, RSS per group, restarts",
    "hico": "HiCo over 10 min of real gameplay: reconstruction cosine against uniform pooling, update cost, memory",
    "trigger": "cheap trigger against the cascade with the event scorer over a pool: recall, wake precision, curve",
}
# ``gamecopilot NAME ARGS`` for the tools registered as ``gamecopilot.tools`` entry points (engines
# implement them); these are the ones ``--help`` lists.
TOOLS = {
    "llm-server": "start a small OpenAI-compatible LLM server on the CPU (llama.cpp, SmolLM2-135M) for --llm-url",
    "devices": "list monitors (with geometry), windows and audio devices (loopback sources marked), or --json",
    "ask": "question a session's timeline (--session DIR of replay, live, demo): '@03:12 why did I die?'",
    "train": "train a model: `train scorer` (the event scorer, from Atari recordings it makes; the train extra)",
    "models": "list the models a pipeline config uses and where they are found (local or the Hugging Face cache), "
              "or --json",
    "export": "export an engine's model (siglip, videomae, sam3) to ONNX or a TensorRT engine (--to onnx|tensorrt)",
}


def _time(text: str) -> float:
    from copilot.timefmt import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"speed must be {SPEEDS}, got {text!r}") from None
    if not 0 < value < math.inf:  # also rejects nan
        raise argparse.ArgumentTypeError(f"speed must be {SPEEDS}, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return value


def _region(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,WIDTH,HEIGHT in pixels, got {text!r}") from None
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise argparse.ArgumentTypeError(f"expected X,Y,WIDTH,HEIGHT with a positive size, got {text!r}")
    return values


def _window(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        before, after = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BEFORE,AFTER in seconds (e.g. 4,1.5), got {text!r}") from None
    if not (math.isfinite(before) and math.isfinite(after)) or before < 0 or after < 0:
        raise argparse.ArgumentTypeError(f"window bounds must be finite and zero or more, got {text!r}")
    return before, after


def _matching_rules() -> str:
    from copilot.scoring import MATCHING_RULES

    return MATCHING_RULES


def _add_run_options(p: argparse.ArgumentParser, *, speed: bool = True) -> None:
    if speed:
        p.add_argument("--speed", type=_speed, default=1.0, help=f"pacing: {SPEEDS} (default 1 = real time)")
    p.add_argument("--config", "-c", help="pipeline YAML (default: configs/default.yaml)")
    p.add_argument("--profile", help="game profile name or YAML path")
    p.add_argument("--session", metavar="DIR", help="write the session's timeline (events, game state, speech, "
                   "advice, keyframes; SQLite) into this new directory; question it with `gamecopilot ask DIR`")
    p.add_argument("--reasoner", choices=["auto", "rules", "openai", "transformers", "none"], default="auto",
                   help="what answers significant events: auto (a configured model, else rules; the default), rules "
                   "(no model), openai (--llm-url), transformers (--llm-model), none (perception only)")
    p.add_argument("--llm-url", metavar="URL", help="an OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama), "
                   "e.g. http://127.0.0.1:8000/v1; the API key, if any, in OPENAI_API_KEY")
    p.add_argument("--llm-model", metavar="M", help="the model: a served model id with --llm-url, else a local "
                   "checkpoint directory (or a Hugging Face cache id) for transformers; nothing is downloaded")
    p.add_argument("--overlay", choices=["web", "window", "none"], default="none",
                   help="where advice appears besides the console: web (a transparent page for a browser or OBS), "
                   "window (that page's content in a click-through window over the game, PySide6), none (default)")
    p.add_argument("--overlay-port", type=_port, default=8765, metavar="N",
                   help="the overlay page's port (default 8765): http://127.0.0.1:N/")
    p.add_argument("--overlay-host", default="127.0.0.1", metavar="ADDR",
                   help="where the page listens (default 127.0.0.1, this machine only); beyond loopback (another "
                   "PC running OBS) the URL carries a token made for the run, and clients without it are refused")
    p.add_argument("--events-out", help="write events JSONL here")
    p.add_argument("--advice-out", help="write advice JSONL here")
    p.add_argument("--features-out", help="write encoder features JSONL here")
    _add_asr_option(p)
    _add_scorer_option(p)
    p.add_argument("--metrics-out", help="write the metrics JSON here at the end")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no live table")
    p.add_argument("-v", "--verbose", action="count", default=0)


def _add_scorer_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", metavar="none|default|PATH",
                   help="the learned tier that rescores the trigger's candidates: default (the model shipped with "
                   "the package), a model file from `gamecopilot train scorer`, or none (the cheap trigger alone; "
                   "what the default pipeline runs)")


def _add_asr_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asr-model", metavar="DIR|package:NAME",
                   help="transcribe speech with this local CTranslate2 Whisper model (default: no ASR; "
                   "nothing is downloaded)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="gamecopilot",
        description="Gameplay Copilot: watches a game (live or a recording), runs cheap perception, "
        "wakes a reasoning model only on significant moments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("demo", help="replay the bundled sample clip at real time through the default pipeline")
    _add_run_options(p)
    p.add_argument("--until", type=_time, help="stop at this media time (seconds or MM:SS)")
    p.add_argument("--no-session", action="store_true", help="write no timeline (by default the demo writes one "
                   "under ~/.local/state/gameplay-copilot/sessions/ unless --session DIR says where)")

    p = sub.add_parser("replay", help="push a recording through the pipeline at real-time speed")
    p.add_argument("file", help="video/audio file")
    p.add_argument("--start", type=_time, default=0.0, help="start at this media time (seconds or MM:SS)")
    p.add_argument("--until", type=_time, help="stop at this media time (seconds or MM:SS)")
    _add_run_options(p)

    p = sub.add_parser("live", help="run beside a live game: screen + loopback audio (or an emulated Atari game)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--monitor", type=int, help="capture this monitor (1 = first; default 1)")
    where.add_argument("--region", type=_region, metavar="X,Y,W,H", help="capture this screen rectangle")
    where.add_argument("--window", metavar="TITLE", help="capture the window with this title (X11, needs xdotool)")
    where.add_argument("--game", metavar="NAME",
                       help="no screen: play this Atari game in-process at real time (ale-py) and watch it")
    p.add_argument("--fps", type=_positive, default=30.0, help="capture rate (default 30)")
    p.add_argument("--audio", default="default", metavar="DEVICE|pyaudio:DEVICE|none",
                   help="audio to record: default (the default output's monitor), a soundcard device id or name, "
                   "pyaudio:INDEX|NAME (a PortAudio input such as a microphone; the pyaudio extra), or none; "
                   "gamecopilot devices lists them")
    p.add_argument("--seed", type=seed_number, default=0, help="with --game: emulator and policy seed")
    p.add_argument("--truth-out", help="with --game: write the game's ground truth JSONL here as it happens")
    p.add_argument("--record", metavar="FILE.mp4", help="also record what is captured (H.264 + AAC) to replay later")
    p.add_argument("--until", type=_time, help="stop after this long (seconds or MM:SS)")
    _add_run_options(p, speed=False)

    p = sub.add_parser("run", help="run a pipeline YAML (all local placement groups)")
    p.add_argument("--input", "-i", help="input file for the replay stage(s), if any")
    _add_run_options(p)

    p = sub.add_parser("stage", help="run one placement group of a pipeline in this process")
    p.add_argument("group")
    p.add_argument("--input", "-i", help="input file for the replay stage(s), if any")
    _add_run_options(p)

    p = sub.add_parser("annotate", help="annotate a recording with timestamped events, at max speed")
    p.add_argument("file", help="video/audio file")
    p.add_argument("-o", "--output", required=True, help="events JSONL to write")
    p.add_argument("--config", "-c", help="pipeline YAML (default: configs/default.yaml)")
    p.add_argument("--profile", help="game profile name or YAML path (default: the game-agnostic default)")
    p.add_argument("--start", type=_time, default=0.0, help="start at this media time (seconds or MM:SS)")
    p.add_argument("--until", type=_time, help="stop at this media time (seconds or MM:SS)")
    p.add_argument("--metrics-out", help="write the metrics JSON here at the end")
    p.add_argument("--features-out", help="write encoder features JSONL here")
    _add_asr_option(p)
    _add_scorer_option(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0)

    p = sub.add_parser(
        "eval",
        help="score predicted events against ground truth",
        description="Score predicted events (events JSONL) against ground truth (truth JSONL).",
        epilog=_matching_rules(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pred", help="predicted events JSONL")
    p.add_argument("truth", help="ground-truth JSONL")
    p.add_argument("--tolerance", type=_positive, default=0.5, help="matching tolerance in seconds (default 0.5)")
    p.add_argument("--critical-window", type=_window, default=(4.0, 1.5), metavar="BEFORE,AFTER",
                   help="seconds before/after a critical moment in which a wake counts (default 4,1.5)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("keys", help="make the CurveZMQ keypair for a pipeline spread over several hosts",
                       description="Write DIR/copilot.key (public) and DIR/copilot.key_secret (mode 600). Copy DIR "
                                   "to every host and set curve_keys: DIR/copilot.key_secret in the pipeline YAML: "
                                   "its tcp:// sockets are then encrypted, let in only holders of the key, and may "
                                   "bind addresses other than loopback.")
    p.add_argument("dir", help="directory to write the keypair in (made if missing)")

    p = sub.add_parser("dataset", help="make recordings with ground truth")
    dsub = p.add_subparsers(dest="dataset", metavar="SOURCE")
    d = dsub.add_parser("atari", help="play an Atari game (ale-py ROMs) and write MP4 + truth JSONL")
    d.add_argument("--game", required=True, help="game name, e.g. Breakout, SpaceInvaders, DemonAttack, Pong")
    d.add_argument("--seconds", type=_positive, required=True, help="length of the footage")
    d.add_argument("--fps", type=int, default=30, choices=[30, 60], help="output video fps (default 30)")
    d.add_argument("--seed", type=seed_number, default=0)
    d.add_argument("--policy", choices=["random", "sticky"], default="random")
    d.add_argument("-o", "--output", required=True, help="output directory")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(["pipeline", *BENCHMARKS]))
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    b = bsub.add_parser("pipeline", help="run a pipeline over a file at max speed and report per stage")
    b.add_argument("config", help="pipeline YAML")
    b.add_argument("file", help="input file")
    b.add_argument("--speed", type=_speed, default=None, help="default max")
    b.add_argument("--until", type=_time)
    b.add_argument("--json", action="store_true")
    b.add_argument("-o", "--output", help="also write the metrics JSON here")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    for name, text in BENCHMARKS.items():  # each parses its own arguments (see main)
        bsub.add_parser(name, help=text, add_help=False)
    for name, text in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


# commands that run a pipeline under the supervisor
_SUPERVISED = frozenset({"demo", "replay", "live", "run", "annotate"})


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in _SUPERVISED or (args.command == "bench" and args.bench == "pipeline"):
        # SIGINT is held (blocked in this thread) until the supervisor handles it; a Ctrl-C
        # meanwhile waits, then stops the run.  Threads the imports start (numpy's OpenBLAS
        # workers) inherit the block, so a Ctrl-C can only reach this thread, never one of them
        # while the supervisor ignores SIGINT to spawn a group, where it would be lost.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return _run_command(args)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in ("demo", "replay", "live", "run", "stage"):
        from copilot import commands

        handler: Callable[[argparse.Namespace], int] = getattr(commands, f"cmd_{cmd}")
        return handler(args)
    if cmd in ("annotate", "eval", "dataset", "keys"):
        from copilot import commands

        return getattr(commands, f"cmd_{cmd}")(args)  # type: ignore[no-any-return]
    if cmd == "bench":
        if args.bench == "pipeline":
            from copilot import commands

            return commands.cmd_bench_pipeline(args)
        raise UsageError("bench: choose one of: " + ", ".join(["pipeline", *BENCHMARKS]))
    raise UsageError(f"unknown command {cmd!r}")


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if len(raw) >= 2 and raw[0] == "bench" and _is_benchmark(raw[1]):
        return _run_benchmark(raw[1], raw[2:])
    if raw and raw[0] in TOOLS:
        return _run_tool(raw[0], raw[1:])
    parser = build_parser()
    args = parser.parse_args(raw)
    if args.command is None:
        parser.print_help()
        return 2
    return _guarded(lambda: _dispatch(args))


def entry() -> None:
    """The ``gamecopilot`` command: :func:`main`, then exit (see copilot.worker.exit_process)."""
    code = main()
    from copilot.worker import exit_process

    exit_process(code)


def _is_benchmark(name: str) -> bool:
    if name in BENCHMARKS:
        return True
    if name == "pipeline" or name.startswith("-"):
        return False
    from copilot.registry import available

    return name in available("benchmarks")


def _run_benchmark(name: str, argv: list[str]) -> int:
    from copilot.registry import resolve

    return _guarded(lambda: int(resolve(name, "benchmarks")(argv) or 0))


def _run_tool(name: str, argv: list[str]) -> int:
    from copilot.registry import resolve

    return _guarded(lambda: int(resolve(name, "tools")(argv) or 0))


def _guarded(run: Callable[[], int]) -> int:
    """Run a command: bad input becomes one line and exit 2, Ctrl-C exit 130, never a traceback."""
    try:
        return run()
    except UsageError as exc:
        print(f"gamecopilot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the goodbye
        print("gamecopilot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
