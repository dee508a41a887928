"""What a chaos scenario checks at the end, whatever fault it injected:
every job the API acknowledged is terminal (none lost), every watcher saw
exactly one terminal event, and no job has more than one stored image set,
in the database or on disk (none duplicated)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from client import Job, StateEvent
from harness.processes import LocalCluster
from harness.waiting import until

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    """`until` with the chaos suite's longer patience: a replica may be
    down, or failing over, while it asks."""
    until(condition, what, timeout=timeout)


class Ledger:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.client = cluster.client()
        self.acknowledged: list[str] = []
        self.terminal_events: dict[str, list[str]] = {}
        self.progressed: dict[str, threading.Event] = {}
        self._watchers: list[threading.Thread] = []

    def submit(self, prompt: str = "a lighthouse", **options: object) -> str:
        handle = self.client.submit(prompt, width=64, height=64, steps=4, **options)  # type: ignore[arg-type]
        self.acknowledged.append(handle.id)
        self._watch(handle.id)
        return handle.id

    def _watch(self, job_id: str) -> None:
        """A watcher of its own, as a user's `sdctl watch` would be."""
        seen: list[str] = []
        progressed = threading.Event()
        self.terminal_events[job_id] = seen
        self.progressed[job_id] = progressed

        def follow() -> None:
            with self.cluster.client("tester", reconnect_timeout=120) as own:
                for event in own.watch(job_id):
                    if isinstance(event, StateEvent):
                        if event.state in TERMINAL:
                            seen.append(event.state)
                        elif event.state == "RUNNING":
                            pass
                    elif event.seq == 0:
                        progressed.set()

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        self._watchers.append(thread)

    def job(self, job_id: str) -> Job:
        return self.client.get_job(job_id)

    def wait_terminal(self, timeout: float = 120.0) -> None:
        def all_terminal() -> bool:
            return all(self.job(j).state in TERMINAL for j in self.acknowledged)

        wait_until(all_terminal, "every acknowledged job to end", timeout)
        for thread in self._watchers:
            thread.join(timeout=60)

    def check(self, image_roots: list[Path]) -> None:
        """The three promises. `image_roots`: every replica's image directory."""
        self.wait_terminal()
        for job_id in self.acknowledged:
            job = self.job(job_id)
            assert job.state in TERMINAL, f"job {job_id} lost in {job.state}"
            assert len(self.terminal_events[job_id]) == 1, (
                f"watcher of {job_id} saw terminal events {self.terminal_events[job_id]}"
            )
        stored = images_in_database(self.cluster.db_url, self.cluster.root)
        for job_id in self.acknowledged:
            job = self.job(job_id)
            rows = stored.get(job_id, [])
            if job.state == "SUCCEEDED":
                assert len(rows) == job.spec.batch_size, f"{job_id}: image rows {rows}"
                assert {attempt for _, attempt in rows} == {job.attempt}, rows
            else:
                assert rows == [], f"{job_id} ended {job.state} with images {rows}"
            files = [p for root in image_roots for p in root.glob(f"*/{job_id}/*.png")]
            expected = job.spec.batch_size if job.state == "SUCCEEDED" else 0
            assert len(files) == expected, f"{job_id}: files on disk {files}"

    def close(self) -> None:
        self.client.close()


def images_in_database(db_url: str, root: Path) -> dict[str, list[tuple[int, int]]]:
    url = db_url or f"sqlite:///{root / 'scheduler' / 'sdmesh.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT job_id, idx, attempt FROM images")).all()
    finally:
        engine.dispose()
    found: dict[str, list[tuple[int, int]]] = {}
    for job_id, index, attempt in rows:
        found.setdefault(job_id, []).append((index, attempt))
    return found
