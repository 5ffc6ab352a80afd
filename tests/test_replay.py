"""Replay of a file whose streams are not interleaved closely.

Muxers may write a second or more of video before the audio that plays with it.  Replay
decodes each stream on its own and merges them by media time, so at real-time speed the
audio still goes out when it is due, not when the decoder reaches it in file order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from copilot.clock import VirtualClock
from copilot.testing import run_stage

av = pytest.importorskip("av")

SECONDS = 4.0
RATE = 48000


def write_video_then_audio(path: Path) -> Path:
    """An MP4 whose packets are all video first, then all audio (as a naive muxer writes)."""
    # max_interleave_delta 1 us: the muxer writes packets as they come instead of interleaving them
    with av.open(str(path), "w", options={"max_interleave_delta": "1"}) as out:
        vs = out.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aus = out.add_stream("aac", rate=RATE)
        aus.layout = "mono"
        for i in range(int(SECONDS * 30)):
            img = np.full((48, 64, 3), (i * 7) % 256, np.uint8)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(SECONDS * RATE)) / RATE)).astype(np.float32)
        for k in range(0, tone.size, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, k:k + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = RATE, k
            for pkt in aus.encode(frame):
                out.mux(pkt)
        for pkt in aus.encode():
            out.mux(pkt)
    return path


def audio_behind_video_in_file_order(path: Path) -> float:
    """How far (s) an audio packet lies behind the video already read, in file order."""
    newest_video = worst = 0.0
    with av.open(str(path)) as c:
        for pkt in c.demux():
            if pkt.pts is None:
                continue
            t = float(pkt.pts * pkt.time_base)
            if pkt.stream.type == "video":
                newest_video = max(newest_video, t)
            else:
                worst = max(worst, newest_video - t)
    return worst


def test_audio_muxed_after_its_video_still_goes_out_on_time(tmp_path: Path) -> None:
    path = write_video_then_audio(tmp_path / "video_then_audio.mp4")
    assert audio_behind_video_in_file_order(path) > 1.0  # the file really is badly interleaved
    clock = VirtualClock()
    t0 = clock.now_ns()
    res = run_stage("replay", params={"path": str(path)}, clock=clock)
    audio, video = res.envelopes("audio"), res.envelopes("video")
    assert len(video) == pytest.approx(SECONDS * 30, abs=2) and audio
    # every item is released at its media time (speed 1), audio as well as video
    for env in (*audio, *video):
        assert (env.t_capture_ns - t0) / 1e9 == pytest.approx(env.t_media - video[0].t_media, abs=0.05)
    # and the two streams interleave: no audio chunk follows video more than a chunk later than it
    merged = sorted((*audio, *video), key=lambda e: e.t_capture_ns)
    newest_video = -1.0
    for env in merged:
        if env in video:
            newest_video = max(newest_video, env.t_media)
        else:
            assert newest_video - env.t_media < 0.05


def test_a_stretch_of_corrupt_data_mid_file_is_skipped_and_counted_not_the_end(tmp_path: Path) -> None:
    """A few bad bytes used to end decoding at the first one (the whole rest of the file lost);
    the packets that do not decode are skipped and counted, and the file plays to its end."""
    clean = write_video_then_audio(tmp_path / "clean.mp4")
    data = bytearray(clean.read_bytes())
    with av.open(str(clean)) as c:  # the middle video packet's bytes: an I/P frame of the clip
        packets = [p for p in c.demux(c.streams.video[0]) if p.size > 0]
        mid = packets[len(packets) // 2]
        offset, size = int(mid.pos), int(mid.size)
    rng = np.random.default_rng(0)
    data[offset:offset + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    res = run_stage("replay", params={"path": str(bad)}, speed=None)
    video = res.envelopes("video")
    assert video[-1].t_media > SECONDS - 0.2  # it reached the end
    assert len(video) >= SECONDS * 30 - 10
    skipped = res.metrics.dropped_by_reason.get("corrupt_video_packets", 0)
    assert skipped >= 1
    assert len(video) + skipped <= SECONDS * 30 + 1


def test_a_file_whose_every_packet_is_corrupt_is_bad_input(tmp_path: Path) -> None:
    from copilot.errors import UsageError

    clean = write_video_then_audio(tmp_path / "clean.mp4")
    data = bytearray(clean.read_bytes())
    rng = np.random.default_rng(1)
    with av.open(str(clean)) as c:
        for pkt in c.demux():
            if pkt.size > 0 and pkt.pos is not None and pkt.pos >= 0:
                data[pkt.pos:pkt.pos + pkt.size] = rng.integers(0, 256, pkt.size, dtype=np.uint8).tobytes()
    bad = tmp_path / "all_corrupt.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="nothing in it decodes"):
        run_stage("replay", params={"path": str(bad)}, speed=None)


def test_a_source_s_fps_is_its_video_rate_not_all_its_messages(atari_clip: Path) -> None:
    """The replay sends ~43 AAC chunks a second beside its 30 frames: the metrics row (table and
    metrics JSON) reports 30 fps, the video rate, and keeps the message count as it was."""
    from copilot.metrics import metrics_json
    from copilot.report import metrics_table

    res = run_stage("replay", params={"path": str(atari_clip), "until": 3.0}, clock=VirtualClock())
    m = res.metrics
    video, audio = len(res.envelopes("video")), len(res.envelopes("audio"))
    assert audio > 0 and m.count == video + audio
    assert m.fps == pytest.approx(30.0, rel=0.1) and m.video_frames == video
    entry = metrics_json([m], wall_s=3.0, media_s=3.0)["stages"][m.stage]
    assert {"count", "fps", "dropped", "latency_ms"} <= set(entry)
    assert entry["fps"] == m.fps and entry["video_frames"] == video
    assert "a source: video frames a second" in str(metrics_table([m]).caption)
