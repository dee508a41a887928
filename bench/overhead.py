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
  runs it) and `sdctl node` as child processes on loopback; the jobs are
  submitted through the SDK all at once after a warm-up job, so the
  agent's queue is never empty and the scheduler's round trip overlaps
  the job before.

Figures, per case:
- direct_jobs_per_s: jobs over the seconds their calls took, one after
  another;
- mesh_jobs_per_s: (N - 1) over the time from the first job's finish to
  the last one's, so that the first dispatch is not counted;
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
    jobs: int
    quick_jobs: int


CASES = (
    Case("512px-20steps", 512, 20, 8, 3),
    Case("64px-4steps", 64, 4, 60, 15),
)


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


def run_direct(direct: Direct, case: Case, jobs: int) -> list[float]:
    direct.run(case.size, case.steps, FIRST_SEED - 1)  # warm-up, not counted
    seconds = []
    for number in range(jobs):
        seconds.append(direct.run(case.size, case.steps, FIRST_SEED + number))
        if number % max(1, jobs // 5) == 0 or number == jobs - 1:
            progress(f"  direct {case.name}: job {number + 1}/{jobs}: {seconds[-1] * 1e3:.0f} ms")
    return seconds


def run_mesh(cluster: Any, case: Case, jobs: int) -> tuple[float, list[float]]:
    """(jobs per second with a backlog, each job's attempt seconds)."""
    from client import SubmitOptions

    options = SubmitOptions(
        width=case.size,
        height=case.size,
        steps=case.steps,
        cfg_scale=CFG_SCALE,
        sampler_name=SAMPLER,
    )
    with cluster.client() as client:
        warm = client.submit(PROMPT, seed=FIRST_SEED - 1, **options).wait()
        if not warm.succeeded:
            raise RuntimeError(f"the warm-up job {warm.id} ended {warm.state}: {warm.reason}")
        handles = [
            client.submit(PROMPT, seed=FIRST_SEED + number, **options) for number in range(jobs)
        ]
        finished = []
        for number, handle in enumerate(handles):
            job = handle.wait()
            if not job.succeeded:
                raise RuntimeError(f"job {job.id} ended {job.state}: {job.reason}")
            finished.append(client.get_job(job.id))
            if number % max(1, jobs // 5) == 0 or number == jobs - 1:
                progress(f"  mesh {case.name}: job {number + 1}/{jobs} done")
    ends = sorted(job.finished_at.timestamp() for job in finished if job.finished_at)
    per_second = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
    attempt_seconds = []
    for job in finished:
        attempt = job.attempts[-1]
        assert attempt.started_at is not None and attempt.ended_at is not None
        attempt_seconds.append((attempt.ended_at - attempt.started_at).total_seconds())
    return per_second, attempt_seconds


def start_cluster(root: Path) -> Any:
    from harness.processes import LocalCluster

    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root)
    # `sdctl up` runs the scheduler with its default heartbeat; the harness's
    # short test heartbeat comes first on the command line and is overridden.
    cluster.start_scheduler("--heartbeat", "2")
    cluster.start_agent("agent")
    cluster.wait_for_nodes(1)
    return cluster


def measure(cases: list[Case], quick: bool, root: Path) -> list[dict[str, Any]]:
    direct_seconds: dict[str, list[float]] = {}
    progress("direct diffusers, 1 torch thread")
    direct = Direct(root / "direct" / "models")
    try:
        for case in cases:
            direct_seconds[case.name] = run_direct(
                direct, case, case.quick_jobs if quick else case.jobs
            )
    finally:
        direct.close()
    progress("sdmesh: a scheduler and one agent (OMP_NUM_THREADS=1)")
    cluster = start_cluster(root / "mesh")
    rows = []
    try:
        for case in cases:
            jobs = case.quick_jobs if quick else case.jobs
            mesh_per_second, attempt_seconds = run_mesh(cluster, case, jobs)
            alone = direct_seconds[case.name]
            overheads = [
                (mesh - single) * 1e3 for mesh, single in zip(attempt_seconds, alone, strict=True)
            ]
            direct_per_second = len(alone) / sum(alone)
            rows.append(
                {
                    "name": case.name,
                    "jobs": jobs,
                    "direct_jobs_per_s": direct_per_second,
                    "mesh_jobs_per_s": mesh_per_second,
                    "ratio": mesh_per_second / direct_per_second,
                    "direct_p50_ms": statistics.median(alone) * 1e3,
                    "attempt_p50_ms": statistics.median(attempt_seconds) * 1e3,
                    "overhead_p50_ms": percentile(overheads, 0.5),
                    "overhead_p95_ms": percentile(overheads, 0.95),
                }
            )
    except BaseException:
        progress(cluster.logs())
        raise
    finally:
        cluster.stop()
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
    parser.add_argument("--quick", action="store_true", help="fewer jobs per case")
    parser.add_argument(
        "--case", choices=[c.name for c in CASES], action="append", help="only these cases"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    cases = [c for c in CASES if not args.case or c.name in args.case]
    root = Path(tempfile.mkdtemp(prefix="sdmesh-overhead-"))
    try:
        rows = measure(cases, args.quick, root)
    except BaseException:
        progress(f"failed; the process logs are in {root}")
        raise
    shutil.rmtree(root, ignore_errors=True)
    print("tiny model on the CPU, 1 torch thread, previews on")
    print(table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"quick": args.quick, "cases": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
