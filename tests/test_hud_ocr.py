"""HUD OCR: the real PP-OCR recogniser reads score and health text drawn in several fonts and
sizes on game-like backgrounds (real Atari frames among them), the parsers turn it into
state, and the stage reads only changed regions, at its rate, and spots keywords off the
event loop.  Fonts: DejaVu (Debian ``fonts-dejavu-core``) when installed, else Pillow's own.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from copilot.clock import VirtualClock
from copilot.keywords import match_keywords
from copilot.messages import Cue, VideoFrame
from copilot.stage import StageContext
from copilot.testing import make_envelope, run_stage
from stages.hud_ocr import HudOcrParams, HudOcrStage, parse_value

pytestmark = pytest.mark.usefixtures("leak_check")

pytest.importorskip("rapidocr")
PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
# the first four are in fonts-dejavu-core, the last in fonts-dejavu-extra (used when present)
FONT_FILES = ["DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansCondensed-Oblique.ttf"]
SIZES = [12, 16, 24, 36]


def font(name: str, size: int) -> Any:
    path = DEJAVU / name
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # Pillow's bundled font (FreeType builds)


def fonts() -> list[str]:
    have = [f for f in FONT_FILES if (DEJAVU / f).is_file()]
    return have or ["pillow-default"]


# -- parsers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value", "ratio", "maximum"),
    [
        ("SCORE 12450", "int", 12450, None, None),
        ("003210", "int", 3210, None, None),
        ("12,450", "int", 12450, None, None),
        ("1O5", "int", 105, None, None),  # O read for 0
        ("I2", "int", 12, None, None),
        ("LIVES x3", "int", 3, None, None),
        ("1UP 2000", "int", 2000, None, None),
        ("-15", "int", -15, None, None),
        ("12.5", "float", 12.5, None, None),
        ("12,5", "float", 12.5, None, None),
        ("TIME 1,234.5", "float", 1234.5, None, None),
        ("75%", "percent", 75, 0.75, None),
        ("HEALTH 100 %", "percent", 100, 1.0, None),
        ("62.5%", "percent", 62.5, 0.625, None),
        ("40", "percent", 40, 0.4, None),  # the % sign missed by OCR
        ("75/100", "fraction", 75, 0.75, 100),
        ("HP 30 / 120", "fraction", 30, 0.25, 120),
        ("AMMO 7|30", "fraction", 7, 7 / 30, 30),
        ("45", "fraction", 45, None, None),
    ],
)
def test_parse_value(text: str, kind: Any, value: float, ratio: float | None, maximum: float | None) -> None:
    p = parse_value(text, kind)
    assert p is not None
    assert p.value == pytest.approx(value)
    assert p.ratio == (pytest.approx(ratio) if ratio is not None else None)
    assert p.maximum == maximum


@pytest.mark.parametrize(("text", "kind"), [("", "int"), ("SCORE", "int"), ("GAME OVER", "percent"),
                                             ("HP", "fraction"), ("---", "float")])
def test_parse_value_without_a_number(text: str, kind: Any) -> None:
    assert parse_value(text, kind) is None


def test_text_fields_keep_text() -> None:
    p = parse_value("  WORLD 1-2 ", "text")
    assert p is not None and p.value is None


def test_keyword_matching() -> None:
    kws = {"GAME OVER": "critical", "WIN": "high", "Level Complete": "normal"}
    assert match_keywords(["GAME OVER"], kws) == ["GAME OVER"]
    assert match_keywords(["GAMEOVER", "PRESS START"], kws) == ["GAME OVER"]
    assert match_keywords(["GAME 0VER"], kws) == ["GAME OVER"]  # one misread letter
    assert match_keywords(["WINDOW"], kws) == []  # not inside another word
    assert match_keywords(["you win!"], kws) == ["WIN"]
    assert match_keywords(["level complete."], kws) == ["Level Complete"]
    assert match_keywords(["SCORE 100"], kws) == []


# -- the recogniser on rendered text ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def atari_frame() -> np.ndarray:
    """A real Breakout frame, nearest-upscaled to 640x480 as the dataset maker does."""
    ale = pytest.importorskip("ale_py")
    del ale
    from engines.atari_game import AtariGame, upscale_indices

    game = AtariGame("Breakout", seed=1)
    s = None
    for _ in range(120):
        s = game.step()
    assert s is not None
    rows, cols = upscale_indices(s.rgb.shape[:2], (640, 480))
    return np.ascontiguousarray(s.rgb[rows][:, cols])


def backgrounds(h: int, w: int) -> list[tuple[str, np.ndarray, tuple[int, int, int]]]:
    rng = np.random.default_rng(h * 1000 + w)
    frame = atari_frame()
    fh, fw = frame.shape[:2]
    y, x = int(rng.integers(0, fh - h)), int(rng.integers(0, fw - w))
    grad = np.zeros((h, w, 3), np.uint8)
    grad[..., 0] = np.linspace(20, 90, w, dtype=np.uint8)[None, :]
    grad[..., 2] = np.linspace(80, 10, h, dtype=np.uint8)[:, None]
    return [
        ("atari", frame[y : y + h, x : x + w].copy(), (255, 255, 255)),
        ("noise", rng.integers(0, 70, (h, w, 3), dtype=np.uint8), (255, 220, 60)),
        ("gradient", grad, (120, 255, 120)),
        ("light", np.full((h, w, 3), (200, 205, 190), np.uint8), (20, 20, 60)),
    ]


HUD_TEXTS: list[tuple[str, Any, float, float | None]] = [
    ("SCORE 12450", "int", 12450, None),
    ("003210", "int", 3210, None),
    ("HP 75/100", "fraction", 75, 0.75),
    ("75%", "percent", 75, 0.75),
    ("HEALTH 100%", "percent", 100, 1.0),
    ("AMMO 42", "int", 42, None),
    ("LIVES 3", "int", 3, None),
]


def render(text: str, fnt: Any, bg: np.ndarray, color: tuple[int, int, int], margin: int) -> np.ndarray:
    im = Image.fromarray(bg)
    ImageDraw.Draw(im).text((margin, margin // 2), text, font=fnt, fill=color)
    return np.asarray(im)


@pytest.fixture(scope="module")
def recognizer() -> Any:
    from engines.ocr import TextRecognizer

    return TextRecognizer()


@pytest.mark.parametrize("font_name", fonts())
def test_recognizer_reads_hud_text_in_fonts_and_sizes(recognizer: Any, font_name: str) -> None:
    from engines.ocr import to_bgr

    wrong = []
    total = 0
    for size in SIZES:
        fnt = font(font_name, size)
        for text, kind, value, ratio in HUD_TEXTS:
            _, _, x1, y1 = fnt.getbbox(text)
            margin = max(4, size // 3)
            h, w = y1 + margin, x1 + 2 * margin
            for bg_name, bg, color in backgrounds(h, w):
                crop = render(text, fnt, bg, color, margin)
                line = recognizer([to_bgr(crop)])[0]
                parsed = parse_value(line.text, kind)
                total += 1
                ok = parsed is not None and parsed.value == pytest.approx(value) and (
                    ratio is None or parsed.ratio == pytest.approx(ratio))
                if not ok:
                    wrong.append(f"{size}px {bg_name} {text!r} -> {line.text!r}")
    assert not wrong, f"{len(wrong)}/{total} misread: {wrong}"


def test_recognizer_batches_keep_order(recognizer: Any) -> None:
    from engines.ocr import to_bgr

    fnt = font(fonts()[0], 20)
    crops = []
    texts = ["1", "SCORE 999999", "42", "HP 10/20", "7"]
    for t in texts:
        _, _, x1, y1 = fnt.getbbox(t)
        crops.append(to_bgr(render(t, fnt, np.zeros((y1 + 8, x1 + 12, 3), np.uint8), (255, 255, 255), 6)))
    assert [ln.text for ln in recognizer(crops)] == texts


# -- the stage ----------------------------------------------------------------------------------------

HUD_FONT = "DejaVuSansMono-Bold.ttf"


def hud_frame(score: int, health: int, banner: str | None = None) -> np.ndarray:
    """A 640x480 game frame with a score top left and health top right (and an optional banner)."""
    im = Image.fromarray(atari_frame().copy())
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, 640, 40), fill=(10, 10, 30))
    f = font(HUD_FONT, 22)
    d.text((12, 8), f"SCORE {score:06d}", font=f, fill=(255, 255, 255))
    d.text((450, 8), f"HP {health}%", font=f, fill=(255, 80, 80))
    if banner:
        d.text((200, 220), banner, font=font(FONT_FILES[0], 40), fill=(255, 255, 0))
    return np.asarray(im)


HUD_PROFILE = """
name: test-hud
regions:
  - {name: score, box: [0.0, 0.0, 0.45, 0.083]}
  - {name: health, box: [0.68, 0.0, 0.32, 0.083]}
