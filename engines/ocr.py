"""PP-OCR text recognition and detection on the ONNX models that ship inside RapidOCR.

Why not call ``rapidocr.RapidOCR`` directly: its pipeline looks models up by language and
version and downloads whatever file is not where it expects; it also builds its own ONNX
Runtime sessions with default threading.  Here the bundled model files are opened by path
(no download can ever happen), sessions come from :mod:`engines.onnx_session`, and the two
jobs the copilot has are separate:

* :class:`TextRecognizer`: recognition only, on crops whose place is known (the HUD
  regions of a game profile).  A crop of a score costs 15-45 ms on one core.
* :class:`TextDetector` + recogniser (:class:`FullFrameOcr`): find text anywhere, for
  keyword spotting at a low rate.  A 720p frame costs most of a second on a busy CPU.

RapidOCR's own detector pre/post-processing (DB binarisation, box unclipping, rotated
crops) is reused as a library; recognition pre-processing and CTC decoding are done here
in numpy, a few lines, so the hot path does not depend on RapidOCR's internals.
Images are RGB ``uint8`` (the pipeline's frames); PP-OCR models were trained on BGR, so
the channels are swapped here, once.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from copilot.errors import UsageError
from engines.onnx_session import SessionConfig, create_session

REC_MODEL = "PP-OCRv6_rec_small.onnx"
DET_MODEL = "PP-OCRv6_det_small.onnx"
REC_HEIGHT = 48


def bundled_model_dir() -> Path:
    """Where the ``rapidocr`` wheel keeps its ONNX models (found without importing it)."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("rapidocr is not installed (pip install 'gameplay-copilot[perception]')")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _model_path(path: str | os.PathLike[str] | None, default_name: str) -> Path:
    p = Path(path) if path else bundled_model_dir() / default_name
    if not p.is_file():
        raise UsageError(f"OCR model not found: {p}")
    return p


def to_bgr(image: np.ndarray, pixel_format: str = "rgb24") -> np.ndarray:
    """A contiguous HxWx3 BGR uint8 view/copy of an RGB, BGRA or gray image."""
    if image.ndim == 2 or pixel_format == "gray" or image.shape[2] == 1:
        g = image if image.ndim == 2 else image[..., 0]
        return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2))
    if pixel_format == "bgra":
        return np.ascontiguousarray(image[..., :3])
    return np.ascontiguousarray(image[..., 2::-1])


@dataclass(frozen=True)
class OcrLine:
    """One recognised line: text, confidence (mean per-character probability), box if detected."""

    text: str
    score: float
    box: tuple[tuple[float, float], ...] = ()


