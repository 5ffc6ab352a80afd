"""The command line, as a user runs it: bad input, partial media, metrics JSON, cheap start.

Every run is a real ``python -m copilot`` subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from copilot.config import default_config_path, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "onnxruntime", "rapidocr", "faster_whisper", "ctranslate2", "ale_py", "PIL",
         "cv2", "av", "tensorrt", "PySide6")


def gamecopilot(*args: str, timeout: float = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "copilot", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("gamecopilot: error: "), line
    for n in needles:
        assert n in line, line
    return line


def remux(src: Path, dst: Path, kinds: set[str], options: dict[str, str] | None = None) -> Path:
    """Copy some streams of ``src`` into ``dst`` without re-encoding."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w", options=options or {}) as o:
        ins = [s for s in i.streams if s.type in kinds]
        out = {s.index: o.add_stream_from_template(s) for s in ins}
        for pkt in i.demux(*ins):
            if pkt.dts is None:
                continue
            pkt.stream = out[pkt.stream.index]
            o.mux(pkt)
    return dst


@pytest.fixture(scope="module")
def media(atari_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    out = {"clip": atari_clip}
    out["video_only"] = remux(atari_clip, d / "video_only.mp4", {"video"})
    out["audio_only"] = remux(atari_clip, d / "audio_only.m4a", {"audio"})
    data = atari_clip.read_bytes()
    (d / "half.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: unreadable
    out["half"] = d / "half.mp4"
    fast = remux(atari_clip, d / "fast.mp4", {"video", "audio"}, {"movflags": "faststart"}).read_bytes()
    (d / "fast_half.mp4").write_bytes(fast[: len(fast) // 2])  # index first: the data ends early
    out["fast_half"] = d / "fast_half.mp4"
    (d / "empty.mp4").write_bytes(b"")
    out["empty"] = d / "empty.mp4"
    (d / "notes.mp4").write_text("these are not frames\n")
    out["text"] = d / "notes.mp4"
    return out


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "needle"),
    [("missing", "file not found"), ("empty", "file is empty"), ("text", "not a readable media file"),
     ("half", "not a readable media file"), ("fast_half", "truncated"), ("directory", "is a directory")],
)
def test_bad_media_is_one_line_and_exit_2(name: str, needle: str, media: dict[str, Path], tmp_path: Path) -> None:
    path = {"missing": tmp_path / "nope.mp4", "directory": tmp_path}.get(name) or media[name]
    assert_one_line_error(gamecopilot("replay", str(path), "--speed", "max", "-q"), str(path), needle)


def write_config(tmp_path: Path, edit: Any) -> Path:
    data = yaml.safe_load(default_config_path().read_text())
    edit(data)
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda d: d.update(bogus=1), ["unknown key 'bogus'"]),
        (lambda d: d["stages"][0].update(colour="red"), ["stages[0]", "unknown key 'colour'"]),
        (lambda d: d["links"][next(iter(d["links"]))].update(hwm="lots"), [".hwm", "expected int, got str"]),
        (lambda d: d["stages"][0].update(inputs="frames"), ["stages[0].inputs", "expected a list, got str"]),
        (lambda d: d["stages"][-1].update(kind="no_such_stage"), ["unknown stage kind 'no_such_stage'"]),
    ],
    ids=["unknown-key", "unknown-stage-key", "wrong-type", "wrong-type-list", "unknown-stage-kind"],
)
def test_bad_config_is_one_line_and_exit_2(edit: Any, needles: list[str], media: dict[str, Path],
                                           tmp_path: Path) -> None:
    cfg = write_config(tmp_path, edit)
    res = gamecopilot("replay", str(media["clip"]), "--config", str(cfg), "--speed", "max", "-q")
    assert_one_line_error(res, str(cfg), *needles)


def test_missing_and_empty_config(media: dict[str, Path], tmp_path: Path) -> None:
    assert_one_line_error(gamecopilot("replay", str(media["clip"]), "--config", str(tmp_path / "no.yaml")),
                          "config file not found")
    (tmp_path / "empty.yaml").write_text("")
    assert_one_line_error(gamecopilot("run", "-c", str(tmp_path / "empty.yaml")), "config file is empty")


def test_metrics_out_in_a_missing_directory(media: dict[str, Path], tmp_path: Path) -> None:
    res = gamecopilot("replay", str(media["clip"]), "--metrics-out", str(tmp_path / "no" / "m.json"), "-q")
    assert_one_line_error(res, "--metrics-out")


