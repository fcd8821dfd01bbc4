from __future__ import annotations

import logging
import sqlite3
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ModelPrice
from daemon.usage import TokenCounts, UsageLedger, cost_usd, token_counts

# Round prices make expected costs easy to compute by hand: USD per 1M tokens.
PRICE = ModelPrice(
    text_in=1.0, text_in_cached=0.1, text_out=10.0,
    audio_in=100.0, audio_in_cached=1.0, audio_out=1000.0,
)

GA_USAGE: dict[str, Any] = {
    "total_tokens": 1600,
    "input_tokens": 1500,
    "output_tokens": 100,
    "input_token_details": {
        "text_tokens": 500,
        "audio_tokens": 1000,
        "image_tokens": 0,
        "cached_tokens": 700,
        "cached_tokens_details": {"text_tokens": 300, "audio_tokens": 400},
    },
    "output_token_details": {"text_tokens": 20, "audio_tokens": 80},
}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# --- pricing --------------------------------------------------------------------------------


def test_ga_usage_split_and_cost() -> None:
    counts = token_counts(GA_USAGE)
    assert counts == TokenCounts(
        text_in=200, text_in_cached=300, audio_in=600, audio_in_cached=400,
        text_out=20, audio_out=80,
    )
    assert counts.input_tokens == 1500 and counts.output_tokens == 100
    expected = (200 * 1 + 300 * 0.1 + 600 * 100 + 400 * 1 + 20 * 10 + 80 * 1000) / 1e6
    assert cost_usd(GA_USAGE, PRICE) == pytest.approx(expected)


def test_default_price_gpt_realtime() -> None:
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000,
             "input_token_details": {"text_tokens": 1_000_000, "audio_tokens": 0},
             "output_token_details": {"text_tokens": 0, "audio_tokens": 1_000_000}}
    assert cost_usd(usage, ModelPrice()) == pytest.approx(4.0 + 64.0)


def test_beta_shape_without_cached_details_splits_proportionally() -> None:
    usage = {
        "input_tokens": 400, "output_tokens": 0,
        "input_token_details": {"text_tokens": 100, "audio_tokens": 300, "cached_tokens": 200},
    }
    counts = token_counts(usage)
    assert counts.text_in_cached == 50 and counts.audio_in_cached == 150
    assert counts.text_in == 50 and counts.audio_in == 150


@pytest.mark.parametrize("usage", [None, {}, {"input_tokens": None}, "junk", {"foo": 1}])
def test_missing_or_malformed_usage_costs_nothing(usage: Any) -> None:
    assert token_counts(usage) == TokenCounts()
    assert cost_usd(usage, PRICE) == 0.0


def test_totals_without_details_are_priced_as_audio() -> None:
    counts = token_counts({"input_tokens": 10, "output_tokens": 5})
    assert counts == TokenCounts(audio_in=10, audio_out=5)
    # Details that do not add up: the unexplained rest is audio.
    counts = token_counts({
        "input_tokens": 30, "input_token_details": {"text_tokens": 10, "audio_tokens": 5},
        "output_tokens": 9, "output_token_details": {"text_tokens": 9},
    })
    assert counts.text_in == 10 and counts.audio_in == 20 and counts.text_out == 9


def test_bad_values_are_ignored_and_cached_is_capped() -> None:
    counts = token_counts({
        "input_tokens": -5,
        "input_token_details": {
            "text_tokens": "12", "audio_tokens": True, "image_tokens": 4,
            "cached_tokens": 999, "cached_tokens_details": {"text_tokens": 999},
        },
    })
    # text = image tokens only (4); everything cached, never negative.
    assert counts == TokenCounts(text_in=0, text_in_cached=4)


def test_cached_total_above_details_is_attributed() -> None:
    counts = token_counts({
        "input_token_details": {
            "text_tokens": 10, "audio_tokens": 10, "cached_tokens": 15,
            "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 5},
        }
    })
    assert counts.text_in_cached + counts.audio_in_cached == 15
    assert counts.text_in >= 0 and counts.audio_in >= 0


# --- ledger ---------------------------------------------------------------------------------


def test_record_and_today(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 5, 1, 12, 0))
    ledger = UsageLedger(tmp_path / "u.db", {"m": PRICE}, 0.0, clock)
    cost = ledger.record("turn1", "resp1", "m", GA_USAGE)
    assert cost.day == date(2026, 5, 1)
    assert cost.input_tokens == 1500 and cost.output_tokens == 100
    assert cost.cost_usd == pytest.approx(cost_usd(GA_USAGE, PRICE))
    ledger.record("turn1", "resp2", "m", GA_USAGE)  # tool call: second response, same turn
    ledger.record("turn2", "resp3", "m", GA_USAGE)
    day = ledger.today()
    assert (day.turns, day.responses) == (2, 3)
    assert day.input_tokens == 4500 and day.output_tokens == 300
    assert day.cost_usd == pytest.approx(3 * cost.cost_usd)
    assert not ledger.budget_exhausted()  # 0 = no limit
    ledger.close()


