"""Every kind of job on the CPU, end to end: the time of a 64 px and a
512 px job of each kind, and what loading a LoRA and a ControlNet costs.

    python -m bench.kinds            # 64 and 512 px, 20 steps (A1111's default)
    python -m bench.kinds --quick    # 64 px only, 8 steps

A real scheduler (SQLite) and one agent, as separate processes, with the
tiny model and its offline variants (`--tiny-variants`: an inpainting
model, the ControlNet `tiny-canny`, the LoRA `tiny-lora`), one torch
thread, jobs through the SDK one at a time. For each job it reports the
seconds the agent ran it (from the attempt's start to its end, its PNGs
included) and the attempt's load seconds: the first LoRA job's load is
the LoRA's (the base model is resident by then), and the first
ControlNet job's is the ControlNet's. The side-by-side comparison is the
kinds against txt2img of the same size and steps, in the same run.

It prints a table and writes bench/results/kinds.json:
`{"jobs": [{"kind", "size", "steps", "run_seconds", "load_seconds",
"vs_txt2img"}], "lora_load_seconds", "controlnet_load_seconds"}`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw

from client import Client
from harness.processes import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results" / "kinds.json"


def picture(size: int) -> bytes:
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    ImageDraw.Draw(image).rectangle(
        (size // 4, size // 4, size // 2, size // 2), fill=(200, 30, 30)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask(size: int) -> bytes:
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), 255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def kinds(size: int) -> list[tuple[str, dict[str, Any]]]:
    init = picture(size)
    return [
        ("txt2img", {}),
        ("img2img", {"init_image": init, "denoising_strength": 0.75}),
        ("inpaint", {"init_image": init, "mask": mask(size), "denoising_strength": 0.75}),
        ("hires fix x2", {"enable_hr": True, "hr_scale": 2.0, "denoising_strength": 0.5}),
        ("lora", {"loras": [("tiny-lora", 0.8)]}),
        ("controlnet", {"controlnets": [{"model": "tiny-canny", "image": init}]}),
        ("n_iter 2", {"n_iter": 2}),
    ]


def run_job(client: Client, size: int, steps: int, options: dict[str, Any]) -> tuple[float, float]:
    handle = client.submit(
        "a lighthouse at dusk", width=size, height=size, steps=steps, seed=1, **options
    )
    job = handle.wait()
    if job.state != "SUCCEEDED":
        raise SystemExit(f"job {job.id} ended {job.state}: {job.reason}")
    attempt = client.get_job(job.id).attempts[-1]
    assert attempt.started_at is not None and attempt.ended_at is not None
    return (attempt.ended_at - attempt.started_at).total_seconds(), attempt.load_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px only, 8 steps")
    args = parser.parse_args()
    sizes, steps = ((64,), 8) if args.quick else ((64, 512), 20)
    rows: list[dict[str, Any]] = []
    loads: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-kinds-") as root:
        cluster = LocalCluster(Path(root))
        try:
            cluster.start_scheduler()
            cluster.start_agent("agent", "--tiny-variants")
            cluster.wait_for_nodes(1)
            with cluster.client("bench", timeout=600.0) as client:
                run_job(client, 64, 2, {})  # loads tiny: every row below starts warm
                for size in sizes:
                    plain = 0.0
                    for kind, options in kinds(size):
                        seconds, load = run_job(client, size, steps, options)
                        if kind == "txt2img":
                            plain = seconds
                        for needs in ("lora", "controlnet"):
                            if kind == needs and needs not in loads:
                                loads[needs] = load
                        rows.append(
                            {
                                "kind": kind,
                                "size": size,
                                "steps": steps,
                                "run_seconds": round(seconds, 3),
                                "load_seconds": round(load, 3),
                                "vs_txt2img": round(seconds / plain, 2) if plain else None,
                            }
                        )
                        print(
                            f"{kind:>14} {size:>4}px {steps:>3} steps: {seconds:7.2f}s "
                            f"(load {load:.2f}s, {rows[-1]['vs_txt2img']}x txt2img)",
                            flush=True,
                        )
        finally:
            cluster.stop()
    result = {
        "jobs": rows,
        "lora_load_seconds": loads.get("lora"),
        "controlnet_load_seconds": loads.get("controlnet"),
    }
    print(
        f"first LoRA load {loads.get('lora', 0):.3f}s, first ControlNet load {loads.get('controlnet', 0):.3f}s"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