@pytest.mark.parametrize(("bad", "needle"), [(["--profile", "no_such_profile"], "unknown profile"),
                                             (["--features-out", "/no/such/dir/f.jsonl"], "--features-out"),
                                             (["--metrics-out", "/no/such/dir/m.json"], "--metrics-out"),
                                             (["--metrics-out", "{tmp}"], "--metrics-out: {tmp} is a directory"),
                                             (["--metrics-out", "{events}"], "--metrics-out: {events} is also -o"),
                                             (["--features-out", "{clip}"], "is also the input"),
                                             (["--metrics-out", ""], "--metrics-out: empty file name"),
                                             (["--features-out", "-"], "--features-out: '-' (standard output)"),
                                             (["--features-out", "{tmp}/new/"], "{tmp}/new/ names a directory"),
                                             (["--features-out", "{tmp}/f.jsonl/."], "f.jsonl/. names a directory")])
def test_a_bad_argument_empties_no_output_file(bad: list[str], needle: str, media: dict[str, Path],
                                               tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"t": 1.0, "kind": "earlier run"}\n')
    names = {"tmp": str(tmp_path), "events": str(events), "clip": str(media["clip"])}
    res = gamecopilot("annotate", str(media["clip"]), "-o", str(events), *(b.format(**names) for b in bad))
    assert_one_line_error(res, needle.format(**names))
    assert events.read_text() == '{"t": 1.0, "kind": "earlier run"}\n', "nothing already written is lost"


def test_an_output_over_the_input_is_refused_and_the_input_kept(media: dict[str, Path], tmp_path: Path) -> None:
    clip = tmp_path / "mine.mp4"
    clip.write_bytes(media["clip"].read_bytes())
    size = clip.stat().st_size
    assert_one_line_error(gamecopilot("annotate", str(clip), "-o", str(clip)), f"-o: {clip} is also the input")
    assert_one_line_error(gamecopilot("replay", str(clip), "--metrics-out", str(clip)), "--metrics-out")
    hard = tmp_path / "same.mp4"  # a hard link is the same file under another name
    os.link(clip, hard)
    assert_one_line_error(gamecopilot("annotate", str(clip), "-o", str(hard)), f"-o: {hard} is also the input")
    assert clip.stat().st_size == size
    # nor may an output be a file the run reads: its pipeline config or its profile
    config = tmp_path / "pipeline.yaml"
    config.write_text((ROOT / "configs" / "default.yaml").read_text())
    profile = tmp_path / "game.yaml"
    profile.write_text((ROOT / "configs" / "profiles" / "default.yaml").read_text())
    kept = {config: config.read_text(), profile: profile.read_text()}
    res = gamecopilot("annotate", str(clip), "-c", str(config), "-o", str(tmp_path / "e.jsonl"), "--metrics-out",
                      str(config))
    assert_one_line_error(res, f"--metrics-out: {config} is also the pipeline config")
    assert_one_line_error(gamecopilot("annotate", str(clip), "--profile", str(profile), "-o", str(profile)),
                          f"-o: {profile} is also the profile")
    assert {p: p.read_text() for p in kept} == kept


def test_a_session_directory_that_cannot_take_a_new_timeline_is_one_line_and_keeps_what_it_holds(
        media: dict[str, Path], tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept\n")
    assert_one_line_error(gamecopilot("replay", str(media["clip"]), "--session", str(a_file), "-q"),
                          f"--session {a_file}: exists and is not a directory")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "timeline.sqlite").write_bytes(b"an earlier session")
    assert_one_line_error(gamecopilot("replay", str(media["clip"]), "--session", str(earlier), "-q"),
                          f"--session {earlier}: already holds a session")
    assert (earlier / "timeline.sqlite").read_bytes() == b"an earlier session" and a_file.read_text() == "kept\n"
    no_timeline = tmp_path / "pipeline.yaml"
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    cfg["stages"] = [st for st in cfg["stages"] if st["kind"] != "timeline"]
    no_timeline.write_text(yaml.safe_dump(cfg))
    res = gamecopilot("replay", str(media["clip"]), "-c", str(no_timeline), "--session", str(tmp_path / "s"), "-q")
    assert_one_line_error(res, "--session: the pipeline")


