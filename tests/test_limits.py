"""Token buckets per key on a clock the test moves: a burst, then refusals
with the wait until the next token, refills, and memory that stays
bounded."""

from __future__ import annotations

import pytest

from scheduler.limits import TokenBuckets


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_two_seconds_worth_then_the_wait_for_the_next_token() -> None:
    clock = Clock()
    buckets = TokenBuckets(5.0, clock=clock)  # burst: 5/s * 2 s = 10
    assert [buckets.take("key:a") for _ in range(10)] == [0.0] * 10
    assert buckets.take("key:a") == 0.2  # one token at 5/s: 1 / 5 = 0.2 s
    assert buckets.take("key:a") == 0.2  # a refusal takes nothing
    clock.now += 0.1
    assert buckets.take("key:a") == 0.1  # half a token in: (1 - 0.5) / 5
    clock.now += 0.1
    assert buckets.take("key:a") == 0.0
    assert buckets.take("key:a") == 0.2
    # Another key has its own bucket.
    assert buckets.take("key:b") == 0.0


def test_it_refills_at_the_rate_and_never_past_the_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(2.0, clock=clock)  # burst 4
    for _ in range(4):
        buckets.take("u")
    clock.now += 1.0  # 1 s * 2/s = 2 tokens
    assert [buckets.take("u") for _ in range(3)] == [0.0, 0.0, 0.5]
    clock.now += 3600  # an hour refills 4, not 7,200
    assert [buckets.take("u") for _ in range(5)] == [0.0, 0.0, 0.0, 0.0, 0.5]


@pytest.mark.parametrize(
    ("rate", "capacity", "wait"),
    [
        (50.0, 100.0, 0.02),  # 50/s: 2 s = 100; then 1 / 50 = 0.02 s
        (0.25, 1.0, 4.0),  # 2 s worth is half a token: at least one
        (0.3, 1.0, 3.334),  # 1 / 0.3 = 3.333…, rounded up to the millisecond
    ],
)
def test_burst_and_wait(rate: float, capacity: float, wait: float) -> None:
    buckets = TokenBuckets(rate, clock=Clock())
    assert buckets.capacity == capacity
    for _ in range(int(capacity)):
        assert buckets.take("k") == 0.0
    assert buckets.take("k") == wait


def test_rate_zero_means_no_limit_and_remembers_nothing() -> None:
    buckets = TokenBuckets(0.0, clock=Clock())
    assert all(buckets.take("k") == 0.0 for _ in range(10_000))
    assert len(buckets) == 0


def test_a_clock_that_steps_back_neither_refills_nor_locks_a_key_out() -> None:
    clock = Clock()
    buckets = TokenBuckets(1.0, clock=clock)  # burst 2
    buckets.take("k")
    buckets.take("k")
    clock.now -= 3600
    assert buckets.take("k") == 1.0
    clock.now += 1.0  # one second after the step back: one token
    assert buckets.take("k") == 0.0


def test_full_buckets_are_forgotten_and_the_key_count_is_bounded() -> None:
    clock = Clock()
    buckets = TokenBuckets(1.0, clock=clock, max_keys=3)
    for key in "abc":
        buckets.take(key)
    assert len(buckets) == 3
    clock.now += 1.0  # a, b and c are full again: no different from new
    buckets.take("d")
    assert len(buckets) == 1
    # Past max_keys the least recently used goes even when not full; it
    # comes back with a full burst.
    for key in "efg":
        buckets.take(key)
    assert len(buckets) == 3
    assert [buckets.take("d"), buckets.take("d")] == [0.0, 0.0]


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate must be 0 or more"):
        TokenBuckets(-1.0, clock=Clock())
