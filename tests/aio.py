"""Small asyncio helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest


async def until(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``cond`` on the loop until it is true; TimeoutError after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel an owner task and check that it ends by re-raising CancelledError."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