def test_an_overlay_that_cannot_start_is_one_line_before_any_output_is_written(media: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    import socket

    events = tmp_path / "events.jsonl"
    events.write_text("kept\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = gamecopilot("replay", str(media["clip"]), "--overlay", "web", "--overlay-port", str(port),
                          "--events-out", str(events), "-q")
    assert_one_line_error(res, f"--overlay-port {port}: 127.0.0.1:{port} is in use")
    assert events.read_text() == "kept\n"
    for bad in ("0", "70000", "http"):
        res = gamecopilot("replay", str(media["clip"]), "--overlay", "web", "--overlay-port", bad, "-q")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "--overlay-port: expected a port number 1-65535" in res.stderr
    no_display = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    res = gamecopilot("replay", str(media["clip"]), "--overlay", "window", "--events-out", str(events), "-q",
                      env=no_display)
    if "needs PySide6" not in res.stderr:
        assert_one_line_error(res, "--overlay window needs a display")
    assert events.read_text() == "kept\n"


@pytest.mark.parametrize("command", ["replay", "live"])
def test_advice_out_without_a_reasoner_is_refused_before_any_output_is_written(command: str, media: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """``--advice-out`` with the reasoner left out would write an empty file: refused instead."""
    advice, events = tmp_path / "advice.jsonl", tmp_path / "events.jsonl"
    events.write_text("kept\n")
    source = [str(media["clip"])] if command == "replay" else ["--game", "Breakout", "--until", "1"]
    res = gamecopilot(command, *source, "--reasoner", "none", "--advice-out", str(advice), "--events-out",
                      str(events), "-q")
    assert_one_line_error(res, "--advice-out: --reasoner none gives no advice to write")
    assert not advice.exists() and events.read_text() == "kept\n"


def test_an_unknown_reasoner_is_one_line(media: dict[str, Path]) -> None:
    res = gamecopilot("replay", str(media["clip"]), "--reasoner", "qwen3-vl", "-q")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--reasoner" in res.stderr, res.stderr


@pytest.mark.parametrize("speed", ["nan", "inf", "-inf"])
def test_a_speed_that_is_not_a_positive_number_is_one_line(speed: str, media: dict[str, Path]) -> None:
    res = gamecopilot("replay", str(media["clip"]), f"--speed={speed}", "-q")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("gamecopilot replay: error: argument --speed: speed must be"), res.stderr


def test_an_output_that_fails_while_written_ends_the_run_with_one_error(media: dict[str, Path]) -> None:
    """A full disk: the sink's write fails mid-run.  No restart loop, no traceback, no warnings of
    the other group about the failed one's consumers leaving: one line naming the file, exit 2."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    res = gamecopilot("annotate", str(media["clip"]), "-o", "/dev/full", timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr == "gamecopilot: error: events: cannot write /dev/full (No space left on device)\n", res.stderr


SAMPLE_TRUTH = str(ROOT / "bench" / "data" / "breakout_s0.truth.jsonl")


@pytest.mark.parametrize(("args", "needle"), [
    (["demo", "--until", "1:70"], "argument --until: not a time: '1:70'"),  # a typo, not 2:10
    (["demo", "--until", "inf"], "argument --until: not a time"),
    (["demo", "--until", "nan:10"], "argument --until: not a time"),
    (["eval", SAMPLE_TRUTH, SAMPLE_TRUTH, "--critical-window", "nan,1"], "argument --critical-window: window bounds"),
    (["run", "-c", "configs/default.yaml", "-q"], "the replay stage has no file to read: give one with -i FILE"),
    # numpy and the emulator refused a negative seed with a traceback, deep inside the run
    (["dataset", "atari", "--game", "Breakout", "--seconds", "1", "--seed", "-5", "-o", "/tmp/never"],
     "argument --seed: expected a whole number >= 0, got '-5'"),
    # the bench tools' own parsers printed the whole usage block too
    (["bench", "encoders", "--frames", "abc"], "gamecopilot bench encoders: error: argument --frames"),
    (["bench", "atari", "--seconds", "0.01"], "--seconds must be at least 1 s of game time"),
    (["bench", "bus", "--frames", "abc"], "gamecopilot bench bus: error: argument --frames"),
    (["bench", "bus", "--transports", "udp"], "--transports: unknown udp"),
    # the dataset maker is found through the registry (engines.atari_dataset), not imported by the core
    (["dataset", "atari", "--game", "NoSuchGame", "--seconds", "1", "-o", "/tmp/never"],
     "unknown Atari game 'NoSuchGame'"),
])
def test_a_bad_time_window_or_missing_input_is_one_line(args: list[str], needle: str) -> None:
    res = gamecopilot(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr


def test_until_before_start(media: dict[str, Path]) -> None:
    res = gamecopilot("replay", str(media["clip"]), "--start", "5", "--until", "3", "-q")
    assert_one_line_error(res, "--until")


# -- partial media -----------------------------------------------------------------------------
def split_config(tmp_path: Path) -> Path:
    """replay -> one sink per stream, so each stream's count can be read from the metrics."""
    data = {
        "name": "split",
        "links": {"frames": {"policy": "latest", "hwm": 2}, "audio": {"policy": "ordered"}},
        "stages": [
            {"name": "replay", "kind": "replay", "outputs": {"video": "frames", "audio": "audio"}},
            {"name": "video_sink", "kind": "jsonl_sink", "inputs": ["frames"]},
            {"name": "audio_sink", "kind": "jsonl_sink", "inputs": ["audio"]},
        ],
    }
    p = tmp_path / "split.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(("name", "present", "absent"), [("video_only", "video_sink", "audio_sink"),
                                                         ("audio_only", "audio_sink", "video_sink")])
