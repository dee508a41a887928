"""The job state machine: every pair of states, legal or not."""

from __future__ import annotations

import itertools

import pytest

from scheduler.states import ACTIVE, TERMINAL, JobState, can_transition, sources

Q, A, R = JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED

LEGAL = {
    (Q, A), (Q, C), (Q, F),
    (A, R), (A, Q), (A, S), (A, F), (A, C),
    (R, Q), (R, S), (R, F), (R, C),
}  # fmt: skip


@pytest.mark.parametrize(("source", "target"), list(itertools.product(JobState, JobState)))
def test_every_move(source: JobState, target: JobState) -> None:
    assert can_transition(source, target) == ((source, target) in LEGAL)


def test_nothing_leaves_a_terminal_state() -> None:
    for state in TERMINAL:
        assert state.terminal
        assert not any(can_transition(state, target) for target in JobState)
    assert not any(state.terminal for state in (Q, A, R))


def test_sources_are_the_inverse_of_the_table() -> None:
    assert sources(Q) == {A, R}
    assert sources(A) == {Q}
    assert sources(R) == {A}
    assert sources(S) == {A, R}
    assert sources(F) == {Q, A, R}
    assert sources(C) == {Q, A, R}
    assert {A, R} == ACTIVE
