"""Waiting for an asyncio event with a timeout, without `asyncio.wait_for`:
before Python 3.12, wait_for can swallow a cancellation that arrives just
as the event is set, and a loop built on it then never stops."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` was set within `seconds`."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=seconds)
    finally:
        waiter.cancel()
    return event.is_set()
