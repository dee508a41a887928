"""The agent's settings, each declared once with its `sdctl node` flag (see
`sdmesh.flags`). Light on purpose: sdctl imports it to build its flags
without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdmesh.flags import option, pairs_option, parse_duration, parse_indexes
from sdmesh.wire import parse_addresses

SHUTDOWN_TIMEOUT_SECONDS = 30.0
# An agent that has never got through gives up on a mistake waiting cannot
# mend (a TLS mismatch, a name that does not resolve) after this long.
RECONNECT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class AgentConfig:
    # The scheduler's replicas: one address, or several separated by commas.
    # Not a flag of `sdctl node` (it has no help to declare one): it is
    # sdctl's global --scheduler.
    scheduler: str = field()
    data_dir: Path = option(help="default ~/.local/share/sdmesh/node", parse=Path, metavar="DIR")
    models_dir: Path | None = option(
        None,
        metavar="DIR",
        help="folder of diffusers model folders, with loras/NAME.safetensors and controlnet/NAME/",
        parse=Path,
    )
    tiny_variants: bool = option(
        False,
        help="also offer the tiny model's offline variants, built in the data dir like tiny: "
        "tiny-inpaint, the ControlNet tiny-canny and the LoRA tiny-lora (for tests and demos)",
    )
    name: str | None = option(None, help="display name (default hostname-gpuN)")
    labels: dict[str, str] = pairs_option(
        flag="--label", help="a node label jobs can select with --selector; repeatable"
    )
    gpus: tuple[int, ...] | None = option(
        None,
        parse=parse_indexes,
        metavar="INDEXES",
        help="device indexes to use, e.g. 0,1 (default: all)",
    )
    # SIGTERM lets running jobs finish for this long, then hands them back.
    shutdown_timeout: float = option(
        SHUTDOWN_TIMEOUT_SECONDS,
        parse=parse_duration,
        help="on SIGTERM, running jobs get this long to finish before they are handed back "
        "(default 30s); a second SIGTERM hands them back at once",
    )
    # Not a flag declared here: sdctl's global --reconnect-timeout, which
    # `sdctl node` shows with this meaning.
    reconnect_timeout: float = field(default=RECONNECT_TIMEOUT_SECONDS)
    # ---- security: enrollment and TLS (see README, "Security") ----
    join_token: str = option(
        "",
        metavar="TOKEN",
        help="a token from `sdctl admin join-token`, presented once to enroll this node "
        "(default: $SDMESH_JOIN_TOKEN); the credential it earns is kept in the data dir",
    )
    ca_cert: Path | None = option(
        None, parse=Path, metavar="PEM", help="verify the scheduler's TLS certificate with this CA"
    )
    tls_cert: Path | None = option(
        None, parse=Path, metavar="PEM", help="this node's certificate, for mutual TLS"
    )
    tls_key: Path | None = option(None, parse=Path, metavar="PEM", help="the key of --tls-cert")
    # Simulated GPUs, for tests and benchmarks (see gpu_node.simulated).
    simulate_gpus: str = option(
        "", metavar="SIZES", help="simulated cards instead of real ones: 24GiB,12GiB"
    )
    simulate_speed: str = option("1.0", metavar="FACTORS", help="per card, e.g. 1.0,0.5")
    simulate_models: str = option(
        "", metavar="NAME=SIZE,...", help="synthetic models, e.g. sdxl=6.9GiB"
    )
    simulate_time_scale: float = option(
        1.0,
        parse=float,
        help="multiplies every simulated wait (loads, steps); 0.01 for fast tests",
    )
    simulate_step_delay: float = option(
        0.0,
        parse=float,
        metavar="SECONDS",
        help="real seconds added to every simulated step, to keep jobs mid-flight in tests",
    )
    simulate_hang: str = option(
        "",
        metavar="STEP:SECONDS",
        help="each simulated card hangs once, at this step, for this long",
    )
    simulate_poison: str = option(
        "",
        metavar="TEXT",
        help="a job whose prompt holds TEXT kills this agent (SIGKILL) at its first step",
    )

    @property
    def addresses(self) -> list[str]:
        return parse_addresses(self.scheduler)

    @property
    def simulated(self) -> bool:
        return bool(self.simulate_gpus)

    def check(self) -> None:
        """Raises ValueError for settings that contradict each other."""
        try:
            addresses = self.addresses
        except ValueError as exc:
            raise ValueError(f"--scheduler: {exc}") from None
        if not addresses:
            raise ValueError("--scheduler: no scheduler address given")
        if self.models_dir is not None and not self.models_dir.is_dir():
            # Said now, not after torch has loaded.
            raise ValueError(f"--models-dir {self.models_dir} is not a folder")
        if (self.tls_cert or self.tls_key) and not self.ca_cert:
            raise ValueError("--tls-cert and --tls-key (mutual TLS) need --ca-cert")
        if not self.simulated:
            for name in ("simulate_models", "simulate_hang", "simulate_poison"):
                if getattr(self, name):
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(f"{flag} needs --simulate-gpus: only simulated GPUs have it")