def test_duplicate_response_is_not_counted_twice(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "u.db", {"m": PRICE}, 0.0, Clock(datetime(2026, 5, 1)))
    ledger.record("t", "resp1", "m", GA_USAGE)
    ledger.record("t", "resp1", "m", GA_USAGE)
    ledger.record("t", "", "m", GA_USAGE)  # no id: always counted
    ledger.record("t", "", "m", GA_USAGE)
    assert ledger.today().responses == 3
    ledger.close()


def test_budget_and_midnight_reset(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 5, 1, 23, 59, 30))
    per = cost_usd(GA_USAGE, PRICE)  # about 0.14 USD
    ledger = UsageLedger(tmp_path / "u.db", {"m": PRICE}, per * 2.5, clock)
    ledger.record("t1", "r1", "m", GA_USAGE)
    ledger.record("t2", "r2", "m", GA_USAGE)
    assert not ledger.budget_exhausted()
    ledger.record("t3", "r3", "m", GA_USAGE)
    assert ledger.budget_exhausted()
    clock.now = datetime(2026, 5, 2, 0, 0, 1)
    assert not ledger.budget_exhausted()
    assert ledger.today().responses == 0
    assert ledger.totals(date(2026, 5, 1)).responses == 3
    ledger.close()


def test_budget_reached_exactly_counts_as_exhausted(tmp_path: Path) -> None:
    usage = {"input_tokens": 1_000_000, "input_token_details": {"text_tokens": 1_000_000}}
    ledger = UsageLedger(tmp_path / "u.db", {"m": PRICE}, 1.0, Clock(datetime(2026, 1, 1)))
    ledger.record("t", "r", "m", usage)
    assert ledger.today().cost_usd == pytest.approx(1.0)
    assert ledger.budget_exhausted()
    ledger.close()


def test_persisted_across_restart(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 5, 1, 8))
    ledger = UsageLedger(tmp_path / "u.db", {"m": PRICE}, 0.2, clock)
    ledger.record("t1", "r1", "m", GA_USAGE)
    ledger.record("t2", "r2", "m", GA_USAGE)
    ledger.close()
    reopened = UsageLedger(tmp_path / "u.db", {"m": PRICE}, 0.2, clock)
    assert reopened.today().responses == 2
    assert reopened.budget_exhausted()
    reopened.record("t2", "r2", "m", GA_USAGE)  # replayed event after restart
    assert reopened.today().responses == 2
    reopened.close()


def test_unknown_model_costs_zero_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = UsageLedger(tmp_path / "u.db", {"m": PRICE}, 1.0, Clock(datetime(2026, 1, 1)))
    with caplog.at_level(logging.WARNING, logger="daemon.usage"):
        a = ledger.record("t", "r1", "gpt-realtime-9", GA_USAGE)
        b = ledger.record("t", "r2", "gpt-realtime-9", GA_USAGE)
    assert a.cost_usd == 0.0 and b.cost_usd == 0.0
    assert a.input_tokens == 1500  # tokens are still counted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gpt-realtime-9" in warnings[0] and "usage.prices" in warnings[0]
    assert ledger.today().input_tokens == 3000
    ledger.close()


def test_corrupt_ledger_file_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    path.write_bytes(b"\x00garbage" * 1000)
    ledger = UsageLedger(path, {"m": PRICE}, 0.0, Clock(datetime(2026, 1, 1)))
    ledger.record("t", "r", "m", GA_USAGE)
    assert ledger.today().responses == 1
    assert list(tmp_path.glob("u.db.corrupt-*"))
    ledger.close()


def test_failed_writes_still_count_towards_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    clock = Clock(datetime(2026, 1, 1))
    ledger = UsageLedger(path, {"m": PRICE}, 0.1, clock)
    # Make the table unwritable behind the ledger's back: a trigger that aborts inserts.
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER no_insert BEFORE INSERT ON usage "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    conn.commit()
    conn.close()
    ledger.record("t", "r", "m", GA_USAGE)
    day = ledger.today()
    assert day.responses == 1 and day.cost_usd > 0.1
    assert ledger.budget_exhausted()
    ledger.close()


def test_reconfigure_changes_budget_and_prices_not_the_past(tmp_path: Path) -> None:
    from daemon.config import ModelPrice as _Price

    ledger = UsageLedger(tmp_path / "u.sqlite3", {"m": _Price()}, 0.0)
    first = ledger.record("t1", "r1", "m", {"input_tokens": 10, "output_tokens": 10,
                                            "output_token_details": {"audio_tokens": 10}})
    assert not ledger.budget_exhausted()
    ledger.reconfigure({"m": _Price(audio_out=0.0)}, daily_budget_usd=first.cost_usd / 2)
    assert ledger.budget_exhausted()
    assert ledger.today().cost_usd == first.cost_usd
    ledger.close()