ocr_fields:
  - {name: score, region: score, type: int}
  - {name: health, region: health, type: percent}
rules:
  - {field: health, op: drop_pct, value: 30, priority: critical}
"""


def write_profile(tmp_path: Path, text: str) -> str:
    p = tmp_path / "profile.yaml"
    p.write_text(text)
    return str(p)


def test_stage_reads_hud_state_only_when_it_changes(tmp_path: Path) -> None:
    profile = write_profile(tmp_path, HUD_PROFILE)
    # 3 s at 30 fps: score changes at 1.0 s, health at 2.0 s
    frames = []
    for i in range(90):
        t = i / 30
        score = 120 if t < 1.0 else 450
        health = 100 if t < 2.0 else 60
        frames.append(VideoFrame(image=hud_frame(score, health), frame_index=i))
    res = run_stage("hud_ocr", frames, options={"profile": profile})
    envs = res.envelopes("state")
    states = [(round(e.t_media, 3), e.payload.values) for e in envs]
    assert [s[1] for s in states] == [
        {"score": 120.0, "health": 100.0, "health_ratio": 1.0},
        {"score": 450.0, "health": 100.0, "health_ratio": 1.0},
        {"score": 450.0, "health": 60.0, "health_ratio": 0.6},
    ], states
    assert envs[0].payload.text == {"score": "SCORE 000120", "health": "HP 100%"}
    # a change is read within one interval (0.25 s) of media time
    assert 1.0 <= states[1][0] <= 1.0 + 0.25 + 1e-6
    assert 2.0 <= states[2][0] <= 2.0 + 0.25 + 1e-6
    # the game state says what each value was before its latest change, and when it changed
    assert envs[2].payload.previous == {"score": 120.0, "health": 100.0, "health_ratio": 1.0}
    assert envs[2].payload.changed_at["health"] == pytest.approx(envs[2].t_media, abs=1e-4)
    # the profile's rule (health drops by more than 30%) fires once, as a cue at the change
    cues = res.envelopes("cues")
    assert [(c.payload.kind, c.payload.priority, c.t_media) for c in cues] == [
        ("health_drop_pct", "critical", envs[2].t_media)]
    assert cues[0].payload.reason == "rule health drop_pct 30: 100 -> 60"
    stage = res.stage
    assert isinstance(stage, HudOcrStage)
    assert stage.reads == 3  # first read + two changes, not one per frame or per interval
    # in between, heartbeats say the state has not changed (so the trigger need not wait for it)
    beats = [e.t_media for e in res.heartbeats["state"]]
    sent = sorted([*beats, *(t for t, _ in states)])
    assert len(beats) >= 80 and max(np.diff(sent)) <= 1 / 30 + 1e-3  # one per frame


def test_a_single_digit_change_is_read(tmp_path: Path) -> None:
    profile = write_profile(tmp_path, HUD_PROFILE)
    frames = [hud_frame(0, 100)] * 20 + [hud_frame(100, 100)] * 20 + [hud_frame(100, 90)] * 20
    res = run_stage("hud_ocr", [VideoFrame(image=f) for f in frames], options={"profile": profile})
    assert [(f.values["score"], f.values["health"]) for f in res["state"]] == [(0, 100), (100, 100), (100, 90)]


def test_video_compression_noise_is_not_a_change(tmp_path: Path) -> None:
    profile = write_profile(tmp_path, HUD_PROFILE)
    rng = np.random.default_rng(3)
    base = hud_frame(4200, 55)
    noisy = [np.clip(base.astype(np.int16) + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
             for _ in range(60)]
    res = run_stage("hud_ocr", [VideoFrame(image=f) for f in noisy], options={"profile": profile})
    assert [f.values["score"] for f in res["state"]] == [4200]
    stage = res.stage
    assert isinstance(stage, HudOcrStage) and stage.reads == 1


def test_stage_keeps_last_value_when_a_read_fails(tmp_path: Path) -> None:
    profile = write_profile(tmp_path, HUD_PROFILE)
    blank = hud_frame(500, 80).copy()
    blank[:40] = 0  # the HUD blinks off for a moment
    frames = [hud_frame(500, 80)] * 15 + [blank] * 15 + [hud_frame(500, 80)] * 15
    res = run_stage("hud_ocr", [VideoFrame(image=f) for f in frames], options={"profile": profile})
    values = [f.values for f in res["state"]]
    assert values == [{"score": 500.0, "health": 80.0, "health_ratio": 0.8}]


def test_default_profile_costs_nothing() -> None:
    frames = [VideoFrame(image=hud_frame(1, 2)) for _ in range(10)]
    res = run_stage("hud_ocr", frames, step_s=0.05)
    assert res["state"] == []
    # nothing to say, but it says it keeps up: a heartbeat for every frame
    assert [e.t_media for e in res.heartbeats["state"]] == pytest.approx([i * 0.05 for i in range(10)])
    stage = res.stage
    assert isinstance(stage, HudOcrStage)
    assert stage._rec is None and stage._full is None  # no model was even loaded


def test_params_are_validated() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"interval": 1}, HudOcrParams)
    with pytest.raises(msgspec.ValidationError, match="threads"):
        msgspec.convert({"threads": 0}, HudOcrParams)
    with pytest.raises(msgspec.ValidationError, match="no OCR model file"):
        msgspec.convert({"rec_model": "/nonexistent/rec.onnx"}, HudOcrParams)


class _Capture:
    def __init__(self) -> None:
        from copilot.links import DropCounter

        self.envelopes: list[Any] = []
        self.drops = DropCounter()

    async def send(self, env: Any) -> bool:
        self.envelopes.append(env)
        return True


def test_keywords_are_spotted_off_the_event_loop(tmp_path: Path) -> None:
    profile = write_profile(tmp_path, 'name: kw\nkeywords: {"GAME OVER": critical, "EXTRA LIFE": high}\n')
    plain = hud_frame(100, 100)
    over = hud_frame(100, 100, banner="GAME OVER")

    async def main() -> list[Any]:
        out = _Capture()
        ctx = StageContext(name="hud_ocr", clock=VirtualClock(), outputs={"cues": [out]},  # type: ignore[dict-item]
                           options={"profile": profile})
        stage = HudOcrStage(ctx, HudOcrParams(keyword_interval_s=1.0))
        await stage.start()
        try:
            script = [(0.0, plain), (0.5, plain), (1.5, over), (2.0, over), (3.0, over), (4.0, plain)]
            for seq, (t_frame, img) in enumerate(script, 1):
                env = make_envelope(VideoFrame(image=img), t_media=t_frame, seq=seq)
                await stage.process(env)  # returns at once: the read runs in the background
                if stage._kw_task is not None:
                    await stage._kw_task  # let the read finish, to make the test deterministic
            await stage.flush()
        finally:
            await stage.close()
            stage.shutdown_executor()
        assert stage.keyword_reads == 4  # at 0.0, 1.5, 3.0, 4.0 (0.5 and 2.0 were too soon)
        return out.envelopes

    envs = asyncio.run(main())
    assert len(envs) == 1  # "GAME OVER" seen at 1.5 and 3.0: reported once, when it appeared
    kw = envs[0].payload
    assert isinstance(kw, Cue) and kw.kind == "keyword" and kw.evidence["matched"] == "GAME OVER"
    assert kw.priority == "critical" and kw.late and kw.t == 1.5
    assert envs[0].t_media == 1.5