def test_a_file_with_one_stream_replays_what_it_has(name: str, present: str, absent: str, media: dict[str, Path],
                                                    tmp_path: Path) -> None:
    res = gamecopilot("replay", str(media[name]), "--config", str(split_config(tmp_path)), "--speed", "max",
                      "--json", "-q")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["stages"][present]["count"] > 0
    assert report["stages"][absent]["count"] == 0
    assert report["stages"]["replay"]["count"] == report["stages"][present]["count"]
    assert report["media_s"] == pytest.approx(12.0, abs=0.2)
    # and through the default pipeline too
    res = gamecopilot("replay", str(media[name]), "--speed", "max", "--json", "-q")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["stages"]["replay"]["count"] > 0


# -- metrics -----------------------------------------------------------------------------------
# stages that see a message only after a wake: a few seconds of a clip may hold none
IDLE_OK = {"advice"}


def default_run_stages() -> list[str]:
    """The default pipeline's stages a run has without ``--overlay`` and ``--session`` (which add the overlay
    and the timeline)."""
    return [s.name for s in load_pipeline(default_config_path()).stages if s.kind not in ("overlay", "timeline")]


def check_metrics_schema(report: dict[str, Any], stage_names: list[str]) -> None:
    for key in ("wall_s", "media_s", "realtime_factor"):
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert report["realtime_factor"] == pytest.approx(report["media_s"] / report["wall_s"], rel=0.01)
    assert list(report["stages"]) == stage_names  # one entry per stage, in config order
    for name, st in report["stages"].items():
        if name in IDLE_OK and st["count"] == 0:
            continue
        assert isinstance(st["count"], int) and st["count"] > 0, name
        assert isinstance(st["fps"], (int, float)) and st["fps"] > 0, name
        assert isinstance(st["dropped"], int) and st["dropped"] >= 0, name
        lat = st["latency_ms"]
        assert set(lat) >= {"p50", "p95", "p99"}, name
        assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"], (name, lat)


