"""The session timeline's storage: one SQLite database per session directory.

``<DIR>/timeline.sqlite`` holds everything a run saw and said, as **facts** with a media time and a
plain-English ``text`` that a person and a text search can both read.  The timeline stage
(:mod:`stages.timeline`) writes it during a run; ``gamecopilot ask`` reads it through
:class:`TimelineReader` and :mod:`stages.timeline_search`.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``PRAGMA application_id`` =
:data:`APPLICATION_ID`; the ``session`` table repeats both as ``format`` and ``schema``)::

    session(key TEXT PRIMARY KEY, value TEXT)        -- format, schema, created, pipeline, profile, ...
    facts(id INTEGER PRIMARY KEY, t REAL, t_end REAL, kind TEXT, priority TEXT, text TEXT,
          data TEXT /* JSON object */, keyframe TEXT /* path relative to DIR, or NULL */)
    facts_fts                                          -- FTS5 over facts.text (external content,
                                                       -- kept in step by triggers; porter stemming)
    state(t REAL, key TEXT, value REAL, fact INTEGER)  -- the game-state time series, one row per
                                                       -- value read or changed (fact: its change fact)
    links(cause INTEGER, effect INTEGER, kind TEXT, fact INTEGER)
                                                       -- an event fact (cause) followed by a state
                                                       -- change fact (effect); fact: the link's own fact

Fact kinds (:data:`FACT_KINDS`): ``event`` (the trigger's events), ``state`` (a game-state value read
or changed), ``ocr`` (text read on screen), ``transcript`` (speech), ``advice`` (the reasoner's final
advice), ``link`` (a cause and its effect, e.g. a critical event and the lives counter going down),
``entities`` (what concept segmentation found on a keyframe: labels, boxes, scores, mask areas).
``t``/``t_end`` are media seconds; a fact covers ``[t, t_end]`` (``t_end == t`` for a moment).

Durability: the database is in WAL mode with ``synchronous=NORMAL``.  :class:`TimelineWriter` keeps
the rows it is given in memory and commits them in small batches (``batch_rows`` rows or
``batch_s`` of wall time, whichever comes first, and at :meth:`~TimelineWriter.close`), so a reader
sees a live run's facts within about half a second and a writer killed outright (SIGKILL) loses only
the batch it had not committed: a committed transaction is in the WAL file, which the operating
system keeps whatever happens to the process.  (A power cut can lose the last commits: NORMAL does
not sync the WAL at each commit.)  Fact ids are given by the writer, so a link can name a fact that
is still in the same uncommitted batch.

The semantic search's embeddings are cached beside the database, in ``timeline.embeddings.sqlite``
(:mod:`stages.timeline_search`), so a reader never writes to a timeline a run may still be writing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from copilot.errors import UsageError
from copilot.messages import PRIORITY_RANK

DB_NAME = "timeline.sqlite"
KEYFRAMES_DIR = "keyframes"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x47435446  # "GCTF": a gamecopilot timeline file
FORMAT = "gamecopilot-timeline"
FACT_KINDS: tuple[str, ...] = ("event", "state", "ocr", "transcript", "advice", "link", "entities")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS session(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS facts(
    id INTEGER PRIMARY KEY,
    t REAL NOT NULL,
    t_end REAL NOT NULL,
    kind TEXT NOT NULL,
    priority TEXT NOT NULL DEFAULT 'normal',
    text TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{{}}',
    keyframe TEXT
);
CREATE INDEX IF NOT EXISTS facts_t ON facts(t);
CREATE INDEX IF NOT EXISTS facts_kind_t ON facts(kind, t);
CREATE VIRTUAL TABLE IF NOT EXISTS facts_fts USING fts5(
    text, content='facts', content_rowid='id', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS facts_ai AFTER INSERT ON facts BEGIN
    INSERT INTO facts_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS facts_ad AFTER DELETE ON facts BEGIN
    INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS facts_au AFTER UPDATE OF text ON facts BEGIN
    INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO facts_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TABLE IF NOT EXISTS state(t REAL NOT NULL, key TEXT NOT NULL, value REAL NOT NULL, fact INTEGER);
CREATE INDEX IF NOT EXISTS state_key_t ON state(key, t);
CREATE TABLE IF NOT EXISTS links(cause INTEGER NOT NULL, effect INTEGER NOT NULL, kind TEXT NOT NULL, fact INTEGER);
CREATE INDEX IF NOT EXISTS links_cause ON links(cause);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass(frozen=True)
class Fact:
    """One row of the timeline.  ``keyframe``: the JPEG's absolute path (or None); ``score``: set by a
    search (:func:`stages.timeline_search.search`), 0 otherwise."""

    id: int
    t: float
    t_end: float
    kind: str
    priority: str
    text: str
    keyframe: Path | None = None
    data: dict[str, Any] = field(default_factory=dict, compare=False)
    score: float = 0.0


@dataclass(frozen=True)
class StateRow:
    t: float
    key: str
    value: float
    fact: int | None = None


@dataclass(frozen=True)
class Link:
    cause: int
    effect: int
    kind: str
    fact: int | None = None


def timeline_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / DB_NAME


def keyframe_name(t: float, kind: str) -> str:
    """``<MMmSS.sss>_<kind>.jpg`` (minutes may pass 99 in a long session); the kind keeps only
    letters, digits, ``_``, ``-`` and ``+``."""
    m, s = divmod(max(0.0, t), 60)
    s = round(s, 3)
    if s >= 60:  # 59.9996 rounds up to the next minute
        m, s = m + 1, 0.0
    safe = "".join(c if c.isalnum() or c in "_-+" else "_" for c in kind)[:48] or "event"
    return f"{int(m):02d}m{s:06.3f}_{safe}.jpg"


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    """A UsageError (one line naming ``path``) unless ``conn`` is a timeline of this schema version."""
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{path}: not a timeline database ({_first(exc)})") from None
    if app != APPLICATION_ID:
        raise UsageError(f"{path}: not a gamecopilot timeline database")
    if version > SCHEMA_VERSION:
        raise UsageError(f"{path}: timeline schema version {version} is newer than this gamecopilot reads "
                         f"({SCHEMA_VERSION}); update gamecopilot")
    if version < SCHEMA_VERSION:
        raise UsageError(f"{path}: timeline schema version {version} is older than this gamecopilot reads "
                         f"({SCHEMA_VERSION}); it cannot be read by this version")


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _finite(x: float, what: str) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, not {x!r}")
    return v


def _plain(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (strict JSON has no NaN) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# -- writing ------------------------------------------------------------------------------------
class TimelineWriter:
    """Creates (or reopens, after a restart of the run) ``<directory>/timeline.sqlite`` and writes it
    in small committed batches.

    ``add_*`` only queue rows in memory (quick, safe to call on an event loop) and return at once;
    :meth:`flush` commits what is queued in one transaction (blocking I/O: call it off the event loop),
    :meth:`due` says whether a batch is ready (``batch_rows`` queued, or the oldest queued row waited
    ``batch_s``).  ``add_*`` may be called from one thread while :meth:`flush` runs on another.  At most
    ``max_pending`` rows wait; past that the oldest are dropped and counted in :attr:`dropped`.
    A flush that fails raises (``sqlite3.Error`` or ``OSError``) and its batch is lost (counted in
    :attr:`lost`): the caller decides whether that ends anything.
    """

    def __init__(self, directory: str | os.PathLike[str], *, batch_rows: int = 64, batch_s: float = 0.5,
                 max_pending: int = 20_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.batch_rows = max(1, batch_rows)
        self.batch_s = batch_s
        self.max_pending = max(self.batch_rows, max_pending)
        self._clock = clock
        self._lock = threading.Lock()
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._first_pending: float | None = None
        self.committed = 0  # rows committed (facts, states, links, updates)
        self.dropped = 0  # rows dropped because too many waited
        self.lost = 0  # rows of batches whose commit failed
        self.batches = 0
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"{self.directory}: exists and is not a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"{self.path}: cannot open the timeline ({_first(exc)})") from None
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise
        self._next_id = (self._conn.execute("SELECT max(id) FROM facts").fetchone()[0] or 0) + 1

    def _setup(self) -> None:
        conn = self._conn
        try:
            fresh = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 0
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path}: not a timeline database ({_first(exc)})") from None
        if not fresh:
            _check_version(conn, self.path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if fresh:
                conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                self._put_session({"format": FORMAT, "schema": str(SCHEMA_VERSION),
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except sqlite3.Error as exc:
            raise UsageError(f"{self.path}: cannot write the timeline ({_first(exc)})") from None

    def _put_session(self, values: Mapping[str, Any]) -> None:
        self._conn.execute("BEGIN")
        self._conn.executemany("INSERT OR REPLACE INTO session(key, value) VALUES (?, ?)",
                               [(str(k), str(v)) for k, v in values.items()])
        self._conn.execute("COMMIT")

    # -- queueing (no I/O) ----------------------------------------------------------------------
    def _queue(self, op: str, row: tuple[Any, ...]) -> None:
        with self._lock:
            if len(self._ops) >= self.max_pending:
                del self._ops[0]
                self.dropped += 1
            self._ops.append((op, row))
            if self._first_pending is None:
                self._first_pending = self._clock()

    def add_fact(self, t: float, kind: str, text: str, *, t_end: float | None = None, priority: str = "normal",
                 data: Mapping[str, Any] | None = None, keyframe: str | None = None) -> int:
        """Queue a fact; its id (usable at once, e.g. in :meth:`add_link`)."""
        if kind not in FACT_KINDS:
            raise ValueError(f"unknown fact kind {kind!r} ({', '.join(FACT_KINDS)})")
        if priority not in PRIORITY_RANK:
            raise ValueError(f"unknown priority {priority!r}")
        t = _finite(t, "t")
        end = t if t_end is None else max(t, _finite(t_end, "t_end"))
        blob = json.dumps(_plain(dict(data)), default=str, allow_nan=False) if data else "{}"
        with self._lock:
            fid = self._next_id
            self._next_id += 1
        self._queue("fact", (fid, t, end, kind, priority, text, blob, keyframe))
        return fid

    def add_state(self, t: float, key: str, value: float, *, fact: int | None = None) -> None:
        self._queue("state", (_finite(t, "t"), key, _finite(value, "value"), fact))

    def add_link(self, cause: int, effect: int, kind: str, *, fact: int | None = None) -> None:
        self._queue("link", (cause, effect, kind, fact))

    def set_keyframe(self, fact: int, keyframe: str | None) -> None:
        """Point fact ``fact`` at a keyframe (a path relative to the directory) written after it."""
        self._queue("keyframe", (keyframe, fact))

    def set_session(self, values: Mapping[str, Any]) -> None:
        """Queue ``session`` rows (key -> value, stored as text)."""
        for k, v in values.items():
            self._queue("session", (str(k), str(v)))

    @property
    def pending(self) -> int:
        return len(self._ops)

    def due(self) -> bool:
        with self._lock:
            if not self._ops:
                return False
            first = self._first_pending
            return len(self._ops) >= self.batch_rows or (first is not None and self._clock() - first >= self.batch_s)

    # -- committing (blocking) ------------------------------------------------------------------
    _SQL: ClassVar[dict[str, str]] = {
        "fact": "INSERT INTO facts(id, t, t_end, kind, priority, text, data, keyframe) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        "state": "INSERT INTO state(t, key, value, fact) VALUES (?, ?, ?, ?)",
        "link": "INSERT INTO links(cause, effect, kind, fact) VALUES (?, ?, ?, ?)",
        "keyframe": "UPDATE facts SET keyframe = ? WHERE id = ?",
        "session": "INSERT OR REPLACE INTO session(key, value) VALUES (?, ?)",
    }

    def flush(self) -> int:
        """Commit everything queued in one transaction; the number of rows committed."""
        with self._lock:
            ops, self._ops = self._ops, []
            self._first_pending = None
        if not ops:
            return 0
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # consecutive ops of one kind go in one executemany, in order
                i = 0
                while i < len(ops):
                    j = i
                    while j < len(ops) and ops[j][0] == ops[i][0]:
                        j += 1
                    conn.executemany(self._SQL[ops[i][0]], [row for _, row in ops[i:j]])
                    i = j
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            self.lost += len(ops)
            raise
        self.committed += len(ops)
        self.batches += 1
        return len(ops)

    def close(self) -> None:
        """Commit what is queued (a failure still closes, then raises) and close the database."""
        try:
            self.flush()
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()

    def __enter__(self) -> TimelineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ------------------------------------------------------------------------------------
_FACT_COLS = "id, t, t_end, kind, priority, text, data, keyframe"


def _where(*conditions: tuple[str, Any]) -> tuple[list[str], list[Any]]:
    """The SQL conditions (``"t <= ?"``, value) whose value is given, and their arguments."""
    given = [(sql, value) for sql, value in conditions if value is not None]
    return [sql for sql, _ in given], [value for _, value in given]


def _overlapping(start: float | None, end: float | None) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their arguments) for facts overlapping ``[start, end]``, either end open when None."""
    return _where(("t <= ?", end), ("t_end >= ?", start))


