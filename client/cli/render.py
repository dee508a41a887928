"""How sdctl prints things: plain kubectl-style tables for people, and JSON
objects for scripts. The README documents every JSON shape made here.

Names, prompts, reasons and ids come from the network, some from agents
nobody vouches for: every one goes through `safe_text` before it reaches a
terminal, and JSON escapes every control character itself."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from client._models import (
    Attempt,
    Device,
    Event,
    Health,
    ImageEvent,
    Job,
    Model,
    Node,
    PreviewEvent,
    ProgressEvent,
    StateEvent,
)
from sdmesh.domain import ImageInfo
from sdmesh.kinds import INPAINTING_FILLS, RESIZE_MODES
from sdmesh.output import json_text, write_json
from sdmesh.spec import JobSpec

GIB = 2**30

# C0 controls (ESC among them), DEL, C1 controls (CSI among them), the line
# and paragraph separators, and the bidirectional marks, embeddings,
# overrides and isolates that make a terminal show text in another order.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """`text` fit for a terminal: each control character shown as its
    escape (ESC as \\x1b, a right-to-left override as \\u202e), so that
    nothing in it moves the cursor, recolours, retitles or reorders the
    screen, and no newline makes a fake row."""
    return _UNSAFE.sub(_escaped, text)


def os_error_text(error: OSError) -> str:
    """An OS error as a person reads it: the file, then why."""
    where = f"{error.filename}: " if error.filename else ""
    return where + (error.strerror or str(error))


def print_json(value: Any) -> None:
    """Indented on a terminal, one line when piped (`sdmesh.output`)."""
    write_json(value)


def print_json_line(value: Any) -> None:
    """One line, always: a stream of events reads a line at a time."""
    sys.stdout.write(json_text(value, indent=False) + "\n")
    sys.stdout.flush()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def age(since: datetime, now: datetime | None = None) -> str:
    seconds = max(0, int(((now or datetime.now(UTC)) - since).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def gib(count: int | None) -> str:
    return "-" if count is None else f"{count / GIB:.1f}"


def image_json(image: ImageInfo) -> dict[str, Any]:
    return asdict(image)


def job_json(job: Job) -> dict[str, Any]:
    spec = job.spec
    return {
        "job_id": job.id,
        "state": job.state,
        "owner": job.owner,
        "node": job.node_name or None,
        "node_id": job.node_id or None,
        "gpu": job.gpu_index if job.gpu_index >= 0 else None,
        "attempt": job.attempt,
        "failures": job.failures,
        "max_attempts": job.max_attempts,
        "reason": job.reason,
        "memory_mode": job.memory_mode,
        "progress": (
            {"step": job.progress.step, "total_steps": job.progress.total_steps}
            if job.progress
            else None
        ),
        "images": [image_json(image) for image in job.images],
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        # Every spec field, as the scheduler resolved it, and each image's seed.
        "spec": {**spec.to_dict(), "kind": spec.kind.value, "seeds": spec.seeds},
        "attempts": [attempt_json(attempt) for attempt in job.attempts],
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "node": attempt.node_name,
        "node_id": attempt.node_id,
        "gpu": attempt.gpu_index,
        "memory_mode": attempt.memory_mode,
        "outcome": attempt.outcome or None,
        "reason": attempt.reason,
        "placement": attempt.placement,
        "vram_estimate_bytes": attempt.vram_estimate_bytes,
        "profile": {
            "queued_seconds": attempt.queued_seconds,
            "load_seconds": attempt.load_seconds,
            "mean_step_seconds": attempt.mean_step_seconds,
            "peak_vram_bytes": attempt.peak_vram_bytes,
        },
        "assigned_at": _iso(attempt.assigned_at),
        "started_at": _iso(attempt.started_at),
        "ended_at": _iso(attempt.ended_at),
    }


def profile_line(attempt: Attempt) -> str:
    """Forge --profile style: where the time and memory went; safe to print."""
    peak = f"{attempt.peak_vram_bytes / GIB:.2f} GiB" if attempt.peak_vram_bytes else "not measured"
    return (
        f"queued {attempt.queued_seconds:.1f}s, model load {attempt.load_seconds:.2f}s, "
        f"{attempt.mean_step_seconds:.3f}s/step, peak VRAM {peak} "
        f"(estimated {attempt.vram_estimate_bytes / GIB:.2f} GiB), "
        f"{safe_text(attempt.node_name)} gpu {attempt.gpu_index}, {attempt.memory_mode}"
    )


def event_json(event: Event) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": event.job_id,
        "seq": event.seq,
        "attempt": event.attempt,
        "time": _iso(event.time),
    }
    if isinstance(event, StateEvent):
        base.update(
            type="state",
            state=event.state,
            reason=event.reason,
            node=event.node_name or None,
            gpu=event.gpu_index if event.gpu_index >= 0 else None,
        )
    elif isinstance(event, ImageEvent):
        base.update(type="image", image=image_json(event.image))
    elif isinstance(event, ProgressEvent):
        base.update(type="progress", step=event.step, total_steps=event.total_steps)
    elif isinstance(event, PreviewEvent):
        base.update(
            type="preview",
            step=event.step,
            total_steps=event.total_steps,
            width=event.width,
            height=event.height,
            png_bytes=len(event.png),
        )
    return base


def node_json(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "hostname": node.hostname,
        "connected": node.connected,
        "draining": node.draining,
        "agent_version": node.agent_version,
        "labels": node.labels,
        "models": node.models,
        "last_seen": _iso(node.last_seen),
        "devices": [
            {
                "index": d.index,
                "name": d.name,
                "uuid": d.uuid,
                "kind": d.kind,
                "total_bytes": d.total_bytes,
                "free_bytes": d.free_bytes,
                "used_bytes": d.used_bytes,
                "utilization_percent": d.utilization_percent,
                "active_jobs": d.active_jobs,
                "resident_models": d.resident_models,
                "megapixel_steps_per_second": d.speeds,
                "healthy": d.healthy,
                "health_detail": d.health_detail,
            }
            for d in node.devices
        ],
    }


def model_json(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "kind": model.kind,
        "family": model.family,
        "weight_bytes": model.weight_bytes,
        "dtype": model.dtype,
        "nodes": model.node_ids,
        "last_seen": _iso(model.last_seen),
    }


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        # Text, not markup: prompts may contain [brackets].
        table.add_row(*(Text(safe_text(cell)) for cell in row))
    console = Console()
    if not console.is_terminal:  # piped: never fold cells to 80 columns
        console = Console(width=10_000)
    console.print(table)


def jobs_table(jobs: list[Job]) -> None:
    rows = [
        [
            job.id,
            job.state,
            job.owner,
            job.spec.model,
            f"{job.spec.width}x{job.spec.height}",
            str(job.spec.steps),
            job.node_name or "-",
            age(job.created_at),
            (job.reason[:60] + "…") if len(job.reason) > 60 else job.reason,
        ]
        for job in jobs
    ]
    print_table(["ID", "STATE", "OWNER", "MODEL", "SIZE", "STEPS", "NODE", "AGE", "REASON"], rows)


def job_detail(job: Job) -> None:
    from rich.console import Console
    from rich.text import Text

    spec = job.spec

    lines = [
        ("Job", job.id),
        ("State", job.state + (f" ({job.reason})" if job.reason else "")),
        ("Owner", job.owner),
        ("Prompt", spec.prompt),
        ("Negative prompt", spec.negative_prompt or "-"),
        ("Model", spec.model),
        ("Size", f"{spec.width}x{spec.height}, batch {spec.batch_size}"),
        ("Sampler", f"{spec.sampler_name}, {spec.steps} steps, CFG {spec.cfg_scale:g}"),
        ("Seed", str(spec.seed) + (f" (images: {spec.seeds})" if spec.images > 1 else "")),
        ("Priority", str(spec.priority)),
        (
            "Node",
            f"{job.node_name} (id {job.node_id}, gpu {job.gpu_index}, {job.memory_mode})"
            if job.node_id
            else "-",
        ),
        ("Attempts", f"{job.attempt} (failures {job.failures} of {job.max_attempts})"),
        (
            "Progress",
            f"step {job.progress.step}/{job.progress.total_steps}" if job.progress else "-",
        ),
        ("Created", _iso(job.created_at) or "-"),
        ("Started", _iso(job.started_at) or "-"),
        ("Finished", _iso(job.finished_at) or "-"),
        (
            "Images",
            ", ".join(f"#{i.index} seed {i.seed} {i.sha256[:12]}" for i in job.images) or "-",
        ),
    ]
    lines[6:6] = kind_lines(spec)
    if spec.selector:
        lines.append(("Selector", ", ".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))))
    if job.attempts:
        last = job.attempts[-1]
        lines.append(("Placed", last.placement or "-"))
        if last.outcome:
            lines.append(("Profile", profile_line(last)))
    for attempt in job.attempts:
        outcome = attempt.outcome or "running"
        why = f": {attempt.reason}" if attempt.reason and attempt.reason != outcome else ""
        lines.append((f"Attempt {attempt.attempt}", f"{outcome}{why}; {profile_line(attempt)}"))
    console = Console(soft_wrap=True, highlight=False)
    for label, value in lines:
        # Text, not markup: A1111 prompts use [brackets] of their own.
        console.print(Text.assemble((f"{label + ':':<17}", "bold"), safe_text(value)))


def kind_lines(spec: JobSpec) -> list[tuple[str, str]]:
    """What `sdctl job` says of a job's kind and its settings, in A1111's
    words; input images by the start of their sha256."""
    lines = [("Kind", spec.kind.value + (" + hires fix" if spec.enable_hr else ""))]
    if spec.init_image:
        lines.append(
            (
                "Init image",
                f"{spec.init_image[:12]}, denoising {spec.denoising_strength:g}, "
                f"{RESIZE_MODES[spec.resize_mode].lower()}",
            )
        )
    if spec.mask:
        lines.append(
            (
                "Mask",
                f"{spec.mask[:12]}{' (inverted)' if spec.inpainting_mask_invert else ''}, "
                f"blur {spec.mask_blur}, fill {INPAINTING_FILLS[spec.inpainting_fill]}"
                + (
                    f", only masked (padding {spec.inpaint_full_res_padding})"
                    if spec.inpaint_full_res
                    else ""
                ),
            )
        )
    if spec.enable_hr:
        width, height = spec.output_size
        lines.append(
            (
                "Hires fix",
                f"to {width}x{height} with {spec.hr_upscaler}, {spec.second_pass_steps} steps, "
                f"denoising {spec.denoising_strength:g}",
            )
        )
    if spec.loras:
        lines.append(("LoRAs", ", ".join(f"{lora.name}:{lora.weight:g}" for lora in spec.loras)))
    for index, unit in enumerate(spec.controlnets):
        lines.append(
            (
                f"ControlNet {index}",
                f"{unit.model}, image {unit.image[:12]}, weight {unit.weight:g}, "
                f"guidance {unit.guidance_start:g}-{unit.guidance_end:g}",
            )
        )
    if spec.n_iter > 1:
        lines.append(("Batches", f"{spec.n_iter} of {spec.batch_size}, one after another"))
    return lines


def node_status(node: Node) -> str:
    """kubectl style: Ready, Ready,Draining or Gone (age)."""
    status = "Ready" if node.connected else f"Gone ({age(node.last_seen)})"
    return status + (",Draining" if node.draining else "")


def device_health(device: Device) -> str:
    if device.healthy:
        return "ok"
    detail = device.health_detail
    detail = (detail[:40] + "…") if len(detail) > 40 else detail
    return f"unhealthy: {detail}" if detail else "unhealthy"


def nodes_table(nodes: list[Node]) -> None:
    rows = []
    for node in nodes:
        status = node_status(node)
        for device in node.devices or []:
            rows.append(
                [
                    node.name,
                    node.id,
                    status,
                    f"{device.index}: {device.name}",
                    device_health(device) if node.connected else "-",
                    f"{gib(device.free_bytes)}/{gib(device.total_bytes)}",
                    "-"
                    if device.utilization_percent is None
                    else f"{device.utilization_percent:.0f}%",
                    str(device.active_jobs),
                    ",".join(device.resident_models) or "-",
                    ",".join(node.models),
                ]
            )
    print_table(
        [
            "NAME",
            "ID",
            "STATUS",
            "DEVICE",
            "HEALTH",
            "FREE/TOTAL GiB",
            "UTIL",
            "JOBS",
            "LOADED",
            "MODELS",
        ],
        rows,
    )


def models_table(models: list[Model]) -> None:
    rows = [
        [
            m.name,
            m.kind,
            m.family or "-",
            f"{m.weight_bytes / GIB:.2f} GiB",
            m.dtype,
            ",".join(m.node_ids) or "-",
        ]
        for m in models
    ]
    print_table(["NAME", "KIND", "FAMILY", "WEIGHTS", "DTYPE", "CONNECTED NODES"], rows)


def drained_line(node: Node, timeout: float | None) -> str:
    """What `sdctl drain` and `sdctl undrain` say happened; safe to print."""
    name = safe_text(node.name)
    if not node.draining:
        return f"node {name} takes work again"
    running = sum(device.active_jobs for device in node.devices)
    if not running:
        return f"node {name} draining: takes no new work, nothing running"
    within = f"{timeout:g}s" if timeout else "the agent's shutdown timeout"
    return (
        f"node {name} draining: takes no new work; {running} running "
        f"job{'s' if running != 1 else ''} finish within {within} or go back to the queue"
    )


@dataclass(frozen=True)
class HealthRow:
    """One address of `sdctl health`: its answer, or why there was none."""

    address: str
    health: Health | None
    error: str = ""
    reachable: bool = True  # False: nothing answered; True with an error: a bad answer

    @property
    def role(self) -> str:
        if self.health is not None:
            return self.health.role
        return "error" if self.reachable else "unreachable"


def health_json(row: HealthRow) -> dict[str, Any]:
    health = row.health
    return {
        "address": row.address,
        "reachable": row.reachable,
        "role": row.role,
        "epoch": health.epoch if health else None,
        "replica_id": (health.replica_id or None) if health else None,
        "leader_address": (health.leader_address or None) if health else None,
        "version": (health.version or None) if health else None,
        "error": row.error or None,
    }


def health_table(rows: list[HealthRow]) -> None:
    print_table(
        ["ADDRESS", "ROLE", "EPOCH", "REPLICA", "LEADER", "ERROR"],
        [
            [
                row.address,
                row.role,
                str(row.health.epoch),
                row.health.replica_id or "-",
                row.health.leader_address or "-",
                "",
            ]
            if row.health
            else [row.address, row.role, "-", "-", "-", _why(row)]
            for row in rows
        ],
    )


def _why(row: HealthRow) -> str:
    """The error without the address the row already names."""
    for prefix in (f"scheduler {row.address} unreachable: ", f"scheduler {row.address}: "):
        if row.error.startswith(prefix):
            return row.error.removeprefix(prefix)
    return row.error or "-"
