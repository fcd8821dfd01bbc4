"""Conversation history: what was said and heard, kept in SQLite, re-seeded as text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "assistant", "tool_call", "tool_output"]


@dataclass(frozen=True)
class HistoryEntry:
    """One conversation item as text.

    ``assistant`` text is what the user actually heard (cut at the interruption point);
    ``tool_call`` text is the JSON arguments, ``tool_output`` the handler's result.
    """

    role: Role
    text: str
    created_at: float
    session_id: str = ""
    turn_id: str = ""
    call_id: str = ""
    name: str = ""
    interrupted: bool = False


def trim_history(
    entries: Sequence[HistoryEntry], max_items: int, max_chars: int
) -> list[HistoryEntry]:
    """The newest entries that fit both bounds, oldest first (oldest dropped first)."""
    kept: list[HistoryEntry] = []
    chars = 0
    for entry in reversed(entries):
        if len(kept) >= max_items or chars + len(entry.text) > max_chars:
            break
        kept.append(entry)
        chars += len(entry.text)
    kept.reverse()
    # A tool output without its call (or the reverse) confuses the model: drop orphans at the edge.
    while kept and kept[0].role == "tool_output":
        kept.pop(0)
    return kept
