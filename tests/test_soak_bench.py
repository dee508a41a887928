"""The soak benchmark's pure parts: its fault schedule, how it releases jobs,
and the audit that decides lost and duplicated jobs. No processes run."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.soak_audit import (
    KINDS,
    FinalJob,
    ImageRow,
    audit,
    fault_schedule,
    job_options,
    parse_image_file,
    release_quota,
)


def test_the_fault_schedule_is_seeded_and_balanced() -> None:
    schedule = fault_schedule(30, seed=1)
    assert schedule == fault_schedule(30, seed=1)
    assert schedule != fault_schedule(30, seed=2)
    assert len(schedule) == 30
    counts = Counter(schedule)
    assert set(counts) == set(KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1
    for start in range(0, 28, 4):  # every round holds each kind once
        assert sorted(schedule[start : start + 4]) == sorted(KINDS)


def test_a_short_schedule_is_a_prefix_of_a_longer_one() -> None:
    assert fault_schedule(5, seed=7) == fault_schedule(12, seed=7)[:5]
    assert fault_schedule(0, seed=7) == []


def test_jobs_are_released_in_step_with_the_faults() -> None:
    assert release_quota(200, 30, started=0, finished=False) == 0
    assert release_quota(200, 30, started=1, finished=False) == 7
    assert release_quota(200, 30, started=15, finished=False) == 100
    assert release_quota(200, 30, started=30, finished=False) == 200
    assert release_quota(200, 30, started=3, finished=True) == 200
    assert release_quota(10, 0, started=0, finished=False) == 10


def test_every_fourth_job_is_a_batch_of_two() -> None:
    sizes = [job_options(n)["batch_size"] for n in range(8)]
    assert sizes == [1, 1, 1, 2, 1, 1, 1, 2]
    assert job_options(0)["width"] == job_options(0)["height"] == 64


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("ab/abcdef/a1-0.png", ("abcdef", 1, 0)),
        ("ab/abcdef/a12-3.png", ("abcdef", 12, 3)),
        ("ab/abcdef/a1-0.part", None),
        ("xx/abcdef/a1-0.png", None),
        ("abcdef/a1-0.png", None),
    ],
)
def test_image_file_names(path: str, parsed: tuple[str, int, int] | None) -> None:
    assert parse_image_file(path) == parsed


def _path(job_id: str, attempt: int, idx: int) -> str:
    return f"{job_id[:2]}/{job_id}/a{attempt}-{idx}.png"


def _row(job_id: str, attempt: int, idx: int) -> ImageRow:
    return ImageRow(job_id, idx, attempt, _path(job_id, attempt, idx))


def test_a_clean_run_counts_outcomes_and_reexecutions() -> None:
    acknowledged = {"aa1": 1, "bb2": 2, "cc3": 1}
    finals = {
        "aa1": FinalJob("SUCCEEDED", 1),
        "bb2": FinalJob("SUCCEEDED", 3),
        "cc3": FinalJob("CANCELLED", 2),
    }
    rows = [_row("aa1", 1, 0), _row("bb2", 3, 0), _row("bb2", 3, 1)]
    disk = {"images": [row.path for row in rows]}
    result = audit(acknowledged, finals, rows, disk)
    assert (result.submitted, result.succeeded, result.failed) == (3, 2, 1)
    assert (result.lost, result.duplicated, result.image_mismatch) == (0, 0, 0)
    assert result.reexecuted_jobs == {"bb2": 3, "cc3": 2}
    assert result.reexecuted == 2
    assert (result.stray_files, result.missing_files) == (0, 0)
    assert result.ok


def test_jobs_not_terminal_or_not_found_are_lost() -> None:
    acknowledged = {"aa1": 1, "bb2": 1, "cc3": 1}
    finals = {"aa1": FinalJob("RUNNING", 2), "bb2": None, "cc3": FinalJob("FAILED", 3)}
    result = audit(acknowledged, finals, [], {})
    assert result.lost_jobs == {"aa1": "still RUNNING at attempt 2", "bb2": "not found"}
    assert (result.lost, result.failed, result.succeeded) == (2, 1, 0)
    assert result.failed_jobs == {"cc3": "FAILED"}
    assert not result.ok


def test_images_from_two_attempts_in_the_table_are_a_duplicate() -> None:
    rows = [_row("aa1", 1, 0), _row("aa1", 2, 1)]
    result = audit({"aa1": 2}, {"aa1": FinalJob("SUCCEEDED", 2)}, rows, {})
    assert result.duplicated_jobs == {"aa1": ["images table holds attempts [1, 2]"]}
    assert result.duplicated == 1
    assert "aa1" in result.mismatched_jobs  # and the set is torn
    assert not result.ok


def test_two_attempts_files_in_one_directory_are_a_duplicate() -> None:
    rows = [_row("aa1", 2, 0)]
    disk = {"images": [_path("aa1", 1, 0), _path("aa1", 2, 0)]}
    result = audit({"aa1": 1}, {"aa1": FinalJob("SUCCEEDED", 2)}, rows, disk)
    assert result.duplicated_jobs == {
        "aa1": ["images holds files of attempts [1, 2] (not in the images table: [1])"]
    }
    assert result.stray == ["images:" + _path("aa1", 1, 0)]
    assert result.image_mismatch == 0


def test_one_attempt_in_each_of_two_directories_is_stray_but_not_a_duplicate() -> None:
    rows = [_row("aa1", 2, 0)]
    disk = {
        "scheduler/images": [_path("aa1", 1, 0)],
        "scheduler-1/images": [_path("aa1", 2, 0)],
    }
    result = audit({"aa1": 1}, {"aa1": FinalJob("SUCCEEDED", 2)}, rows, disk)
    assert result.duplicated == 0
    assert result.stray == ["scheduler/images:" + _path("aa1", 1, 0)]
    assert result.ok


def test_a_partial_write_left_behind_is_stray() -> None:
    rows = [_row("aa1", 1, 0)]
    disk = {"images": [_path("aa1", 1, 0), "aa/aa1/a2-0.part"]}
    result = audit({"aa1": 1}, {"aa1": FinalJob("SUCCEEDED", 1)}, rows, disk)
    assert result.stray == ["images:aa/aa1/a2-0.part"]
    assert result.duplicated == 0


def test_image_sets_that_do_not_match_the_job() -> None:
    acknowledged = {"aa1": 2, "bb2": 1, "cc3": 1}
    finals = {
        "aa1": FinalJob("SUCCEEDED", 1),  # one image of a batch of two
        "bb2": FinalJob("SUCCEEDED", 2),  # its image is from attempt 1
        "cc3": FinalJob("CANCELLED", 1),  # cancelled, yet an image was stored
    }
    rows = [_row("aa1", 1, 0), _row("bb2", 1, 0), _row("cc3", 1, 0)]
    result = audit(acknowledged, finals, rows, {"images": [r.path for r in rows]})
    assert sorted(result.mismatched_jobs) == ["aa1", "bb2", "cc3"]
    assert result.mismatched_jobs["cc3"] == "CANCELLED but has 1 image rows"
    assert result.duplicated == 0
    assert not result.ok


def test_an_image_row_whose_file_is_nowhere_is_missing() -> None:
    rows = [_row("aa1", 1, 0)]
    result = audit({"aa1": 1}, {"aa1": FinalJob("SUCCEEDED", 1)}, rows, {"images": []})
    assert result.missing == ["aa1:" + _path("aa1", 1, 0)]
    assert result.missing_files == 1
