"""Waiting for a condition seen from outside: a job's state, a log line, a
replica's role. Faults fire on what is observed, never after a sleep; these
poll for it, with a timeout that fails the caller loudly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _truthy(value: Any) -> bool:
    return bool(value)


def until(
    check: Callable[[], T],
    what: str,
    *,
    done: Callable[[T], bool] = _truthy,
    timeout: float = 60.0,
    interval: float = 0.1,
    while_alive: Callable[[], None] = lambda: None,
) -> T:
    """Polls `check` until `done` says yes to what it returned (by default:
    until it returns something truthy), and returns that. An exception from
    `check` counts as "not yet": a server may be starting or failing over.
    `while_alive` may raise to give up early (a process the wait depends on
    died). When `timeout` seconds pass it raises AssertionError naming
    `what` and the last value or error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        while_alive()
        try:
            value = check()
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if done(value):
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last}")
        time.sleep(interval)


async def until_async(
    check: Callable[[], Awaitable[T]],
    what: str,
    *,
    done: Callable[[T], bool] = _truthy,
    within: float = 30.0,
    interval: float = 0.05,
) -> T:
    """`until` for a coroutine check, on the running event loop, for up to
    `within` seconds; errors from `check` are the caller's."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}; last: {value}")
        await asyncio.sleep(interval)
