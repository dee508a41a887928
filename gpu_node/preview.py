"""Live previews: latents mapped to RGB by a fixed linear map, never a VAE
decode (a decode costs about five denoising steps; this costs ~2 ms).

`Previewer` takes latents from the compute thread's step callback, which
only hands them off, and encodes PNGs on another thread. It keeps to a rate
limit, but the first and last steps always get a preview. Latents on a CUDA
card are copied to host memory without waiting for the card: the encoding
thread waits for the copy, so the compute thread can queue the next step's
kernels at once.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sdmesh.domain import Preview

log = logging.getLogger(__name__)

# SD1.5's latent -> RGB factors, one row per latent channel.
SD15_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
MAX_PREVIEW_SIDE = 128
MAX_PREVIEWS_PER_SECOND = 8.0
_factors: Any = None


def latents_to_png(latents: Any) -> tuple[bytes, int, int]:
    """(png, width, height) for one image's latents, shaped (4, h, w)."""
    import torch
    from PIL import Image

    global _factors
    if _factors is None:
        _factors = torch.tensor(SD15_LATENT_RGB, dtype=torch.float32)
    factors = _factors
    channels = latents.shape[0]
    if channels == factors.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", latents.float(), factors)
    else:
        # Another latent space: show its first channel as grey levels.
        rgb = latents[:1].float().repeat(3, 1, 1).permute(1, 2, 0)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    if max(image.size) > MAX_PREVIEW_SIDE:
        image.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image.width, image.height


def host_copy(tensor: Any) -> tuple[Any, Any]:
    """A copy of `tensor` in host memory, and the CUDA event to wait on
    before reading it (None when it is ready now). The compute thread's next
    kernels may overwrite the source, but they are queued behind the copy."""
    import torch

    if tensor.device.type != "cuda":
        return tensor.to("cpu", copy=True), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
    copied.record(torch.cuda.current_stream(tensor.device))
    return host, copied


class Previewer:
    """One per job attempt. `offer` runs on the compute thread."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        emit: Callable[[Preview], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        max_per_second: float = MAX_PREVIEWS_PER_SECOND,
    ) -> None:
        self._executor = executor
        self._emit = emit
        self._clock = clock
        self._interval = 1.0 / max_per_second
        self._last_sent = -1e18
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()

    def due(self, step: int, total_steps: int) -> bool:
        return step == 1 or step >= total_steps or self._clock() - self._last_sent >= self._interval

    def offer(self, step: int, total_steps: int, latents: Any) -> None:
        """Hands the first image's latents off if a preview is due."""
        if getattr(latents, "ndim", 0) != 4 or not self.due(step, total_steps):
            return  # packed latents (FLUX-class) have no spatial layout to show
        self._last_sent = self._clock()
        snapshot, copied = host_copy(latents[0].detach())
        future = self._executor.submit(self._encode, step, total_steps, snapshot, copied)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]

    def _encode(self, step: int, total_steps: int, latents: Any, copied: Any) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            png, width, height = latents_to_png(latents)
        except Exception:  # a preview is news: the job goes on without it
            log.exception("preview of step %d failed", step)
            return
        self._emit(Preview(step, total_steps, width, height, png))

    def flush(self) -> None:
        """Waits until every offered preview has been emitted."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()
