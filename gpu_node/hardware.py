"""Which devices and models an agent offers, from its settings: the cards
`--gpus` names, simulated ones (`--simulate-gpus`) instead of real ones,
and the synthetic models simulated cards run."""

from __future__ import annotations

from gpu_node.config import AgentConfig
from gpu_node.probe import Probe
from gpu_node.simulated import SimulatedProbe, parse_models
from sdmesh.domain import DeviceInfo


def select_devices(devices: list[DeviceInfo], wanted: tuple[int, ...] | None) -> list[DeviceInfo]:
    """The devices `--gpus` names (all when it is not given)."""
    if wanted is None:
        return devices
    by_index = {device.index: device for device in devices}
    missing = [index for index in wanted if index not in by_index]
    if missing:
        have = ", ".join(str(index) for index in sorted(by_index)) or "none"
        raise ValueError(
            f"--gpus {','.join(map(str, wanted))}: no device {missing[0]}; this host has {have}"
        )
    return [by_index[index] for index in sorted(set(wanted))]


def synthetic_models(config: AgentConfig) -> dict[str, int]:
    """The synthetic models simulated cards offer (--simulate-models)."""
    return parse_models(config.simulate_models) if config.simulate_models else {}


def configured_probe(config: AgentConfig) -> Probe | None:
    """Simulated cards when the config asks for them; None: detect."""
    if not config.simulated:
        return None
    return SimulatedProbe.from_flags(
        config.simulate_gpus,
        config.simulate_speed,
        config.simulate_time_scale,
        step_delay=config.simulate_step_delay,
        hang=config.simulate_hang,
        poison=config.simulate_poison,
    )
