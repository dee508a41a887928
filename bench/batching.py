"""Batching benchmark: the same jobs run one pipeline call each, and as
batches of alike jobs in one call, on the agent's own device worker.

    python -m bench.batching            # 64 and 256 px
    python -m bench.batching --quick    # fewer jobs

Both sides run the built-in `tiny` model (SD1.5's geometry, random weights)
on the CPU through `gpu_node.runner.DeviceWorker`, exactly as an agent
runs an assignment: the same sampler, per-image CPU generators, previews,
PNGs with infotext. Sequential: each job submitted on its own
(`DeviceWorker.submit`). Batched: the same jobs, BATCH at a time
(`submit_batch`, what a batched assignment becomes). torch uses THREADS
threads on both. The two take turns, round by round, so that other load on
the machine falls on both alike.

Figures per case: images a second on each side (images over the seconds
from the first job's start to the last job's end) and the gain (batched
over sequential). It prints a table and writes bench/results/batching.json:
`{"cases": [{"name", "sequential_images_per_s", "batched_images_per_s",
"gain"}], ...}`.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (`python bench/NAME.py`): make the repository importable,
    # as `python -m bench.NAME` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from gpu_node.backends import TorchBackend
from gpu_node.catalog import Catalog
from gpu_node.runner import DeviceWorker, Task
from gpu_node.tiny import ensure_tiny
from sdmesh.domain import AttemptOutcome, AttemptUpdate, DeviceInfo, Ended
from sdmesh.spec import JobSpec, MemoryMode

RESULTS = Path(__file__).resolve().parent / "results" / "batching.json"
BATCH = 4
THREADS = 2
CASES = (("64px_8steps", 64, 8), ("256px_8steps", 256, 8))
CPU = DeviceInfo(0, "CPU", "cpu-0", "cpu", 1)


def spec(size: int, steps: int, seed: int) -> JobSpec:
    return JobSpec(
        prompt=f"a lighthouse, take {seed}",
        negative_prompt="",
        model="tiny",
        width=size,
        height=size,
        steps=steps,
        cfg_scale=7.0,
        seed=seed,
        sampler_name="Euler a",
        batch_size=1,
    )


def run(
    worker: DeviceWorker, events: queue.Queue[AttemptUpdate], tasks: list[Task], batch: int
) -> float:
    """Seconds from handing the jobs over to the last one's end."""
    started = time.perf_counter()
    for first in range(0, len(tasks), batch):
        group = tasks[first : first + batch]
        if batch == 1:
            worker.submit(group[0])
        else:
            worker.submit_batch(group)
    ended = 0
    while ended < len(tasks):
        event = events.get(timeout=600)
        if isinstance(event.body, Ended):
            if event.body.outcome is not AttemptOutcome.SUCCEEDED:
                raise RuntimeError(
                    f"job {event.job_id} ended {event.body.outcome}: {event.body.reason}"
                )
            ended += 1
    return time.perf_counter() - started


def measure(catalog: Catalog, jobs: int, rounds: int) -> dict[str, Any]:
    events: queue.Queue[AttemptUpdate] = queue.Queue()
    worker = DeviceWorker(CPU, TorchBackend("cpu", catalog), events.put)
    cases = []
    try:
        run(worker, events, [Task("warm", 1, spec(64, 2, 0), MemoryMode.AUTO)], 1)
        for name, size, steps in CASES:
            seconds = {1: 0.0, BATCH: 0.0}
            for round_ in range(rounds):
                for batch in (1, BATCH):
                    tasks = [
                        Task(
                            f"{name}-{round_}-{batch}-{n}", 1, spec(size, steps, n), MemoryMode.AUTO
                        )
                        for n in range(jobs)
                    ]
                    seconds[batch] += run(worker, events, tasks, batch)
            sequential = jobs * rounds / seconds[1]
            batched = jobs * rounds / seconds[BATCH]
            cases.append(
                {
                    "name": name,
                    "sequential_images_per_s": round(sequential, 2),
                    "batched_images_per_s": round(batched, 2),
                    "gain": round(batched / sequential, 2),
                }
            )
            print(f"  {name}: {sequential:.2f} -> {batched:.2f} images/s", flush=True)
    finally:
        worker.close(timeout=60)
    return {
        "batch": BATCH,
        "torch_threads": THREADS,
        "jobs": jobs,
        "rounds": rounds,
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as folder:
        ensure_tiny(Path(folder) / "models")
        catalog = Catalog(Path(folder), None)
        catalog.scan()
        result = measure(catalog, jobs=8 if args.quick else 16, rounds=1 if args.quick else 3)
    print("| case | sequential images/s | batched images/s | gain |")
    print("|---|---|---|---|")
    for case in result["cases"]:
        print(
            f"| {case['name']} | {case['sequential_images_per_s']} | "
            f"{case['batched_images_per_s']} | {case['gain']}x |"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
