"""The user-facing sdctl commands. Each takes the parsed arguments and a
Client and returns the exit code: 0 ok, 1 job failed or cancelled or not
found, 2 invalid input, 3 scheduler unreachable or no leader, 4 not
authenticated or not allowed, 5 a limit was hit (raised as SdmeshError and
mapped in main).

`submit` and `watch` follow a job's events on stderr with `Follower`: a
progress bar with step, ETA and node on a terminal, and one line per state
change everywhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from client._errors import (
    NotFoundError,
    PermissionDeniedError,
    RejectedError,
    SdmeshError,
    UnavailableError,
)
from client._models import Event, ImageEvent, Job, PreviewEvent, ProgressEvent, StateEvent
from client._sync import Client
from client.cli import render
from client.cli.options import options_from
from client.cli.render import safe_text
from sdmesh.spec import SpecRequest


@dataclass
class Followed:
    state: str = "QUEUED"
    reason: str = ""
    node: str = ""
    attempt: int = 0
    previews: int = 0
    last_step: int = 0
    steps_seen: list[int] | None = None


class Follower:
    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self.job_id = job_id
        self.console = console or Console(stderr=True, highlight=False)
        self.result = Followed(steps_seen=[])
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
            transient=False,
        )
        self._task: TaskID | None = None
        self._lost = False  # the scheduler was lost and no event has come since

    def _describe(self) -> str:
        if self._lost:
            return f"{self.job_id} reconnecting to the scheduler…"
        where = f" on {safe_text(self.result.node)}" if self.result.node else ""
        return f"{self.job_id} {self.result.state.lower()}{where}"

    def reconnecting(self, address: str, error: SdmeshError) -> None:
        """The client's on_retry hook (called on its own thread): says once
        per outage that the scheduler was lost, and shows it on the bar."""
        if not self._lost:
            self.console.print(
                f"{self.job_id} lost the scheduler ({safe_text(str(error))}); "
                "reconnecting to the scheduler…",
                markup=False,
                soft_wrap=True,  # one line in logs, however long the error
            )
        self._lost = True
        if self._task is not None:
            self._progress.update(self._task, description=self._describe())

    def _reconnected(self) -> None:
        self._lost = False
        self.console.print(f"{self.job_id} reconnected to the scheduler", markup=False)

    def _on_state(self, event: StateEvent) -> None:
        result = self.result
        result.state, result.reason = event.state, event.reason
        if event.node_name:
            result.node = event.node_name
        if event.attempt != result.attempt:
            result.attempt = event.attempt
            if self._task is not None:  # a retry starts over
                self._progress.reset(self._task)
        message = f"{self.job_id} {event.state}"
        if event.state in ("ASSIGNED", "RUNNING") and event.node_name:
            message += (
                f" on {safe_text(event.node_name)} gpu {event.gpu_index} (attempt {event.attempt})"
            )
        if event.reason:
            message += f": {safe_text(event.reason)}"
        self.console.print(message, markup=False)

    def follow(self, events: Iterator[Event]) -> Followed:
        with self._progress:
            self._task = self._progress.add_task(self._describe(), total=None)
            for event in events:
                if self._lost:
                    self._reconnected()
                if isinstance(event, StateEvent):
                    self._on_state(event)
                elif isinstance(event, ProgressEvent):
                    self.result.last_step = event.step
                    assert self.result.steps_seen is not None
                    self.result.steps_seen.append(event.step)
                    self._progress.update(self._task, total=event.total_steps, completed=event.step)
                elif isinstance(event, PreviewEvent):
                    self.result.previews += 1
                elif isinstance(event, ImageEvent):
                    self.console.print(
                        f"{self.job_id} image {event.image.index} stored (seed {event.image.seed})",
                        markup=False,
                    )
                self._progress.update(self._task, description=self._describe())
                if isinstance(event, StateEvent) and event.terminal:
                    break
        return self.result


def exit_code(job: Job) -> int:
    return 0 if job.succeeded else 1


def _save(client: Client, job: Job, directory: Path) -> list[Path]:
    """Downloads the job's images as DIRECTORY/<job id>-<index>.png."""
    return [
        client.download_image(job.id, info.index).save(directory / f"{job.id}-{info.index}.png")
        for info in job.images
    ]


# The hires fix's settings; any of their flags turns the fix on.
HIRES_OPTIONS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps")


