"""Overhead benchmark: the same jobs run directly with diffusers and through
sdmesh (a scheduler and one agent as real processes), side by side.

    python -m bench.overhead            # 512 px / 20 steps and 64 px / 4 steps
    python -m bench.overhead --quick    # fewer jobs, for a quick look

Both paths run the built-in `tiny` model (SD1.5's geometry, random
weights) on the CPU with one torch thread (`torch.set_num_threads(1)` here,
`OMP_NUM_THREADS=1` for the agent, as the test harness sets it), the
"Euler a" sampler applied from the model's scheduler config, cfg 7, the
initial noise from a CPU `torch.Generator` seeded per job, and live
previews on:

- direct: the pipeline loaded once and kept; each job is one pipeline call
  whose step callback hands the first image's latents to the agent's own
  previewer (`gpu_node.preview.Previewer`: the same latent->RGB map and
  PNG, on its own thread, at the same rate), then the PNG encode of the
  image with its infotext, as the agent does. No gRPC, no queue.
- mesh: `sdctl scheduler` (SQLite, the default 2 s heartbeat, as `sdctl up`
  runs it, with batching off so that each job is one pipeline call as on
  the direct side) and `sdctl node` as child processes on loopback; each round's
  jobs are submitted through the SDK all at once, so the agent's queue is
  never empty and the scheduler's round trip overlaps the job before.

The two take turns, round by round (`--rounds`, 3 by default), after a
warm-up job each, so that other load on a shared machine falls on both
alike. The jobs of a round have the same seeds on both paths. Figures, per
case, over every round:
- direct_jobs_per_s: jobs over the seconds their calls took, one after
  another;
- mesh_jobs_per_s: finishes after each round's first one, over the seconds
  from each round's first finish to its last (so no dispatch of an idle
  queue is counted);
- ratio: mesh over direct;
- overhead_p50_ms, overhead_p95_ms: per job, the attempt's time on the
  agent, from its start to its end as the scheduler recorded them, minus
  the direct run of the same job (same seed).

It prints a table and writes `bench/results/overhead.json`. Every process
it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (`python bench/NAME.py`): make the repository importable,
    # as `python -m bench.NAME` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
PROMPT = "a lighthouse at dusk"
SAMPLER = "Euler a"
CFG_SCALE = 7.0
FIRST_SEED = 1000


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    steps: int
    jobs: int  # per round
    quick_jobs: int


CASES = (
    Case("512px-20steps", 512, 20, 4, 3),
    Case("64px-4steps", 64, 4, 30, 15),
)
ROUNDS = 3


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * (len(ordered) - 1) + 0.5))]


class Direct:
    """The tiny pipeline, loaded once, called as a diffusers user would."""

    def __init__(self, models_root: Path) -> None:
        import diffusers
        import torch
        from diffusers import AutoPipelineForText2Image

        from gpu_node.pipelines import quiet_libraries
        from gpu_node.tiny import ensure_tiny
        from sdmesh.samplers import find_sampler

        torch.set_num_threads(1)
        quiet_libraries()
        self.pipeline = AutoPipelineForText2Image.from_pretrained(
            ensure_tiny(models_root), dtype=torch.float32, local_files_only=True
        )
        self.pipeline.set_progress_bar_config(disable=True)
        sampler = find_sampler(SAMPLER)
        assert sampler is not None
        scheduler_class = getattr(diffusers, sampler.scheduler_class)
        self.pipeline.scheduler = scheduler_class.from_config(
            self.pipeline.scheduler.config, **sampler.options
        )
        self.previews = ThreadPoolExecutor(1, thread_name_prefix="preview")

    def run(self, size: int, steps: int, seed: int) -> float:
        """One job's seconds: the call, its previews and its PNG."""
        import torch

        from gpu_node.preview import Previewer
        from gpu_node.runner import encode_png

        previewer = Previewer(self.previews, lambda _preview: None)

        def on_step_end(pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> Any:
            previewer.offer(index + 1, steps, tensors["latents"])
            return tensors

        started = time.perf_counter()
        result = self.pipeline(
            prompt=PROMPT,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=CFG_SCALE,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        previewer.flush()
        encode_png(result.images[0], f"{PROMPT}\nSeed: {seed}")
        return time.perf_counter() - started

    def close(self) -> None:
        self.previews.shutdown(wait=True)


def run_direct(direct: Direct, case: Case, seeds: list[int]) -> list[float]:
    seconds = []
    for number, seed in enumerate(seeds):
        seconds.append(direct.run(case.size, case.steps, seed))
        if number % max(1, len(seeds) // 3) == 0 or number == len(seeds) - 1:
            progress(
                f"  direct {case.name}: job {number + 1}/{len(seeds)}: {seconds[-1] * 1e3:.0f} ms"
            )
    return seconds


def run_mesh(client: Any, case: Case, seeds: list[int]) -> tuple[float, list[float]]:
    """Submits every job at once. Returns the seconds from the first job's
    finish to the last one's, and each job's attempt seconds."""
    from client import SubmitOptions

    options = SubmitOptions(
        width=case.size,
        height=case.size,
        steps=case.steps,
        cfg_scale=CFG_SCALE,
        sampler_name=SAMPLER,
    )
    handles = [client.submit(PROMPT, seed=seed, **options) for seed in seeds]
    finished = []
    for number, handle in enumerate(handles):
        job = handle.wait()
        if not job.succeeded:
            raise RuntimeError(f"job {job.id} ended {job.state}: {job.reason}")
        finished.append(client.get_job(job.id))
        if number % max(1, len(seeds) // 3) == 0 or number == len(seeds) - 1:
            progress(f"  mesh {case.name}: job {number + 1}/{len(seeds)} done")
    ends = sorted(job.finished_at.timestamp() for job in finished if job.finished_at)
    attempt_seconds = []
    for job in finished:
        attempt = job.attempts[-1]
        assert attempt.started_at is not None and attempt.ended_at is not None
        attempt_seconds.append((attempt.ended_at - attempt.started_at).total_seconds())
    return ends[-1] - ends[0], attempt_seconds


def start_cluster(root: Path) -> Any:
    from harness.processes import LocalCluster

    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root)
    # `sdctl up` runs the scheduler with its default heartbeat; the harness's
    # short test heartbeat comes first on the command line and is overridden.
    # Batching is off: this measures what the path costs each job, one
    # pipeline call per job on both sides (bench.batching measures batches).
    try:
        cluster.start_scheduler("--heartbeat", "2", "--batch-max", "1")
        cluster.start_agent("agent")
        cluster.wait_for_nodes(1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class Tally:
    """One case's figures over every round."""

    direct_seconds: list[float]
    attempt_seconds: list[float]
    mesh_intervals: int = 0  # finishes after a round's first one
    mesh_span: float = 0.0  # seconds from a round's first finish to its last


def measure(cases: list[Case], quick: bool, rounds: int, root: Path) -> list[dict[str, Any]]:
    """Direct and mesh take turns, round by round, so that a change in the
    machine's load (other work on a shared box) falls on both alike."""
    progress("loading: the pipeline here, and a scheduler with one agent (OMP_NUM_THREADS=1)")
    direct = Direct(root / "direct" / "models")
    cluster = start_cluster(root / "mesh")
    tallies = {case.name: Tally([], []) for case in cases}
    try:
        with cluster.client() as client:
            for case in cases:  # warm-ups, not counted
                direct.run(case.size, case.steps, FIRST_SEED - 1)
                run_mesh(client, case, [FIRST_SEED - 1])
            for number in range(rounds):
                for case in cases:
                    jobs = case.quick_jobs if quick else case.jobs
                    seeds = [FIRST_SEED + number * jobs + k for k in range(jobs)]
                    progress(f"round {number + 1}/{rounds}, {case.name}: {jobs} jobs each way")
                    tally = tallies[case.name]
                    tally.direct_seconds += run_direct(direct, case, seeds)
                    span, attempts = run_mesh(client, case, seeds)
                    tally.attempt_seconds += attempts
                    tally.mesh_intervals += jobs - 1
                    tally.mesh_span += span
    except BaseException:
        progress(cluster.logs())
        raise
    finally:
        cluster.stop()
        direct.close()
    rows = []
    for case in cases:
        tally = tallies[case.name]
        overheads = [
            (mesh - alone) * 1e3
            for mesh, alone in zip(tally.attempt_seconds, tally.direct_seconds, strict=True)
        ]
        direct_per_second = len(tally.direct_seconds) / sum(tally.direct_seconds)
        mesh_per_second = tally.mesh_intervals / tally.mesh_span
        rows.append(
            {
                "name": case.name,
                "jobs": len(tally.direct_seconds),
                "direct_jobs_per_s": direct_per_second,
                "mesh_jobs_per_s": mesh_per_second,
                "ratio": mesh_per_second / direct_per_second,
                "direct_p50_ms": statistics.median(tally.direct_seconds) * 1e3,
                "attempt_p50_ms": statistics.median(tally.attempt_seconds) * 1e3,
                "overhead_p50_ms": percentile(overheads, 0.5),
                "overhead_p95_ms": percentile(overheads, 0.95),
            }
        )
    return rows


COLUMNS = ["jobs", "direct_jobs_per_s", "mesh_jobs_per_s", "ratio", "direct_p50_ms",
           "attempt_p50_ms", "overhead_p50_ms", "overhead_p95_ms"]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, for the terminal and for BENCHMARKS.md alike."""
    lines = ["| case | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row[column]
            if column == "jobs":
                cells.append(str(value))
            elif column.endswith("_ms"):
                cells.append(f"{value:.0f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer jobs, in one round")
    parser.add_argument(
        "--rounds", type=int, help=f"turns of direct then mesh per case (default {ROUNDS})"
    )
    parser.add_argument(
        "--case", choices=[c.name for c in CASES], action="append", help="only these cases"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    cases = [c for c in CASES if not args.case or c.name in args.case]
    root = Path(tempfile.mkdtemp(prefix="sdmesh-overhead-"))
    load_before = os.getloadavg()[0]
    try:
        rounds = args.rounds or (1 if args.quick else ROUNDS)
        rows = measure(cases, args.quick, rounds, root)
    except BaseException:
        progress(f"failed; the process logs are in {root}")
        raise
    shutil.rmtree(root, ignore_errors=True)
    # Other work on the machine shows here: the figures are only as steady
    # as the machine was.
    load = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(
        f"tiny model on the CPU, 1 torch thread, previews on; {rounds} round(s); "
        f"load average {load['before']:.1f} -> {load['after']:.1f} on {load['cpus']} CPUs"
    )
    print(table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"quick": args.quick, "rounds": rounds, "load_average": load, "cases": rows}
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
