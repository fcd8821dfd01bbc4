"""Token usage and cost: per-response accounting from ``response.done``, a daily budget.

:func:`cost_usd` prices one ``response.done.response.usage`` dict. How tokens are split
(the API's accounting: ``input_tokens = text_tokens + audio_tokens (+ image_tokens)``, and
``cached_tokens`` is the cached part of those, split by ``cached_tokens_details``):

* uncached text input  = ``text_tokens - cached text``   at ``text_in``
* cached text input                                          at ``text_in_cached``
* uncached audio input = ``audio_tokens - cached audio`` at ``audio_in``
* cached audio input                                         at ``audio_in_cached``
* text / audio output                                        at ``text_out`` / ``audio_out``

Robust to partial shapes: without ``cached_tokens_details`` (older beta streams) the cached
count is split in proportion to text and audio; image tokens are priced as text input;
tokens whose kind the usage does not state (a total larger than its details, or no details
at all) are priced as audio, the dearer kind, so a budget is never under-counted.

:class:`UsageLedger` persists every response's counts in SQLite (its own file is
recommended, e.g. ``usage.sqlite3`` next to the history) and sums them per local day.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from daemon.config import ModelPrice
from daemon.history import SqliteDb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenCounts:
    """Tokens of one response by kind; the field names match :class:`ModelPrice`."""

    text_in: int = 0
    text_in_cached: int = 0
    audio_in: int = 0
    audio_in_cached: int = 0
    text_out: int = 0
    audio_out: int = 0

    @property
    def input_tokens(self) -> int:
        return self.text_in + self.text_in_cached + self.audio_in + self.audio_in_cached

    @property
    def output_tokens(self) -> int:
        return self.text_out + self.audio_out

    def cost_usd(self, price: ModelPrice) -> float:
        return (
            self.text_in * price.text_in
            + self.text_in_cached * price.text_in_cached
            + self.audio_in * price.audio_in
            + self.audio_in_cached * price.audio_in_cached
            + self.text_out * price.text_out
            + self.audio_out * price.audio_out
        ) / 1_000_000


def _count(mapping: Any, key: str) -> int:
    """A non-negative token count, or 0 for anything missing or malformed."""
    if not isinstance(mapping, Mapping):
        return 0
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return max(0, int(value))


def token_counts(usage: Mapping[str, Any] | None) -> TokenCounts:
    """Split a ``response.done.response.usage`` dict into priced kinds (see module doc)."""
    if not isinstance(usage, Mapping):
        return TokenCounts()
    details_in = usage.get("input_token_details")
    details_out = usage.get("output_token_details")

    text = _count(details_in, "text_tokens") + _count(details_in, "image_tokens")
    audio = _count(details_in, "audio_tokens")
    # Tokens counted in the total but not in any detail: price them as audio.
    audio += max(0, _count(usage, "input_tokens") - text - audio)

    cached = min(_count(details_in, "cached_tokens"), text + audio)
    cached_details = details_in.get("cached_tokens_details") if isinstance(
        details_in, Mapping
    ) else None
    if isinstance(cached_details, Mapping):
        cached_text = min(_count(cached_details, "text_tokens"), text)
        cached_audio = min(_count(cached_details, "audio_tokens"), audio)
        cached = max(cached, cached_text + cached_audio)
        # A cached total above its details: the rest goes where there is room, text first.
        rest = cached - cached_text - cached_audio
        extra_text = min(rest, text - cached_text)
        cached_text += extra_text
        cached_audio += min(rest - extra_text, audio - cached_audio)
    else:
        cached_text = round(cached * text / (text + audio)) if cached else 0
        cached_audio = cached - cached_text

    out_text = _count(details_out, "text_tokens")
    out_audio = _count(details_out, "audio_tokens")
    out_audio += max(0, _count(usage, "output_tokens") - out_text - out_audio)

    return TokenCounts(
        text_in=text - cached_text,
        text_in_cached=cached_text,
        audio_in=audio - cached_audio,
        audio_in_cached=cached_audio,
        text_out=out_text,
        audio_out=out_audio,
    )


def cost_usd(usage: Mapping[str, Any] | None, price: ModelPrice) -> float:
    """US dollars for one response's usage at ``price`` (per 1M tokens)."""
    return token_counts(usage).cost_usd(price)


@dataclass(frozen=True)
class TurnCost:
    """What one response cost. ``day`` is the local day it was recorded on."""

    turn_id: str
    response_id: str
    model: str
    tokens: TokenCounts
    cost_usd: float
    day: date

    @property
    def input_tokens(self) -> int:
        return self.tokens.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.tokens.output_tokens


@dataclass(frozen=True)
class DayTotals:
    """Sums over one local day. ``turns`` counts distinct turn ids (a turn with a tool call
    has several responses)."""

    day: date
    turns: int = 0
    responses: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