def test_metrics_out_follows_the_design_schema(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    res = gamecopilot("replay", str(media["clip"]), "--speed", "max", "--until", "6", "--metrics-out", str(out),
                      "--json", "-q")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    check_metrics_schema(report, default_run_stages())
    assert report["media_s"] == pytest.approx(6.0, abs=0.1)
    assert json.loads(res.stdout)["stages"].keys() == report["stages"].keys()  # --json prints the same


@pytest.mark.slow
def test_real_time_replay_takes_media_time(media: dict[str, Path], tmp_path: Path) -> None:
    """The acceptance run, shortened: --speed 1 --until 5 takes about 5 s of wall time."""
    out = tmp_path / "m.json"
    res = gamecopilot("replay", str(media["clip"]), "--speed", "1", "--until", "5", "--metrics-out", str(out), "-q")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    check_metrics_schema(report, default_run_stages())
    print(f"\nreal-time replay: media {report['media_s']} s in wall {report['wall_s']} s")
    assert report["media_s"] == pytest.approx(5.0, abs=0.1)
    assert report["wall_s"] >= report["media_s"] - 0.1  # paced: never faster than real time
    assert report["wall_s"] < report["media_s"] * 1.25  # generous: a busy machine may lag a little


# -- start-up ----------------------------------------------------------------------------------
def test_help_imports_nothing_heavy() -> None:
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "copilot", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "replay" in res.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert imported, "no -X importtime output"
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_no_command_prints_help() -> None:
    res = gamecopilot()
    assert "usage" in (res.stdout + res.stderr).lower()
    assert res.returncode == 2


@pytest.mark.slow
def test_the_default_pipeline_runs_as_stage_processes(atari_clip: Path, tmp_path: Path) -> None:
    """``gamecopilot stage GROUP`` once per group, as on three GPUs of one host: the groups find
    each other through ipc sockets in a run directory of their own (inproc ones could not
    leave the process), the events come out and all end by themselves."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    events = tmp_path / "events.jsonl"
    base = [sys.executable, "-m", "copilot", "stage"]
    common = ["-i", str(atari_clip), "--speed", "max", "-q"]
    detect = subprocess.Popen([*base, "detect", *common, "--events-out", str(events)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reason = subprocess.Popen([*base, "reason", *common], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        decode = subprocess.run([*base, "decode", *common], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        _, err = detect.communicate(timeout=60)
        _, reason_err = reason.communicate(timeout=60)
    finally:
        for proc in (detect, reason):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert decode.returncode == 0, decode.stderr
    assert detect.returncode == 0, err
    assert reason.returncode == 0, reason_err
    assert "Traceback" not in err + decode.stderr
    replay = json.loads(decode.stderr.strip().splitlines()[-1])["stages"][0]
    assert replay["stage"] == "replay" and replay["count"] > 300
    trigger = next(s for s in json.loads(err.strip().splitlines()[-1])["stages"] if s["stage"] == "trigger")
    assert trigger["count"] > 300  # it saw the clip, not nothing
    assert events.read_text().count("\n") >= 1
    assert list((tmp_path / f"gamecopilot-{os.getuid()}").iterdir())  # the run directory


def test_the_stage_run_directory_stays_inside_its_private_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from copilot.commands import shared_run_dir
    from copilot.errors import UsageError

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    base = tmp_path / f"gamecopilot-{os.getuid()}"
    assert shared_run_dir("..") == str(base / "pipeline")  # not $TMPDIR itself, where links would replace files
    assert shared_run_dir("a/../b") == str(base / "a_.._b")
    base.chmod(0o755)  # this user's, left open (by an earlier version): closed again
    shared_run_dir("p")
    assert base.stat().st_mode & 0o777 == 0o700
    shutil.rmtree(base)
    base.symlink_to(tmp_path)  # not a directory of its own: another user could have placed it
    with pytest.raises(UsageError, match="is not this user's own"):
        shared_run_dir("p")


def test_a_socket_path_too_long_is_one_line(media: dict[str, Path], tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "copilot", "replay", str(media["clip"]), "--speed", "max", "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, TMPDIR=str(deep)))
    assert_one_line_error(res, "is longer than 107 bytes", "TMPDIR")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stage_process_stopped_by_a_signal_exits_128_plus_it(sig: int, atari_clip: Path, tmp_path: Path) -> None:
    """``detect`` alone waits for a ``decode`` that never comes, until it is told to stop."""
    proc = subprocess.Popen([sys.executable, "-m", "copilot", "stage", "detect", "-i", str(atari_clip), "-q"],
                            cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # past its imports: the stop is the group's graceful one
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err


def test_a_stage_process_whose_inputs_were_lost_exits_1(atari_clip: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A group on another host, told by the supervisor that a link ended before it took the end
    (``inputs_ended``), has lost what was sent: its own process says so and exits 1, as the run does."""
    from types import SimpleNamespace

    from copilot.cli import main
    from copilot.messages import Metrics

    async def fake_run_group(cfg: Any, group: str, opts: Any, on_ready: Any = None) -> Any:
        return SimpleNamespace(stop_signal=None, lost_inputs=["features"],
                               metrics_snapshot=lambda: Metrics(group=group, stages=[]))

    monkeypatch.setattr("copilot.group.run_group", fake_run_group)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["stage", "detect", "-i", str(atari_clip), "-q"]) == 1
    err = capsys.readouterr().err
    assert "group detect started after its input features ended: what was sent before is lost" in err
