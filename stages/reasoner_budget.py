"""How much optional context a wake's prompt can carry and still be answered in time.

A model's answer costs roughly ``prompt chars x seconds per prompt char`` before its first token
(the prefill) and then a generation time that hardly depends on the prompt.  On a served 8B model
the prefill of a few hundred characters is tens of milliseconds; on a 135M model on one CPU thread
it is seconds, and HiCo's summary in the prompt made the first token twice as late.  A wake that
waits behind one answer is answered after two, so an answer slower than about half the staleness
limit turns the next close wake's advice stale: dropped, not shown.

:class:`PromptBudget` learns both costs from the answers themselves (exponential averages of the
prefill rate and of the generation time) and gives each new prompt the context (HiCo's newest
lines) that keeps the expected answer within ``budget_s``.  Before the first answer it knows
nothing and allows the full ``max_chars``; a fast backend keeps the full context; a slow one gets
less, down to none, and gets it back when answers speed up.  The core prompt (event, evidence,
game state, recent events) is never cut: it is what the advice is about.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptBudget:
    """Context chars allowed in the next prompt (see the module docstring)."""

    budget_s: float  # the whole answer, from the request to the last token
    max_chars: int  # never more context than this (ReasonerParams.context_chars)
    smoothing: float = 0.5  # weight of the newest answer in the averages
    prefill_s_per_char: float | None = None
    generate_s: float | None = None
    answers: int = 0

    def observe(self, prompt_chars: int, first_s: float, total_s: float) -> None:
        """One answer: ``prompt_chars`` sent, first piece after ``first_s``, last after ``total_s``
        (both from the request)."""
        if prompt_chars <= 0 or first_s < 0.0 or total_s < first_s:
            return
        rate = first_s / prompt_chars  # a fixed per-request overhead counts as prefill: errs short
        gen = total_s - first_s
        self.prefill_s_per_char = self._average(self.prefill_s_per_char, rate)
        self.generate_s = self._average(self.generate_s, gen)
        self.answers += 1

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * new + (1.0 - self.smoothing) * old

    def expected_s(self, prompt_chars: int) -> float | None:
        """The expected answer time for a prompt of ``prompt_chars`` (None before any answer)."""
        if self.prefill_s_per_char is None or self.generate_s is None:
            return None
        return prompt_chars * self.prefill_s_per_char + self.generate_s

    def context_chars(self, core_chars: int) -> int:
        """Context chars that fit beside a core prompt of ``core_chars``: ``max_chars`` until an answer
        has been measured, then what the budget leaves (0 when even the core prompt overruns it)."""
        expected = self.expected_s(core_chars)
        if expected is None or self.prefill_s_per_char is None:
            return self.max_chars
        if self.prefill_s_per_char <= 0.0:
            return self.max_chars
        spare = (self.budget_s - expected) / self.prefill_s_per_char
        return max(0, min(self.max_chars, int(spare)))