_USAGE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS usage (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            day TEXT NOT NULL,
            recorded_at REAL NOT NULL,
            turn_id TEXT NOT NULL,
            response_id TEXT NOT NULL,
            model TEXT NOT NULL,
            text_in INTEGER NOT NULL,
            text_in_cached INTEGER NOT NULL,
            audio_in INTEGER NOT NULL,
            audio_in_cached INTEGER NOT NULL,
            text_out INTEGER NOT NULL,
            audio_out INTEGER NOT NULL,
            cost_usd REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS usage_day ON usage (day)",
        "CREATE UNIQUE INDEX IF NOT EXISTS usage_response ON usage (response_id) "
        "WHERE response_id != ''",
    ),
)


class UsageLedger:
    """Per-response token counts and cost, summed per local day, persisted in SQLite.

    ``clock`` returns the local wall-clock time (default ``datetime.now``); the day rolls
    over at local midnight. A response id seen before is not counted twice. Database
    trouble is logged, never raised (see :mod:`daemon.history`); the in-memory total for
    the current day keeps the budget working even then.
    """

    def __init__(
        self,
        path: Path,
        prices: Mapping[str, ModelPrice],
        daily_budget_usd: float,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.path = path
        self.prices = dict(prices)
        self.daily_budget_usd = daily_budget_usd
        self._clock = clock
        self._warned: set[str] = set()
        self._db = SqliteDb(path, _USAGE_MIGRATIONS, "usage")
        # Fallback when a write fails: today's totals as far as this process knows.
        self._unsaved: dict[date, DayTotals] = {}

    def _today(self) -> date:
        return self._clock().date()

    def price_for(self, model: str) -> ModelPrice | None:
        price = self.prices.get(model)
        if price is None and model not in self._warned:
            self._warned.add(model)
            logger.warning(
                "no price for model %r: its usage is counted at $0 and the daily budget "
                "cannot see it; add it under usage.prices in the configuration",
                model,
            )
        return price

    def record(
        self, turn_id: str, response_id: str, model: str, usage: Mapping[str, Any] | None
    ) -> TurnCost:
        """Count one ``response.done`` and persist it; returns what it cost."""
        tokens = token_counts(usage)
        price = self.price_for(model)
        cost = tokens.cost_usd(price) if price is not None else 0.0
        day = self._today()
        turn = TurnCost(turn_id, response_id, model, tokens, cost, day)

        def op(conn: sqlite3.Connection) -> bool:
            with conn:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO usage (day, recorded_at, turn_id, response_id, "
                    "model, text_in, text_in_cached, audio_in, audio_in_cached, text_out, "
                    "audio_out, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        day.isoformat(), time.time(), turn_id, response_id, model,
                        tokens.text_in, tokens.text_in_cached, tokens.audio_in,
                        tokens.audio_in_cached, tokens.text_out, tokens.audio_out, cost,
                    ),
                )
                if cur.rowcount == 0:
                    logger.info("usage of response %s already recorded; not counted twice",
                                response_id)
                return True

        if not self._db.run("recording usage", op, False):
            prev = self._unsaved.get(day, DayTotals(day))
            self._unsaved = {
                day: DayTotals(
                    day,
                    turns=prev.turns + 1,
                    responses=prev.responses + 1,
                    input_tokens=prev.input_tokens + tokens.input_tokens,
                    output_tokens=prev.output_tokens + tokens.output_tokens,
                    cost_usd=prev.cost_usd + cost,
                )
            }
        return turn

    def today(self) -> DayTotals:
        """Totals for the current local day."""
        return self.totals(self._today())

    def totals(self, day: date) -> DayTotals:
        def op(conn: sqlite3.Connection) -> DayTotals:
            row = conn.execute(
                "SELECT COUNT(DISTINCT turn_id), COUNT(*), "
                "COALESCE(SUM(text_in + text_in_cached + audio_in + audio_in_cached), 0), "
                "COALESCE(SUM(text_out + audio_out), 0), COALESCE(SUM(cost_usd), 0.0) "
                "FROM usage WHERE day = ?",
                (day.isoformat(),),
            ).fetchone()
            return DayTotals(day, int(row[0]), int(row[1]), int(row[2]), int(row[3]),
                             float(row[4]))

        saved = self._db.run("reading usage totals", op, DayTotals(day))
        extra = self._unsaved.get(day)
        if extra is None:
            return saved
        return DayTotals(
            day,
            saved.turns + extra.turns,
            saved.responses + extra.responses,
            saved.input_tokens + extra.input_tokens,
            saved.output_tokens + extra.output_tokens,
            saved.cost_usd + extra.cost_usd,
        )

    def reconfigure(self, prices: Mapping[str, ModelPrice], daily_budget_usd: float) -> None:
        """New prices and budget (``systemctl reload``); recorded costs stay as they were."""
        self.prices = dict(prices)
        self.daily_budget_usd = daily_budget_usd
        self._warned.clear()

    def budget_exhausted(self) -> bool:
        """True once today's spend reached ``daily_budget_usd`` (0 means no limit)."""
        if self.daily_budget_usd <= 0:
            return False
        return self.today().cost_usd >= self.daily_budget_usd

    def close(self) -> None:
        self._db.close()