class TextRecognizer:
    """PP-OCR CTC recogniser on BGR crops (any size; each is resized to 48 px high)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        session: SessionConfig | None = None,
        *,
        min_width: int = 96,
        batch_size: int = 8,
    ) -> None:
        self.model_path = _model_path(model_path, REC_MODEL)
        self.session = create_session(self.model_path, session or SessionConfig())
        meta = self.session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise UsageError(f"{self.model_path}: not a PP-OCR recogniser (no 'character' metadata)")
        chars = meta["character"].splitlines()
        n_out = self.session.get_outputs()[0].shape[-1]
        # index 0 is the CTC blank; PP-OCR appends a space class after the dictionary
        self.vocab = np.array(["", *chars, " "] if n_out == len(chars) + 2 else ["", *chars], dtype=object)
        self.input_name = self.session.get_inputs()[0].name
        self.min_width = int(min_width)
        self.batch_size = int(batch_size)

    def _resize(self, img: np.ndarray) -> np.ndarray:
        import cv2

        h, w = img.shape[:2]
        new_w = max(1, math.ceil(REC_HEIGHT * w / max(1, h)))
        interp = cv2.INTER_CUBIC if h < REC_HEIGHT else cv2.INTER_AREA
        return cv2.resize(img, (new_w, REC_HEIGHT), interpolation=interp)

    def __call__(self, crops: list[np.ndarray]) -> list[OcrLine]:
        """Recognise each BGR crop; the result keeps the order of ``crops``."""
        out: list[OcrLine] = [OcrLine("", 0.0)] * len(crops)
        if not crops:
            return out
        resized = [self._resize(c) for c in crops]
        order = np.argsort([r.shape[1] for r in resized])  # similar widths batch together
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            width = max(self.min_width, *(resized[i].shape[1] for i in idx))
            batch = np.zeros((len(idx), 3, REC_HEIGHT, width), np.float32)
            for j, i in enumerate(idx):
                r = resized[i]
                batch[j, :, :, : r.shape[1]] = r.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
            probs = self.session.run(None, {self.input_name: batch})[0]
            for j, i in enumerate(idx):
                out[i] = self._decode(probs[j])
        return out

    def _decode(self, probs: np.ndarray) -> OcrLine:
        """Greedy CTC: best class per step, repeats merged, blanks dropped."""
        best = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        keep = best != 0
        keep[1:] &= best[1:] != best[:-1]
        if not keep.any():
            return OcrLine("", 0.0)
        text = "".join(self.vocab[best[keep]])
        return OcrLine(text, float(conf[keep].mean()))


class TextDetector:
    """PP-OCR DB text detector: quadrilateral boxes of text lines in a BGR image."""

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        session: SessionConfig | None = None,
        *,
        max_side: int = 960,
        box_thresh: float = 0.5,
        unclip_ratio: float = 1.6,
    ) -> None:
        from rapidocr.ch_ppocr_det.utils import DBPostProcess, DetPreProcess

        self.model_path = _model_path(model_path, DET_MODEL)
        self.session = create_session(self.model_path, session or SessionConfig())
        self.input_name = self.session.get_inputs()[0].name
        # "max": shrink so the long side is at most max_side (RapidOCR's default, "min" 736,
        # would blow a 720p frame up to 1308x736 and double the cost)
        self.pre = DetPreProcess(max_side, "max", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        self.post = DBPostProcess(
            thresh=0.3, box_thresh=box_thresh, max_candidates=1000, unclip_ratio=unclip_ratio,
            score_mode="fast", use_dilation=True,
        )

    def __call__(self, img: np.ndarray) -> list[np.ndarray]:
        """Boxes (4x2 float32 corner points, clockwise from top-left), top to bottom, left to right."""
        h, w = img.shape[:2]
        x = self.pre(img)
        if x is None:
            return []
        pred = self.session.run(None, {self.input_name: x})[0]
        boxes, _scores = self.post(pred, (h, w))
        if len(boxes) == 0:
            return []
        out = [np.asarray(b, np.float32) for b in boxes]
        out.sort(key=lambda b: (round(float(b[0][1]) / 10), float(b[0][0])))
        return out


class FullFrameOcr:
    """Detector + recogniser: every line of text in a frame, for keyword spotting."""

    def __init__(
        self,
        *,
        det_model: str | os.PathLike[str] | None = None,
        rec_model: str | os.PathLike[str] | None = None,
        session: SessionConfig | None = None,
        max_side: int = 960,
        min_score: float = 0.5,
    ) -> None:
        self.detector = TextDetector(det_model, session, max_side=max_side)
        self.recognizer = TextRecognizer(rec_model, session)
        self.min_score = min_score

    def __call__(self, img_bgr: np.ndarray) -> list[OcrLine]:
        from rapidocr.utils.process_img import get_rotate_crop_image

        boxes = self.detector(img_bgr)
        if not boxes:
            return []
        crops = [get_rotate_crop_image(img_bgr, b.copy()) for b in boxes]
        lines = self.recognizer(crops)
        out = []
        for box, line in zip(boxes, lines, strict=True):
            if line.text.strip() and line.score >= self.min_score:
                out.append(OcrLine(line.text, line.score, tuple((float(x), float(y)) for x, y in box)))
        return out


def describe() -> dict[str, Any]:
    """Which OCR model files are in use (for ``gamecopilot models``-style listings)."""
    d = bundled_model_dir()
    return {"recognizer": str(d / REC_MODEL), "detector": str(d / DET_MODEL)}
