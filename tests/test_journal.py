"""The agent's journal: what it keeps of each attempt while the scheduler is
away, what it replays on reconnecting, and that it stays bounded."""

from __future__ import annotations

from gpu_node.journal import Journal
from sdmesh.domain import (
    AttemptOutcome,
    AttemptUpdate,
    Ended,
    ImageReady,
    Preview,
    Progress,
    Started,
)


def test_an_attempt_that_ended_while_disconnected_replays_its_durable_history() -> None:
    journal = Journal(keep_seconds=20.0)
    journal.assigned("j", 2, 0)
    for body in (
        Started(),
        Progress(1, 4),
        Preview(1, 4, 8, 8, b"p"),
        ImageReady(1, 43, 64, 64, b"second"),
        ImageReady(0, 42, 64, 64, b"first"),
        Ended(AttemptOutcome.SUCCEEDED),
    ):
        journal.record(AttemptUpdate("j", 2, body), now=1.0, connected=False)
    [entry] = journal.held(now=1000.0)  # never delivered: kept however long it takes
    bodies = [event.body for event in entry.replay()]
    assert bodies[0] == Started()
    assert [b.index for b in bodies if isinstance(b, ImageReady)] == [0, 1]
    assert bodies[-1] == Ended(AttemptOutcome.SUCCEEDED)
    assert len(bodies) == 4  # steps and previews are news, not state


def test_a_delivered_end_is_kept_for_a_while_then_forgotten() -> None:
    journal = Journal(keep_seconds=20.0)
    journal.assigned("j", 1, 0)
    journal.assigned("live", 1, 0)
    journal.record(AttemptUpdate("j", 1, Ended(AttemptOutcome.FAILED)), now=10.0, connected=True)
    assert {e.job_id for e in journal.held(now=30.0)} == {"j", "live"}
    assert {e.job_id for e in journal.held(now=30.5)} == {"live"}


def test_a_stop_for_an_ended_attempt_forgets_it_but_not_a_live_one() -> None:
    journal = Journal(keep_seconds=20.0)
    journal.assigned("ended", 1, 0)
    journal.assigned("live", 1, 0)
    journal.record(AttemptUpdate("ended", 1, Ended(AttemptOutcome.STOPPED)), 1.0, connected=False)
    journal.forget("ended", 1)
    journal.forget("live", 1)
    assert [e.job_id for e in journal.held(now=2.0)] == ["live"]


def test_ended_attempts_are_bounded_delivered_ones_dropped_first() -> None:
    journal = Journal(keep_seconds=1e9, max_ended=3)
    for index in range(5):
        journal.assigned(f"j{index}", 1, 0)
        connected = index in (1, 2)
        journal.record(
            AttemptUpdate(f"j{index}", 1, Ended(AttemptOutcome.SUCCEEDED)), 1.0, connected
        )
    assert [e.job_id for e in journal.held(now=2.0)] == ["j0", "j3", "j4"]
