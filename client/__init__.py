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
resumes after the last event it gave. Both send an API key (`api_key=` or
SDMESH_API_KEY) and dial over TLS given a CA (`ca_cert=` or SDMESH_CA_CERT).
"""

import os

# gRPC's core writes its own INFO lines to stderr (each failed TLS handshake,
# for one), ahead of the one-line error the SDK raises; only its errors
# unless asked (GRPC_VERBOSITY=INFO). It reads this once, when grpc is first
# imported: so here, before anything imports it. Every sdctl process,
# servers included, starts by importing this package.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from client._async import AsyncClient, AsyncJobHandle, SubmitOptions
from client._errors import (
    AuthenticationError,
    InvalidArgumentError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    RejectedError,
    ResourceExhaustedError,
    SdmeshError,
    TlsError,
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
    "AuthenticationError",
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
    "PermissionDeniedError",
    "PreviewEvent",
    "Progress",
    "ProgressEvent",
    "RejectedError",
    "ResourceExhaustedError",
    "SdmeshError",
    "StateEvent",
    "SubmitOptions",
    "TlsError",
    "UnavailableError",
]