class TimelineReader:
    """A session directory's timeline, read-only (a run may still be writing it).

    Raises :class:`~copilot.errors.UsageError`, one line naming the path, for a path that is not a
    session directory (or its ``timeline.sqlite``), a file that is not a timeline, or one of another
    schema version.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        where = Path(directory)
        if where.is_file() and where.name == DB_NAME:
            where = where.parent
        self.directory = where
        self.path = where / DB_NAME
        if not where.is_dir():
            raise UsageError(f"{directory}: no such session directory")
        if not self.path.is_file():
            raise UsageError(f"{directory}: not a session directory (no {DB_NAME} in it)")
        try:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise UsageError(f"{self.path}: cannot open the timeline ({_first(exc)})") from None
        try:
            _check_version(self._conn, self.path)
            self._conn.execute("SELECT count(*) FROM facts").fetchone()
        except sqlite3.Error as exc:
            self._conn.close()
            raise UsageError(f"{self.path}: cannot read the timeline ({_first(exc)})") from None
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> TimelineReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The read-only connection (for :mod:`stages.timeline_search`'s FTS queries)."""
        return self._conn

    def _fact(self, row: tuple[Any, ...]) -> Fact:
        fid, t, t_end, kind, priority, text, data, keyframe = row
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {}
        return Fact(id=fid, t=t, t_end=t_end, kind=kind, priority=priority, text=text,
                    keyframe=self.directory / keyframe if keyframe else None,
                    data=parsed if isinstance(parsed, dict) else {})

    def session(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM session").fetchall())

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM facts").fetchone()[0])

    def facts(self, start: float | None = None, end: float | None = None, *,
              kinds: Iterable[str] | None = None) -> list[Fact]:
        """Facts that overlap ``[start, end]`` (either end open when None), in order of time."""
        where, args = _overlapping(start, end)
        if kinds is not None:
            ks = list(kinds)
            where.append(f"kind IN ({','.join('?' * len(ks))})")
            args.extend(ks)
        sql = f"SELECT {_FACT_COLS} FROM facts" + (" WHERE " + " AND ".join(where) if where else "")
        return [self._fact(r) for r in self._conn.execute(sql + " ORDER BY t, id", args)]

    def all_facts(self) -> list[Fact]:
        return self.facts()

    def by_ids(self, ids: Iterable[int]) -> dict[int, Fact]:
        out: dict[int, Fact] = {}
        wanted = list(dict.fromkeys(ids))
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            rows = self._conn.execute(f"SELECT {_FACT_COLS} FROM facts WHERE id IN ({','.join('?' * len(chunk))})",
                                      chunk)
            out.update((r[0], self._fact(r)) for r in rows)
        return out

    def texts(self, start: float | None = None, end: float | None = None) -> Iterator[tuple[int, str]]:
        """``(id, text)`` of the facts overlapping the window (all when both are None)."""
        where, args = _overlapping(start, end)
        sql = "SELECT id, text FROM facts" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        yield from self._conn.execute(sql, args)

    def duration(self) -> float:
        """The session's length so far: the latest media time any fact reaches (0 when empty)."""
        row = self._conn.execute("SELECT max(t_end) FROM facts").fetchone()
        return float(row[0] or 0.0)

    newest_t = duration

    def states(self, key: str | None = None, start: float | None = None, end: float | None = None) -> list[StateRow]:
        where, args = _where(("key = ?", key), ("t >= ?", start), ("t <= ?", end))
        sql = "SELECT t, key, value, fact FROM state" + (" WHERE " + " AND ".join(where) if where else "")
        return [StateRow(*r) for r in self._conn.execute(sql + " ORDER BY t, rowid", args)]

    def links(self) -> list[Link]:
        return [Link(*r) for r in self._conn.execute("SELECT cause, effect, kind, fact FROM links ORDER BY rowid")]

    def keyframes(self) -> list[tuple[float, Path]]:
        """``(t, absolute path)`` of every fact's keyframe, in order of time."""
        rows = self._conn.execute("SELECT t, keyframe FROM facts WHERE keyframe IS NOT NULL ORDER BY t, id")
        return [(t, self.directory / rel) for t, rel in rows]