def submit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The spec flags given, and only those: the scheduler applies the
    defaults of the rest. `--hires-*` imply `--hires`. The image flags
    (--init-image, --mask, --controlnet's IMAGE) are paths the SDK checks
    and uploads."""
    options = options_from(SpecRequest, args, skip=("prompt",))
    if any(name in options for name in HIRES_OPTIONS):
        options["enable_hr"] = True
    return options


def submit(args: argparse.Namespace, client: Client) -> int:
    handle = client.submit(args.prompt, **submit_options(args))
    if args.no_wait:
        job = handle.last_known
        assert job is not None
        if args.output == "json":
            render.print_json({"job_id": job.id, "state": job.state})
        else:
            print(f"job {job.id} {job.state}")
        return 0
    follower = Follower(handle.id)
    client.on_retry = follower.reconnecting
    try:
        followed = follower.follow(handle.events())
    except KeyboardInterrupt:
        # Each command on a line of its own, never wrapped: to copy and paste.
        follower.console.print(
            f"stopped watching; job {handle.id} goes on\n"
            f"  follow it:  sdctl watch {handle.id}\n"
            f"  cancel it:  sdctl cancel {handle.id}",
            markup=False,
            soft_wrap=True,
        )
        return 130
    job = handle.refresh()
    paths = _save(client, job, Path(args.output_dir)) if job.succeeded else []
    if args.output == "json":
        render.print_json(
            {
                "job_id": job.id,
                "state": job.state,
                "images": [str(path) for path in paths],
                "seeds": [image.seed for image in job.images] or job.spec.seeds,
                "previews": followed.previews,
                "node": job.node_name or None,
                "attempts": job.attempt,
                "reason": job.reason,
            }
        )
    elif job.succeeded:
        for path in paths:
            print(path)
    else:
        print(f"job {job.id} {job.state}: {safe_text(job.reason)}", file=sys.stderr)
    return exit_code(job)


def watch(args: argparse.Namespace, client: Client) -> int:
    events = client.watch(args.job_id, args.after_seq)
    if args.output == "json":
        for event in events:
            render.print_json_line(render.event_json(event))
    else:
        follower = Follower(args.job_id)
        client.on_retry = follower.reconnecting
        follower.follow(events)
    return exit_code(client.get_job(args.job_id))


def jobs(args: argparse.Namespace, client: Client) -> int:
    found = client.list_jobs(states=args.state, owner=args.owner or "", limit=args.limit)
    if args.output == "json":
        render.print_json([render.job_json(job) for job in found])
    else:
        render.jobs_table(found)
    return 0


def job(args: argparse.Namespace, client: Client) -> int:
    found = client.get_job(args.job_id)
    if args.output == "json":
        render.print_json(render.job_json(found))
    else:
        render.job_detail(found)
    return 0


def images(args: argparse.Namespace, client: Client) -> int:
    found = client.get_job(args.job_id)
    if not found.images:
        if args.output == "json":
            render.print_json([])
        print(f"job {found.id} is {found.state} and has no images", file=sys.stderr)
        return 1
    paths = _save(client, found, Path(args.output_dir))
    if args.output == "json":
        render.print_json(
            [
                {**render.image_json(info), "path": str(path)}
                for info, path in zip(found.images, paths, strict=True)
            ]
        )
    else:
        for path in paths:
            print(path)
    return 0


def cancel(args: argparse.Namespace, client: Client) -> int:
    before = client.get_job(args.job_id)
    after = client.cancel(args.job_id)
    if args.output == "json":
        render.print_json(render.job_json(after))
    elif before.done:
        print(f"job {after.id} had already ended: {after.state}")
    else:
        print(f"job {after.id} {after.state}")
    return 0


def _images(count: int) -> str:
    return "no images" if count == 0 else f"{count} image{'s' if count > 1 else ''}"


def delete(args: argparse.Namespace, client: Client) -> int:
    """Deletes each job in turn, as `rm` does: a job that is not there or
    not yours is one line on stderr, the others still go, and the exit code
    is that of the worst. Losing the scheduler stops them all."""
    code = 0
    deleted: list[dict[str, Any]] = []
    for job_id in dict.fromkeys(args.job_ids):
        try:
            count = client.delete(job_id)
        except (NotFoundError, PermissionDeniedError, RejectedError) as exc:
            print(f"error: job {safe_text(job_id)}: {safe_text(str(exc))}", file=sys.stderr)
            code = max(code, exc.exit_code)
            continue
        deleted.append({"job_id": job_id, "images_deleted": count})
        if args.output != "json":
            print(f"job {job_id} deleted with {_images(count)}")
    if args.output == "json":
        render.print_json(deleted)
    return code


def nodes(args: argparse.Namespace, client: Client) -> int:
    found = client.list_nodes()
    if args.output == "json":
        render.print_json([render.node_json(node) for node in found])
    else:
        render.nodes_table(found)
    return 0


def models(args: argparse.Namespace, client: Client) -> int:
    found = client.list_models()
    if args.output == "json":
        render.print_json([render.model_json(model) for model in found])
    else:
        render.models_table(found)
    return 0


def drain(args: argparse.Namespace, client: Client) -> int:
    """`drain` and `undrain`: the command's name says which."""
    undo = args.command == "undrain"
    timeout = None if undo else args.timeout
    node = client.drain_node(args.node, timeout=timeout, undo=undo)
    if args.output == "json":
        render.print_json(render.node_json(node))
    else:
        print(render.drained_line(node, timeout))
    return 0


def _ask(client: Client, address: str) -> render.HealthRow:
    try:
        return render.HealthRow(address, client.health(address))
    except UnavailableError as exc:
        return render.HealthRow(address, None, str(exc), reachable=False)
    except SdmeshError as exc:
        return render.HealthRow(address, None, f"scheduler {address}: {safe_text(str(exc))}")


def health(args: argparse.Namespace, client: Client) -> int:
    """Asks every address at once; exits 0 if one of them is the leader."""
    addresses = client.addresses
    with ThreadPoolExecutor(len(addresses)) as pool:
        rows = list(pool.map(lambda address: _ask(client, address), addresses))
    if args.output == "json":
        render.print_json([render.health_json(row) for row in rows])
    else:
        render.health_table(rows)
    if any(row.health is not None and row.health.leader for row in rows):
        return 0
    print(f"error: no leader among {', '.join(addresses)}", file=sys.stderr)
    return UnavailableError.exit_code


COMMANDS: dict[str, Any] = {
    "submit": submit,
    "watch": watch,
    "jobs": jobs,
    "job": job,
    "images": images,
    "cancel": cancel,
    "delete": delete,
    "nodes": nodes,
    "models": models,
    "drain": drain,
    "undrain": drain,
    "health": health,
}
