"""A1111 sampler names and the diffusers schedulers that implement them.

Pure data: the scheduler checks names against it at submit, and the agent
builds the diffusers scheduler from it. Class names are strings so that
nothing here imports diffusers. The mapping follows the diffusers
documentation's table of A1111/k-diffusion equivalents. "DPM++ SDE" is left
out: its diffusers scheduler needs torchsde, which agents do not install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str  # the A1111 name, as written in infotext
    scheduler_class: str  # a class in the diffusers package
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    Sampler("LMS Karras", "LMSDiscreteScheduler", _KARRAS),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
    Sampler("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
    Sampler("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS),
    Sampler(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
        aliases=("k_dpmpp_2m_sde",),
    ),
    Sampler(
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    Sampler("DPM++ 2S a Karras", "DPMSolverSinglestepScheduler", _KARRAS),
    Sampler("DDIM", "DDIMScheduler", aliases=("ddim",)),
    # As in SD1.5's own scheduler config: plain PLMS, no Runge-Kutta warm-up.
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms",)),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
    Sampler("DEIS", "DEISMultistepScheduler", aliases=("deis",)),
    Sampler("LCM", "LCMScheduler", aliases=("lcm",)),
)

_BY_KEY: dict[str, Sampler] = {}
for _sampler in SAMPLERS:
    for _key in (_sampler.name, *_sampler.aliases):
        _BY_KEY[_key.casefold()] = _sampler


def find_sampler(name: str) -> Sampler | None:
    """The sampler for an A1111 name or k-diffusion alias, ignoring case."""
    return _BY_KEY.get(name.strip().casefold())


def sampler_names() -> list[str]:
    return [sampler.name for sampler in SAMPLERS]
