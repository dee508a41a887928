"""The sdmesh Python SDK.

    from client import Client

    with Client() as sd:
        job = sd.submit("a lighthouse at dusk", steps=20)
        for event in job.events():
            print(event)
        paths = job.save_images("outputs")

`AsyncClient` is the same API for asyncio. Neither imports torch. Both take
several scheduler addresses ("host1:50051,host2:50051") and ride out a
restart or failover: calls are retried on the next address, and a watch
resumes after the last event it gave.
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
    Health,
    Image,
    ImageEvent,
    Job,
    Model,
    Node,
    PreviewEvent,
    ProgressEvent,
    StateEvent,
)
from client._sync import Client, JobHandle
from sdmesh.domain import ImageInfo, Progress
from sdmesh.spec import JobSpec

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "Attempt",
    "Client",
    "Device",
    "Event",
    "Health",
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
