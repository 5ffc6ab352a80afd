"""Profile keywords found in text: on-screen OCR lines (HUD OCR) and speech (ASR transcripts).

One matcher serves both, so a profile's ``keywords`` mean the same wherever the words come
from: "GAME OVER" on screen and "game over" said by an announcer are the same keyword.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping


def _norm_words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9A-Z]+", " ", text.upper()).split())


def match_keywords(lines: list[str], keywords: Mapping[str, str], similarity: float = 0.85) -> list[str]:
    """Keywords found in ``lines`` (OCR lines, a transcript): whole words exactly, or (5+ letters) nearly.

    Near matches (``difflib`` ratio >= ``similarity`` against a same-length stretch of the
    text with spaces removed) forgive one misread (or misheard) letter in "GAME OVER" without letting
    "WIN" match inside "WINDOW".
    """
    hay = _norm_words(" ".join(lines))
    spaced = f" {hay} "
    packed = hay.replace(" ", "")
    found = []
    for kw in keywords:
        k = _norm_words(kw)
        if not k:
            continue
        if f" {k} " in spaced:
            found.append(kw)
            continue
        kp = k.replace(" ", "")
        if len(kp) >= 5 and len(packed) >= len(kp):
            n = len(kp)
            sm = difflib.SequenceMatcher(autojunk=False)
            sm.set_seq2(kp)
            for i in range(len(packed) - n + 1):
                sm.set_seq1(packed[i : i + n])
                if sm.ratio() >= similarity:
                    found.append(kw)
                    break
    return found
