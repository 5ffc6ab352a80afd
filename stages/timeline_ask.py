"""``gamecopilot ask SESSION_DIR ["question"]``: question a session's timeline.

The facts come from :func:`stages.timeline_search.search` over the directory's SQLite timeline
(written by ``--session DIR`` on ``replay``, ``live`` and ``demo``; readable while that run still
writes it, so a live session can be asked about what has been committed so far).  Who answers:

* a reasoner, when one is configured as elsewhere (``--reasoner openai --llm-url URL``, or
  ``--llm-model`` for the transformers backend; ``--reasoner auto`` takes whichever is given):
  the model is shown the question, the retrieved facts with their times and, if it takes images,
  the keyframes of the best of them, and answers in words;
* nobody, otherwise (or when the model cannot be reached): the answer is the retrieved facts
  themselves, and says so.  Rules give advice about events, not answers about the past, so the
  rules backend never answers a question.

Without a question it reads questions line by line (a REPL on a terminal), opening the timeline
afresh for each, so every answer sees what a running session has committed by then.
``--json`` prints ``{"question", "answer", "answered_by", "facts": [{"t", "kind", "text", "score"}]}``
per question, facts sorted by score.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from copilot.advice import AdviceRequest, BackendError, BackendOptions, parse_advice
from copilot.args import OneLineParser
from copilot.errors import UsageError, first_line
from copilot.timefmt import format_time
from stages.timeline_db import Fact, TimelineReader
from stages.timeline_search import METHODS, SearchResult, search

SYSTEM = (
    "You answer a player's question about their own game session, from timeline facts recorded while "
    "they played (each fact starts with its time MM:SS). Use only those facts. Answer with one JSON object "
    "with three short string fields: game_state (what the facts say the game was like then), analysis "
    "(which facts answer the question, with their times) and advice (the answer to the question in one "
    "or two sentences, naming the times MM:SS of the facts it rests on)."
)
FACTS_IN_PROMPT = 6  # the best facts the model is shown (a small model copies what it is shown: keep it short)
IMAGES_IN_PROMPT = 2  # keyframes of the best facts that have one (for a model that takes images)
NO_REASONER = "timeline facts (no reasoner)"
NO_REASONER_HINT = "no reasoner given; --llm-url URL (or --llm-model) for an answer in words"


@dataclass
class Answer:
    question: str
    answer: str
    answered_by: str
    result: SearchResult

    def record(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "answered_by": self.answered_by,
                "facts": [{"t": round(f.t, 3), "kind": f.kind, "text": f.text, "score": round(f.score, 4)}
                          for f in self.result.facts]}


_STAMP = re.compile(r"^\d+:\d\d")
_SCORE = re.compile(r" \(score [0-9.]+\)")  # the trigger's significance: noise to a model answering a person


def fact_line(f: Fact) -> str:
    """A fact as the prompt and the facts-only answer show it: its text, which the timeline starts with
    its time (MM:SS), else the time put in front."""
    text = f.text.strip()
    return text if _STAMP.match(text) else f"{format_time(f.t)} {text}"


def facts_answer(result: SearchResult, why: str = "") -> str:
    """The answer when no model answers: the best facts themselves, said to be that."""
    if not result.facts:
        where = (f" between {format_time(result.anchor[0])} and {format_time(result.anchor[1])}"
                 if result.anchor else "")
        return f"The timeline holds nothing{where} that matches."
    lead = "From the timeline" + (f" ({why})" if why else "") + ":"
    return lead + " " + " | ".join(fact_line(f) for f in result.facts[:3])


def question_request(question: str, result: SearchResult, *, takes_images: bool, max_tokens: int) -> AdviceRequest:
    """The request a model answers: the question, the facts with their times, keyframes when it sees."""
    facts = result.facts[:FACTS_IN_PROMPT]
    lines = [f"The player asks: {question}"]
    if result.anchor:
        lines.append(f"(The question is about {format_time(result.anchor[0])}-{format_time(result.anchor[1])}.)")
    lines.append("Timeline facts, best match first:" if facts else "The timeline holds no fact that matches.")
    lines += [f"- {_SCORE.sub('', fact_line(f))}" for f in facts]
    images: list[np.ndarray] = []
    times: list[float] = []
    if takes_images:
        for f in facts:
            if f.keyframe is not None and len(images) < IMAGES_IN_PROMPT:
                img = _load_jpeg(f.keyframe)
                if img is not None:
                    images.append(img)
                    times.append(f.t)
        if images:
            lines.append(f"Images: the keyframes at {', '.join(format_time(t) for t in times)}.")
    lines.append('Reply with JSON only: {"game_state": "...", "analysis": "...", "advice": "At 00:00 ..."}')
    return AdviceRequest(system=SYSTEM, prompt="\n".join(lines), images=images, image_times=times,
                         question=question, context="\n".join(fact_line(f) for f in facts),
                         max_tokens=max_tokens, temperature=0.0)


def _load_jpeg(path: Path) -> np.ndarray | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (ImportError, OSError):
        return None


class Asker:
    """Answers questions about one session directory, with a model when one is configured."""

    def __init__(self, session: str, *, backend_kind: str, options: BackendOptions, window_s: float, k: int,
                 method: str, max_tokens: int = 320) -> None:
        self.session = session
        self.backend_kind = backend_kind
        self.options = options
        self.window_s, self.k, self.method, self.max_tokens = window_s, k, method, max_tokens
        self.backend: Any = None
        self.failed = ""  # why the model is not answering (after a failure)
        with TimelineReader(session):  # not a timeline: one line now, before any question
            pass

    async def start(self) -> None:
        if self.backend_kind == "none":
            return
        from stages.reasoner import backend_class

        self.backend = backend_class(self.backend_kind)(self.options)
        try:
            await self.backend.start()
        except BackendError as exc:
            self.failed = f"the {self.backend_kind} reasoner could not be reached: {first_line(exc)}"
            print(f"gamecopilot ask: {self.failed}; answering with the timeline's facts", file=sys.stderr)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    async def ask(self, question: str) -> Answer:
        with TimelineReader(self.session) as reader:  # afresh: what a running session committed by now
            result = search(reader, question, window_s=self.window_s, k=self.k, method=self.method)
        if self.backend is None:
            return Answer(question, facts_answer(result, NO_REASONER_HINT), NO_REASONER, result)
        if self.failed:
            return Answer(question, facts_answer(result, self.failed), f"timeline facts ({self.failed})", result)
        request = question_request(question, result, takes_images=bool(self.backend.takes_images),
                                   max_tokens=self.max_tokens)
        try:
            text = "".join([piece async for piece in self.backend.stream(request)])
        except BackendError as exc:
            why = f"the {self.backend_kind} reasoner failed: {first_line(exc)}"
            return Answer(question, facts_answer(result, why), f"timeline facts ({why})", result)
        advice = parse_advice(text)
        by = f"{self.backend.name}:{self.backend.model}"
        if advice is None:
            why = f"{by} gave no valid answer"
            return Answer(question, facts_answer(result, why), f"timeline facts ({why})", result)
        # the advice field is the answer; the analysis joins it unless it is the prompt's placeholder copied
        parts = (advice.get("advice", "").strip(), advice.get("analysis", "").strip())
        answer = " ".join(p for p in parts if p.strip(". "))
        return Answer(question, answer, by, result)


def _print(ans: Answer, as_json: bool) -> None:
    if as_json:
        print(json.dumps(ans.record()), flush=True)
        return
    print(ans.answer)
    print(f"  (answered by {ans.answered_by}; {len(ans.result.facts)} facts, ranked by {ans.result.method}"
          + (f"; {ans.result.note}" if ans.result.note else "") + ")", flush=True)
    for f in ans.result.facts[:5]:
        print(f"  {f.score:6.3f}  {fact_line(f)}")


async def _run(asker: Asker, questions: Sequence[str] | None, as_json: bool) -> int:
    await asker.start()
    try:
        if questions is not None:
            for q in questions:
                _print(await asker.ask(q), as_json)
            return 0
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"Questions about {asker.session} (empty line or Ctrl-D ends): '@03:12 why did I die?'",
                  file=sys.stderr)
        loop = asyncio.get_running_loop()
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or (interactive and not line.strip()):
                return 0
            if line.strip():
                try:
                    _print(await asker.ask(line.strip()), as_json)
                except UsageError as exc:  # a bad time in one question does not end the session
                    print(f"gamecopilot ask: {exc}", file=sys.stderr)
    finally:
        await asker.close()


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="gamecopilot ask", description="Question a session's timeline (--session DIR of "
                      "replay, live or demo): '@03:12 why did I die?', 'when did I lose a life?'.")
    p.add_argument("session", metavar="SESSION_DIR", help="the directory given to --session")
    p.add_argument("question", nargs="?", help="the question (none: read questions line by line)")
    p.add_argument("--json", action="store_true", help="print {question, answer, answered_by, facts} as JSON")
    p.add_argument("--window", type=float, default=15.0, metavar="S",
                   help="a time-anchored question looks this many seconds either side (default 15)")
    p.add_argument("-k", type=int, default=10, help="facts to retrieve (default 10)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="ranking: auto (semantic and keyword merged when all-MiniLM-L6-v2 is installed, else keyword)")
    p.add_argument("--reasoner", choices=["auto", "openai", "transformers", "none"], default="auto",
                   help="who answers: auto (a model given by --llm-url or --llm-model, else the facts themselves)")
    p.add_argument("--llm-url", metavar="URL", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--llm-model", metavar="M", help="the served model id, or a local checkpoint for transformers")
    return p


def backend_choice(reasoner: str, url: str | None, model: str | None) -> str:
    """Which backend answers (``none``: the facts themselves)."""
    if reasoner == "auto":
        return "openai" if url else "transformers" if model else "none"
    if reasoner == "openai" and not url:
        raise UsageError("--reasoner openai: give the server with --llm-url URL")
    if reasoner == "transformers" and not model:
        raise UsageError("--reasoner transformers: give the checkpoint with --llm-model PATH")
    return reasoner


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.window <= 0 or args.k < 1:
        raise UsageError("--window must be above 0 and -k at least 1")
    if args.question is not None and not args.question.strip():
        raise UsageError("the question is empty")
    kind = backend_choice(args.reasoner, args.llm_url, args.llm_model)
    asker = Asker(args.session, backend_kind=kind, options=BackendOptions(url=args.llm_url, model=args.llm_model),
                  window_s=args.window, k=args.k, method=args.method)
    return asyncio.run(_run(asker, None if args.question is None else [args.question], args.json))
