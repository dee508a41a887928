"""The user-facing sdctl commands. Each takes the parsed arguments and a
Client and returns the exit code: 0 ok, 1 job failed or cancelled or not
found, 2 invalid input, 3 scheduler unreachable or no leader (raised as
SdmeshError and mapped in main)."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from client._async import SubmitOptions
from client._errors import SdmeshError, UnavailableError
from client._models import Job
from client._sync import Client
from client.cli import render
from client.cli.follow import Follower
from client.cli.labels import parse_labels


def submit_options(args: argparse.Namespace) -> SubmitOptions:
    options: SubmitOptions = {
        "negative_prompt": args.negative,
        "priority": args.priority,
        "memory_mode": args.memory_mode,
        "labels": parse_labels(args.label),
        "selector": parse_labels(args.selector, "--selector"),
    }
    for option, value in (
        ("model", args.model),
        ("width", args.width),
        ("height", args.height),
        ("steps", args.steps),
        ("cfg_scale", args.cfg_scale),
        ("seed", args.seed),
        ("sampler_name", args.sampler),
        ("batch_size", args.batch_size),
        ("request_id", args.request_id),
    ):
        if value is not None:
            options[option] = value  # type: ignore[literal-required]
    return options


def exit_code(job: Job) -> int:
    return 0 if job.succeeded else 1


def _save(client: Client, job: Job, directory: Path) -> list[Path]:
    """Downloads the job's images as DIRECTORY/<job id>-<index>.png."""
    return [
        client.download_image(job.id, info.index).save(directory / f"{job.id}-{info.index}.png")
        for info in job.images
    ]


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
        follower.console.print(
            f"stopped watching; job {handle.id} continues. "
            f"Follow it with `sdctl watch {handle.id}`, stop it with `sdctl cancel {handle.id}`",
            markup=False,
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
        print(f"job {job.id} {job.state}: {job.reason}", file=sys.stderr)
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
    node = client.drain_node(args.node, timeout=args.timeout)
    if args.output == "json":
        render.print_json(render.node_json(node))
    else:
        print(render.drained_line(node, args.timeout))
    return 0


def undrain(args: argparse.Namespace, client: Client) -> int:
    node = client.drain_node(args.node, undo=True)
    if args.output == "json":
        render.print_json(render.node_json(node))
    else:
        print(render.drained_line(node, None))
    return 0


def _ask(client: Client, address: str) -> render.HealthRow:
    try:
        return render.HealthRow(address, client.health(address))
    except UnavailableError as exc:
        return render.HealthRow(address, None, str(exc), reachable=False)
    except SdmeshError as exc:
        return render.HealthRow(address, None, f"scheduler {address}: {exc}")


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
    "nodes": nodes,
    "models": models,
    "drain": drain,
    "undrain": undrain,
    "health": health,
}
