"""The sdmesh Python SDK.

    from client import Client

    with Client() as sd:
        job = sd.submit("a lighthouse at dusk", steps=20)
        for event in job.events():
            print(event)
        paths = job.save_images("outputs")

`AsyncClient` is the same API for asyncio. Neither imports torch.
"""

from client._async import AsyncClient, AsyncJobHandle, SubmitOptions
from client._errors import (
    InvalidArgumentError,
    JobFailedError,
    NotFoundError,
    RejectedError,
    SdmeshError,
    UnavailableError,
)
from client._models import (
    Attempt,
    Device,
    Event,
    Image,
    ImageEvent,
    ImageInfo,
    Job,
    JobSpec,
    Model,
    Node,
    PreviewEvent,
    Progress,
    ProgressEvent,
    StateEvent,
)
from client._sync import Client, JobHandle

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "Attempt",
    "Client",
    "Device",
    "Event",
    "Image",
    "ImageEvent",
    "ImageInfo",
    "InvalidArgumentError",
    "Job",
    "JobFailedError",
    "JobHandle",
    "JobSpec",
    "Model",
    "Node",
    "NotFoundError",
    "PreviewEvent",
    "Progress",
    "ProgressEvent",
    "RejectedError",
    "SdmeshError",
    "StateEvent",
    "SubmitOptions",
    "UnavailableError",
]
