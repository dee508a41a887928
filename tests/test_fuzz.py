"""Fuzzing the scheduler's public surface over real gRPC.

Hypothesis drives every method of the client-facing `Scheduler` service and
the agent side (`AgentGateway.Enroll` and the `Connect` stream) of one
in-process scheduler per database, with keys and enrollment on: malformed,
extreme and odd input (NUL bytes, RTL marks, megabyte strings, int64
extremes, NaN and infinities, invalid enum values, forged page tokens,
random bytes as images and previews, updates about other nodes' jobs), as
a user, an admin, nobody and a garbage key.

What must hold, over the whole run:
- no call ends INTERNAL or UNKNOWN, or with any status but the ones a
  caller can act on (DEADLINE_EXCEEDED only on a WatchJob cut off on
  purpose), and the scheduler logs no error; the crashes it found before
  (FOUND_CRASHES) are each replayed by `test_a_crash_found_by_fuzzing`;
- no invalid job is accepted: every accepted submit, read back, has every
  field within the limits of `sdmesh.spec`, and a valid spec is not
  refused as invalid;
- a user sees and acts only on their own jobs; a stored image is a real
  PNG of its job's size, whatever the agents sent;
- afterwards the scheduler still leads, takes a valid submit, and an agent
  can still connect and run a job to its PNG.

The counts by status code are printed at the end of each run and written to
fuzz_counts.json in the test's tmp dir (and, over both databases, in the
session's base tmp dir). The run is the same every time (derandomized, no
example database); SDMESH_FUZZ_SCALE=10 runs ten times as many examples.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc import aio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir, storage_directory
from PIL import Image

from protos import agent_pb2, agent_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.server import SchedulerServer
from sdmesh.samplers import SAMPLERS, sampler_names
from sdmesh.spec import (
    LABEL_KEY,
    LABEL_VALUE,
    MAX_BATCH_SIZE,
    MAX_CFG_SCALE,
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_MODEL_NAME_CHARS,
    MAX_PRIORITY,
    MAX_PROMPT_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_CFG_SCALE,
    MIN_PRIORITY,
    MIN_SIZE,
)
from tests.databases import database
from tests.scripted import GIB, ScriptedAgent, hello, running_scheduler, upload_chunks

Code = grpc.StatusCode
ALLOWED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.ALREADY_EXISTS,
        Code.OUT_OF_RANGE,
    }
)
SCALE = float(os.environ.get("SDMESH_FUZZ_SCALE", "1"))
EXAMPLES = {"sqlite": int(1200 * SCALE), "postgres": int(900 * SCALE)}
MIN_REQUESTS_PER_RUN = 2000  # over both databases
UNARY_TIMEOUT = 15.0
WATCH_TIMEOUT = 0.25  # a watch of a live job never ends by itself
STREAM_TIMEOUT = 15.0
ASSIGNMENT_WAIT = 0.1  # for the first assignment after a welcome (it comes at once)
FINAL_MODEL = "fuzz-final"
RESULTS: dict[str, dict[str, Any]] = {}

# ---- strategies: text -----------------------------------------------------

ODD = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 64,
    "\t\n\r",
    "\x1b[31mred\x1b[0m",
    "\x7f\x85\x9f",
    "\u202eevil\u202c",
    "\u200f\u200e\u061c",
    "שלום עולם",
    "مرحبا",
    "\ufeffbom",
    "\u2028\u2029",
    "\ufffe\uffff",
    "\U0010ffff",
    "\U0001f600" * 20,
    "e\u0301\u0301\u0301",
    "\\x00\\u0000%00",
    "%s%n%x{0}",
    "'; DROP TABLE jobs; --",
    "../../../etc/passwd",
    "${jndi:ldap://x/a}",
    "null",
    "tiny",
    " tiny ",
    "TINY",
    "tiny\x00",
    "tiny\u3000",
    "Euler a",
    "k_EULER_A",
    " euler ",
    "Ω≈ç√∫",
    "zone",
    "a",
    "a" * 63,
    "a" * 64,
    "a" * 128,
    "a" * 129,
]
HUGE_UNITS = ["x", "é", "\U0001f600", "\x00", " ", "\u202e", "a\u0301", "ab\n"]
HUGE_SIZES = [MAX_PROMPT_CHARS + 1, 10_000, 65_536, 262_144, 1_000_000]

# codec="utf-8": no surrogates, which protobuf cannot encode
odd_text = st.text(st.characters(codec="utf-8"), max_size=40)
special_text = st.sampled_from(ODD)
huge_text = st.builds(
    lambda unit, size: (unit * size)[:size],
    st.sampled_from(HUGE_UNITS),
    st.sampled_from(HUGE_SIZES),
)
fuzz_text = st.one_of(odd_text, special_text, odd_text, special_text, huge_text)
short_fuzz_text = st.one_of(odd_text, special_text)
ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)

# ---- strategies: numbers --------------------------------------------------

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_EDGES = [0, -1, 1, 7, 8, 63, 64, 65, 100, 101, -100, -101, 150, 151, 2048, 2049, 2056]
INT32_EDGES += [INT32_MIN, INT32_MAX, INT32_MAX - 1, INT32_MIN + 1, 2**16, -(2**16)]
INT64_EDGES = [*INT32_EDGES, INT64_MIN, INT64_MAX, 2**31, 2**32 - 1, 2**32, 2**53 + 1, -(2**31) - 1]
int32 = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.sampled_from(INT32_EDGES))
int64 = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from(INT64_EDGES))
small_int = st.integers(-3, 8)
NAN, INF = float("nan"), float("inf")
DOUBLE_EDGES = [NAN, INF, -INF, -0.0, 0.0, 5e-324, 1e308, -1e308, 0.999999, 1.0, 30.0, 30.000001]
double = st.one_of(st.floats(), st.sampled_from(DOUBLE_EDGES))
float32 = st.one_of(st.floats(width=32), st.sampled_from([NAN, INF, -INF, -1.0, 1e38]))
enum_value = st.one_of(st.integers(0, 8), int32)

# ---- strategies: callers --------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    user: str | None  # None: not a valid key
    admin: bool
    metadata: tuple[tuple[str, str], ...]


KEYED = ("alice", "bob", "root")
INVALID_KEYS = ("expired", "revoked")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


garbage_metadata = st.one_of(
    ascii_text.map(bearer),
    st.sampled_from(["x" * 10_000, "sdk_0123456789ab_" + "A" * 43, "sdk_", "sdk__", ""]).map(
        bearer
    ),
    ascii_text.map(lambda text: (("authorization", text),)),
    ascii_text.map(lambda text: (("authorization", f"Basic {text}"),)),
    ascii_text.map(lambda text: (("x-sdmesh-user", "root"), ("authorization", f"bearer {text}"))),
)


# ---- strategies: job specs ------------------------------------------------

FIELDS = (
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "seed",
    "sampler_name",
    "batch_size",
    "priority",
    "memory_mode",
    "request_id",
    "labels",
    "selector",
)
clean_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), max_size=120)
label_part = st.text(st.sampled_from("abcXYZ019"), min_size=1, max_size=6) | st.sampled_from(
    ["a" * 63, "k8s.io/x", "a-b_c.d", "0"]
)
label_key = st.one_of(label_part, st.sampled_from(["zone", "example.com/team", "a/b"]))
label_value = st.one_of(st.just(""), label_part)
valid_labels = st.dictionaries(label_key, label_value, max_size=4) | st.just(
    {f"k{i}": f"v{i}" for i in range(MAX_LABELS)}
)
SAMPLER_SPELLINGS = [
    *sampler_names(),
    *(alias for sampler in SAMPLERS for alias in sampler.aliases),
    "euler a",
    "  DPM++ 2M Karras  ",
]
VALID_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(
        clean_text.filter(str.strip),
        st.sampled_from(["a lighthouse\tat dusk\r\n", "x" * MAX_PROMPT_CHARS, "שלום \u202e"]),
    ),
    "negative_prompt": st.one_of(clean_text, st.just("y" * MAX_PROMPT_CHARS)),
    "model": st.sampled_from([None, "tiny", " tiny ", "tiny\u3000"]),
    "width": st.one_of(st.none(), st.integers(MIN_SIZE // 8, MAX_SIZE // 8).map(lambda n: 8 * n)),
    "height": st.one_of(st.none(), st.integers(MIN_SIZE // 8, MAX_SIZE // 8).map(lambda n: 8 * n)),
    "steps": st.one_of(st.none(), st.integers(1, MAX_STEPS)),
    "cfg_scale": st.one_of(st.none(), st.floats(MIN_CFG_SCALE, MAX_CFG_SCALE)),
    "seed": st.one_of(st.none(), st.just(-1), st.integers(0, MAX_SEED)),
    "sampler_name": st.one_of(st.none(), st.sampled_from(SAMPLER_SPELLINGS)),
    "batch_size": st.one_of(st.none(), st.integers(1, MAX_BATCH_SIZE)),
    "priority": st.integers(MIN_PRIORITY, MAX_PRIORITY),
    "memory_mode": st.integers(0, 3),
    "request_id": st.one_of(
        st.just(""),
        st.sampled_from(["r1", "r2", "r3", "retry-\u00e9", "x" * MAX_REQUEST_ID_CHARS]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
    ),
    "labels": valid_labels,
    "selector": st.sampled_from([{}, {}, {}, {"zone": "a"}]),
}
wild_labels = st.one_of(
    st.dictionaries(short_fuzz_text, short_fuzz_text, max_size=5),
    st.dictionaries(label_key, fuzz_text, max_size=2),
    st.dictionaries(fuzz_text, label_value, max_size=2),
    st.just({f"k{i}": "v" for i in range(MAX_LABELS + 1)}),
    st.just({"a" * 64: "v", "b": "c" * 64}),
)
WILD_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "prompt": fuzz_text,
    "negative_prompt": fuzz_text,
    "model": fuzz_text,
    "width": int32,
    "height": int32,
    "steps": int32,
    "cfg_scale": double,
    "seed": int64,
    "sampler_name": fuzz_text,
    "batch_size": int32,
    "priority": int32,
    "memory_mode": enum_value,
    "request_id": fuzz_text,
    "labels": wild_labels,
    "selector": wild_labels,
}


@st.composite
def job_specs(draw: st.DrawFn) -> common_pb2.JobSpec:
    """A spec with a few fields (often none) drawn wild, the rest valid."""
    wild = draw(st.sets(st.sampled_from(FIELDS), max_size=3))
    values = {
        name: draw(WILD_FIELD[name] if name in wild else VALID_FIELD[name]) for name in FIELDS
    }
    return common_pb2.JobSpec(**{k: v for k, v in values.items() if v is not None})


# ---- strategies: page tokens ----------------------------------------------


def b64(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


page_token = st.one_of(
    short_fuzz_text,
    st.integers(1, 95).map(lambda depth: b64("[" * depth + "]" * depth)),
    st.integers(1, 10_000).map(lambda depth: b64("[" * depth + "]" * depth)),
    st.integers(1, 60).map(lambda depth: b64('{"a":' * depth + "1" + "}" * depth)),
    st.tuples(st.one_of(double, int64, st.integers(-(10**150), 10**150)), short_fuzz_text).map(
        lambda pair: b64(json.dumps(list(pair)))
    ),
    st.sampled_from(
        [
            b64('[1e400, "abc"]'),
            b64('[-1e308, "abc"]'),
            b64('[NaN, "abc"]'),
            b64('[Infinity, "abc"]'),
            b64('[true, "abc"]'),
            b64('[1.5, "' + "a" * 33 + '"]'),
            b64('[1.5, ""]'),
            b64('[1.5, "abc", 3]'),
            b64('"just a string"'),
            b64("[" + "9" * 170 + ', "abc"]'),
            "not base64!",
            "====",
            "\u00e9\u00e9",
            "A" * 257,
        ]
    ),
    ascii_text,
)

# ---- strategies: the agent stream -----------------------------------------

random_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda data, times: data * times,
        st.binary(min_size=1, max_size=8),
        st.sampled_from([1000, 40_000, 300_000]),
    ),
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n" + b"\x00" * 25]),
)


@st.composite
def device_infos(draw: st.DrawFn) -> common_pb2.DeviceInfo:
    wild = draw(st.booleans()) and draw(st.booleans())
    return common_pb2.DeviceInfo(
        index=draw(int32 if wild else st.integers(0, 3)),
        name=draw(short_fuzz_text if wild else st.just("Fuzz GPU")),
        uuid=draw(short_fuzz_text if wild else st.just("GPU-F")),
        kind=draw(short_fuzz_text if wild else st.sampled_from(["cuda", "cpu"])),
        total_bytes=draw(int64 if wild else st.integers(1, 96).map(lambda n: n * GIB)),
    )


@st.composite
def model_infos(draw: st.DrawFn) -> common_pb2.ModelInfo:
    wild = draw(st.booleans()) and draw(st.booleans())
    return common_pb2.ModelInfo(
        name=draw(fuzz_text if wild else st.sampled_from(["tiny", "sd15", "sdxl"])),
        weight_bytes=draw(int64 if wild else st.integers(0, 8 * GIB)),
        dtype=draw(fuzz_text if wild else st.just("float16")),
    )


HELLO_FIELDS = ("name", "hostname", "agent_version", "devices", "models", "labels", "held")


@st.composite
def hellos(draw: st.DrawFn, node_id: str, jobs: Sequence[str]) -> agent_pb2.Hello:
    wild = draw(st.sets(st.sampled_from(HELLO_FIELDS), max_size=2))
    message = agent_pb2.Hello(
        node_id=draw(fuzz_text) if draw(st.integers(0, 9)) == 0 else node_id,
        name=draw(fuzz_text) if "name" in wild else f"host-{node_id}",
        hostname=draw(fuzz_text) if "hostname" in wild else "fuzz-host",
        agent_version=draw(fuzz_text) if "agent_version" in wild else "fuzz",
        devices=draw(st.lists(device_infos(), max_size=3))
        if "devices" in wild
        else [
            common_pb2.DeviceInfo(index=0, name="GPU", uuid="G", kind="cuda", total_bytes=GIB * 48)
        ],
        models=draw(st.lists(model_infos(), max_size=3))
        if "models" in wild
        else [common_pb2.ModelInfo(name="tiny", weight_bytes=GIB, dtype="float16")],
        labels=draw(wild_labels if "labels" in wild else valid_labels),
        draining=draw(st.integers(0, 5)) == 0,
    )
    if "held" in wild:
        for _ in range(draw(st.integers(0, 3))):
            known, pick, made_up = draw(st.booleans()), draw(st.integers(0, 10**6)), draw(fuzz_text)
            job_id = jobs[pick % len(jobs)] if known and jobs else made_up
            message.held.add(job_id=job_id, attempt=draw(int32), gpu_index=draw(int32))
    return message


@st.composite
def device_stats(draw: st.DrawFn) -> common_pb2.DeviceStats:
    stats = common_pb2.DeviceStats(
        index=draw(st.one_of(st.integers(0, 2), int32)),
        total_bytes=draw(int64),
        free_bytes=draw(int64),
        used_bytes=draw(int64),
        utilization_percent=draw(float32),
        resident_models=draw(st.lists(model_infos(), max_size=2)),
    )
    for _ in range(draw(st.integers(0, 2))):
        stats.model_speeds.add(
            model=draw(short_fuzz_text),
            megapixel_steps_per_second=draw(double),
            load_seconds=draw(double),
            samples=draw(int32),
            model_offload_megapixel_steps_per_second=draw(double),
            sequential_offload_megapixel_steps_per_second=draw(double),
        )
    return stats


@dataclass(frozen=True)
class Target:
    """Whom a job update is about: the n-th assignment this stream got,
    a job from the run (any attempt), or a made-up one."""

    kind: str  # assigned, known, garbage
    pick: int
    job_id: str = ""
    attempt: int = 0


targets = st.one_of(
    st.builds(Target, st.just("assigned"), st.integers(0, 7)),
    st.builds(Target, st.just("assigned"), st.integers(0, 7)),
    st.builds(Target, st.just("known"), st.integers(0, 10**6), attempt=st.one_of(small_int, int32)),
    st.builds(Target, st.just("garbage"), st.just(0), job_id=fuzz_text, attempt=int32),
)


def progress_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda step, total: {"progress": common_pb2.Progress(step=step, total_steps=total)},
        st.one_of(small_int, int32),
        st.one_of(small_int, int32),
    )


@st.composite
def preview_bodies(draw: st.DrawFn) -> dict[str, Any]:
    side = draw(st.one_of(st.sampled_from([8, 64, 512, 513]), int32))
    png = small_png(8, 8) if draw(st.booleans()) else draw(random_bytes)
    preview = common_pb2.Preview(
        step=draw(small_int), total_steps=draw(small_int), width=side, height=side, png=png
    )
    return {"preview": preview}


@st.composite
def image_bodies(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(random_bytes)
    sha = draw(st.sampled_from(["", "0" * 64, "zz"]) | short_fuzz_text)
    if draw(st.booleans()):
        sha = hashlib.sha256(data).hexdigest()
    image = agent_pb2.ImageUpload(
        index=draw(st.one_of(small_int, int32)),
        seed=draw(int64),
        width=draw(st.one_of(st.sampled_from([64, 512]), int32)),
        height=draw(st.one_of(st.sampled_from([64, 512]), int32)),
        offset=draw(st.one_of(st.just(0), int64)),
        data=data,
        last=draw(st.booleans()),
        sha256=sha,
        size_bytes=draw(st.one_of(st.just(len(data)), int64)),
    )
    return {"image": image}


@st.composite
def ended_bodies(draw: st.DrawFn) -> dict[str, Any]:
    ended = agent_pb2.AttemptEnded(
        outcome=draw(st.one_of(st.integers(0, 4), enum_value)),  # type: ignore[arg-type]
        reason=draw(st.one_of(fuzz_text, st.sampled_from(["oom\x00", "\x00" * 8, "a\x1b[2Jb"]))),
        error_kind=draw(fuzz_text),
        profile=agent_pb2.AttemptProfile(
            load_seconds=draw(double), mean_step_seconds=draw(double), peak_vram_bytes=draw(int64)
        ),
    )
    return {"ended": ended}


update_bodies = st.one_of(
    st.just({"started": agent_pb2.AttemptStarted()}),
    progress_bodies(),
    preview_bodies(),
    image_bodies(),
    ended_bodies(),
    ended_bodies(),
    st.just({}),
    # A whole, valid upload of the job's images, then SUCCEEDED.
    st.just({"succeed": True}),
    st.just({"succeed": True}),
)


@dataclass(frozen=True)
class Send:
    """One thing a fuzzing agent does after its welcome."""

    message: agent_pb2.AgentMessage | None = None  # sent as it is
    target: Target | None = None  # or a job update about this target
    body: dict[str, Any] | None = None
    drain: scheduler_pb2.DrainNodeRequest | None = None  # or an admin drains this node


on_assigned = st.builds(
    Send,
    target=st.builds(Target, st.just("assigned"), st.integers(0, 7)),
    body=st.one_of(update_bodies, ended_bodies()),
)


def sends(jobs: Sequence[str], node_id: str) -> st.SearchStrategy[Send]:
    return st.one_of(
        st.builds(Send, target=targets, body=update_bodies),
        st.builds(Send, target=targets, body=update_bodies),
        st.builds(
            lambda stats, total, free: Send(
                message=agent_pb2.AgentMessage(
                    stats=agent_pb2.Stats(
                        devices=stats, host_total_bytes=total, host_free_bytes=free
                    )
                )
            ),
            st.lists(device_stats(), max_size=3),
            int64,
            int64,
        ),
        st.builds(
            lambda index, healthy, detail: Send(
                message=agent_pb2.AgentMessage(
                    health=agent_pb2.HealthReport(gpu_index=index, healthy=healthy, detail=detail)
                )
            ),
            st.one_of(small_int, int32),
            st.booleans(),
            fuzz_text,
        ),
        st.just(Send(message=agent_pb2.AgentMessage(leaving=agent_pb2.Leaving()))),
        st.just(Send(message=agent_pb2.AgentMessage())),
        hellos(node_id, jobs).map(lambda h: Send(message=agent_pb2.AgentMessage(hello=h))),
        st.builds(
            lambda timeout, undo: Send(
                drain=scheduler_pb2.DrainNodeRequest(
                    node=node_id, timeout_seconds=timeout, undo=undo
                )
            ),
            st.one_of(st.sampled_from([0.0, 0.5, 30.0]), double),
            st.booleans(),
        ),
    )


RAW_METHODS = {
    **dict.fromkeys(
        [
            "SubmitJob",
            "GetJob",
            "ListJobs",
            "CancelJob",
            "DeleteJob",
            "ListNodes",
            "ListModels",
            "DrainNode",
            "GetHealth",
            "Enroll",
        ],
        "unary",
    ),
    "WatchJob": "stream",
    "GetImage": "stream",
    "UploadInput": "upload",
    "FetchInput": "fetch",
    "Connect": "bidi",
}
AGENT_METHODS = ("Enroll", "Connect", "FetchInput")
raw_payloads = st.one_of(
    st.binary(max_size=64),
    # field 1 with invalid UTF-8 (a string in most requests, a spec's prompt in a submit)
    st.sampled_from([b"\x0a\x02\xff\xfe", b"\x0a\x04\x0a\x02\xc3\x28", b"\x0a\x10abc"]),
    st.sampled_from([b"", b"\xf8\x07\x01", b"\x0a\x00"]),  # parse: empty, unknown field
)

# ---- oracles --------------------------------------------------------------

PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
JOB_ID_RULE = re.compile(r"[A-Za-z0-9_-]{1,32}")
NODE_ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def short(value: Any, limit: int = 48) -> str:
    """A value for a report: long text cut to a prefix with its length."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return (
            f"{value[:limit]!r}...({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
        )
    return repr(value)


def describe(message: Message, depth: int = 0) -> str:
    """A message's set fields, each long value cut short."""
    parts = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.is_repeated:
            if descriptor.message_type.GetOptions().map_entry:
                inner = ", ".join(
                    f"{short(k, 24)}: {short(v, 24)}" for k, v in list(value.items())[:6]
                )
                text = f"{{{inner}{', ...' if len(value) > 6 else ''}}}"
            else:
                text = "[" + ", ".join(describe(item, depth + 1) for item in list(value)[:4]) + "]"
        elif descriptor.message_type is not None:
            text = describe(value, depth + 1)
        elif descriptor.is_repeated:
            text = repr(list(value)[:8])
        else:
            text = short(value)
        parts.append(f"{descriptor.name}={text}")
    return f"{type(message).__name__}({', '.join(parts)})"


def labels_problems(labels: Any, field: str) -> list[str]:
    problems = []
    if len(labels) > MAX_LABELS:
        problems.append(f"{field}: {len(labels)} labels")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_CHARS or not LABEL_KEY.fullmatch(key):
            problems.append(f"{field}: key {short(key)}")
        if len(value) > MAX_LABEL_VALUE_CHARS or not LABEL_VALUE.fullmatch(value):
            problems.append(f"{field}: value {short(value)}")
    return problems


def prompt_problems(text: str, field: str, *, required: bool) -> list[str]:
    problems = []
    if len(text) > MAX_PROMPT_CHARS:
        problems.append(f"{field}: {len(text)} characters")
    if required and not text.strip():
        problems.append(f"{field}: blank")
    if PROMPT_CONTROL.search(text):
        problems.append(f"{field}: control character in {short(text)}")
    return problems


def spec_problems(spec: common_pb2.JobSpec) -> list[str]:
    """How a resolved spec, as stored, breaks the documented limits."""
    problems = prompt_problems(spec.prompt, "prompt", required=True)
    problems += prompt_problems(spec.negative_prompt, "negative_prompt", required=False)
    for name in ("model", "width", "height", "steps", "cfg_scale", "seed", "sampler_name"):
        if not spec.HasField(name):
            problems.append(f"{name}: unset in a resolved spec")
    if not (1 <= len(spec.model) <= MAX_MODEL_NAME_CHARS and spec.model.isprintable()):
        problems.append(f"model: {short(spec.model)}")
    for name in ("width", "height"):
        value = getattr(spec, name)
        if not MIN_SIZE <= value <= MAX_SIZE or value % 8:
            problems.append(f"{name}: {value}")
    if not 1 <= spec.steps <= MAX_STEPS:
        problems.append(f"steps: {spec.steps}")
    if not (math.isfinite(spec.cfg_scale) and MIN_CFG_SCALE <= spec.cfg_scale <= MAX_CFG_SCALE):
        problems.append(f"cfg_scale: {spec.cfg_scale}")
    if not 0 <= spec.seed <= MAX_SEED:
        problems.append(f"seed: {spec.seed}")
    if spec.sampler_name not in sampler_names():
        problems.append(f"sampler_name: {short(spec.sampler_name)}")
    if not 1 <= spec.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"batch_size: {spec.batch_size}")
    if not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
        problems.append(f"priority: {spec.priority}")
    if spec.memory_mode not in common_pb2.MemoryMode.values():
        problems.append(f"memory_mode: {spec.memory_mode}")
    rid = spec.request_id
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        problems.append(f"request_id: {short(rid)}")
    problems += labels_problems(spec.labels, "labels")
    problems += labels_problems(spec.selector, "selector")
    return problems


def has(message: Message, name: str) -> bool:
    """Whether an optional field is set (by a name the stubs cannot check)."""
    return message.HasField(name)


def find_sampler_name(name: str) -> str | None:
    """The sampler a name resolves to; "" is the default, as unset."""
    wanted = (name or "Euler a").strip().casefold()
    for sampler in SAMPLERS:
        if wanted in {key.casefold() for key in (sampler.name, *sampler.aliases)}:
            return sampler.name
    return None


def resolved_as_asked(stored: common_pb2.JobSpec, asked: common_pb2.JobSpec) -> list[str]:
    """Where the stored spec differs from what was submitted (defaults
    aside)."""
    problems = []
    for name in ("prompt", "negative_prompt", "priority", "memory_mode", "request_id"):
        if getattr(stored, name) != getattr(asked, name):
            problems.append(f"{name} stored as {short(getattr(stored, name))}")
    for name in ("width", "height", "steps", "batch_size"):
        if has(asked, name) and getattr(stored, name) != getattr(asked, name):
            problems.append(f"{name} stored as {getattr(stored, name)}")
    if asked.HasField("cfg_scale") and stored.cfg_scale != asked.cfg_scale:
        problems.append(f"cfg_scale stored as {stored.cfg_scale}")
    if asked.HasField("seed") and asked.seed != -1 and stored.seed != asked.seed:
        problems.append(f"seed stored as {stored.seed}")
    model = asked.model.strip() if asked.HasField("model") else "tiny"
    if stored.model != model:
        problems.append(f"model stored as {short(stored.model)}")
    if asked.HasField("sampler_name") and stored.sampler_name != find_sampler_name(
        asked.sampler_name
    ):
        problems.append(f"sampler_name stored as {short(stored.sampler_name)}")
    if dict(stored.labels) != dict(asked.labels) or dict(stored.selector) != dict(asked.selector):
        problems.append("labels or selector stored otherwise")
    return problems


def surely_valid(asked: common_pb2.JobSpec) -> bool:
    """Whether a submitted spec is within every limit (with the model left
    to the default): the scheduler must not call it invalid."""
    if asked.HasField("model") and asked.model.strip() != "tiny":
        return False  # other models depend on what nodes reported
    resolved = common_pb2.JobSpec()
    resolved.CopyFrom(asked)
    defaults = {
        "model": "tiny",
        "width": 512,
        "height": 512,
        "steps": 20,
        "cfg_scale": 7.0,
        "seed": 0,
        "sampler_name": "Euler a",
        "batch_size": 1,
    }
    for name, value in defaults.items():
        if not has(asked, name) or (name == "seed" and asked.seed == -1):
            setattr(resolved, name, value)
    resolved.model = "tiny"
    if asked.HasField("sampler_name"):
        resolved.sampler_name = find_sampler_name(asked.sampler_name) or asked.sampler_name
    return not spec_problems(resolved)


@lru_cache(maxsize=64)
def small_png(width: int, height: int) -> bytes:
    image = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(image, format="PNG")
    return image.getvalue()


# ---- crashes found, waiting for their fix ---------------------------------

# Crashes this fuzzer found, fixed since; `test_a_crash_found_by_fuzzing`
# replays the smallest input of each, and the fuzzing itself fails on any
# INTERNAL or UNKNOWN answer.
FOUND_CRASHES: dict[str, str] = {
    "undecodable-request": "a request that is not a valid protobuf (corrupt wire format, "
    "invalid UTF-8 in a string) ended UNKNOWN, before authentication, with a traceback "
    "logged; now INVALID_ARGUMENT (scheduler/interceptors.py parses requests in its guard)",
    "hello-duplicate-models": "a hello listing one model twice ended Connect INTERNAL "
    "(IntegrityError); now INVALID_ARGUMENT (scheduler/agents.py check_hello)",
    "hello-nul": "on PostgreSQL, a NUL in a hello's name, hostname, version or model ended "
    "Connect INTERNAL (DataError); now INVALID_ARGUMENT",
    "hello-too-long": "on PostgreSQL, a hello's hostname, version or dtype longer than its "
    "column ended Connect INTERNAL; now INVALID_ARGUMENT",
    "enroll-name-nul": "on PostgreSQL, an Enroll whose name had a NUL ended INTERNAL "
    "(writing the audit entry); now INVALID_ARGUMENT",
}


# ---- the scheduler under test ---------------------------------------------


class ErrorLog(logging.Handler):
    """Every error the process logs while the fuzzer runs, and every agent
    stream the scheduler's reader ended on an exception."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            error = record.exc_info[1] if record.exc_info else None
            where = f" ({type(error).__name__}: {short(str(error), 300)})" if error else ""
            self.records.append(f"{record.name}: {short(message, 300)}{where}")
        elif record.name == "scheduler.agents" and message.startswith("stream from node"):
            self.records.append(f"{record.name}: {short(message, 300)}")


@contextmanager
def scheduler_in_thread(
    data_dir: Path, db_url: str
) -> Iterator[tuple[SchedulerServer, asyncio.AbstractEventLoop]]:
    """The scheduler on an event loop of its own thread, so that Hypothesis
    can call it with blocking stubs from this one."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="fuzzed-scheduler")
    thread.start()
    stack = AsyncExitStack()

    async def start() -> SchedulerServer:
        return await stack.enter_async_context(
            running_scheduler(
                data_dir,
                db_url,
                no_auth=False,
                submit_rate=0,
                heartbeat_seconds=0.5,
                lease_seconds=5.0,
            )
        )

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(60), loop
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


class Fuzzer:
    def __init__(self, server: SchedulerServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        address = f"127.0.0.1:{server.port}"
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        )
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.gateway = agent_pb2_grpc.AgentGatewayStub(self.channel)
        self.codes: Counter[str] = Counter()
        self.by_method: Counter[str] = Counter()
        self.requests = 0  # calls, and the messages agents sent on their streams
        self.anomalies: list[str] = []
        self.reached: Counter[str] = Counter()  # what the agents got to do
        self.jobs: list[str] = []
        self.finished: list[str] = []  # jobs an agent of the run succeeded
        self.owner: dict[str, str] = {}
        self.page_tokens: list[str] = []
        self.accepted = 0
        registry = server.db.store.credentials
        self.callers: dict[str, Caller] = {}
        for user in KEYED:
            admin = user == "root"
            key = registry.create_key(user, admin=admin, expires_at=None, actor="test")[1].text
            self.callers[user] = Caller(user, user, admin, bearer(key))
        expired = registry.create_key("eve", admin=True, expires_at=server.clock() - 1, actor="t")
        revoked = registry.create_key("mallory", admin=True, expires_at=None, actor="t")
        registry.revoke_key(revoked[0].id, actor="t")
        self.callers["expired"] = Caller("expired", None, False, bearer(expired[1].text))
        self.callers["revoked"] = Caller("revoked", None, False, bearer(revoked[1].text))
        self.callers["none"] = Caller("none", None, False, ())
        clock = server.clock()
        self.join_token = registry.create_join_token(
            expires_at=clock + 3600, reusable=True, labels={}, actor="t"
        )[1].text
        spent = registry.create_join_token(
            expires_at=clock + 3600, reusable=False, labels={}, actor="t"
        )
        late = registry.create_join_token(expires_at=clock - 1, reusable=True, labels={}, actor="t")
        self.other_tokens = [spent[1].text, late[1].text]
        self.nodes: dict[str, str] = {}  # node id -> credential
        for index in range(6):
            self.enroll(f"fz-{index}", self.join_token)
        self.enroll("anchor", spent[1].text)  # spends the single-use token
        self.aio_channel: aio.Channel = self.on_loop(self._open_channel(address))
        self.on_loop(self._anchor())

    # ---- plumbing ----

    def on_loop(self, coroutine: Any, within: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(within)

    async def _open_channel(self, address: str) -> aio.Channel:
        return aio.insecure_channel(address)

    def enroll(self, node_id: str, token: str) -> None:
        request = agent_pb2.EnrollRequest(join_token=token, node_id=node_id, name=node_id)
        self.nodes[node_id] = self.gateway.Enroll(request, timeout=UNARY_TIMEOUT).credential

    def node_metadata(self, node_id: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.nodes[node_id]}"), ("x-sdmesh-node", node_id))

    async def _anchor(self) -> None:
        """A node seen once, with a large GPU and zone=a, so that submits
        resolve; gone before the fuzzing starts."""
        agent = ScriptedAgent(self.server.port, "anchor", labels={"zone": "a"})
        first = hello("anchor", labels={"zone": "a"})
        first.hello.devices[0].total_bytes = 96 * GIB
        await agent.connect(first=first, metadata=self.node_metadata("anchor"))
        await agent.close()

    def record(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str | None,
        what: str,
        allowed: frozenset[grpc.StatusCode] = ALLOWED,
        request: Message | None = None,
    ) -> None:
        self.codes[code.name] += 1
        self.by_method[f"{method} {code.name}"] += 1
        if code in allowed:
            return
        self.anomaly(f"{method} ended {code.name} ({short(details or '', 200)}) for {what}")

    def anomaly(self, text: str) -> None:
        self.anomalies.append(text)

    def unary(self, method: str, request: Message, caller: Caller) -> tuple[Any, grpc.StatusCode]:
        self.requests += 1
        try:
            response = getattr(self.stub, method)(
                request, metadata=caller.metadata, timeout=UNARY_TIMEOUT
            )
        except grpc.RpcError as exc:
            code = exc.code()
            self.record(method, code, exc.details(), f"{describe(request)} as {caller.name}")
            return None, code
        self.record(method, Code.OK, None, "")
        return response, Code.OK

    def streamed(
        self, method: str, request: Message, caller: Caller, timeout: float, cut_off: bool = False
    ) -> tuple[list[Any], grpc.StatusCode]:
        self.requests += 1
        items: list[Any] = []
        try:
            for item in getattr(self.stub, method)(
                request, metadata=caller.metadata, timeout=timeout
            ):
                items.append(item)
        except grpc.RpcError as exc:
            code = exc.code()
            allowed = ALLOWED | {Code.DEADLINE_EXCEEDED} if cut_off else ALLOWED
            self.record(
                method, code, exc.details(), f"{describe(request)} as {caller.name}", allowed
            )
            return items, code
        self.record(method, Code.OK, None, "")
        return items, Code.OK

    # ---- drawing ----

    def caller(self, data: st.DataObject) -> Caller:
        name = data.draw(st.sampled_from([*KEYED, *KEYED, "none", "expired", "revoked", "garbage"]))
        if name == "garbage":
            return Caller("garbage", None, False, data.draw(garbage_metadata))
        return self.callers[name]

    @staticmethod
    def pick(data: st.DataObject, items: Sequence[Any]) -> Any:
        """One of `items`, which grow as the run goes on: Hypothesis must
        draw the same kinds of choices whatever they hold."""
        index = data.draw(st.integers(0, 10**6))
        return items[index % len(items)] if items else None

    def job_and_caller(self, data: st.DataObject, among: Sequence[str] = ()) -> tuple[str, Caller]:
        """A job of the run (one of `among` when it has some), or a made-up
        id; and its owner as the caller, or anyone."""
        kind = data.draw(st.sampled_from(["among", "known", "known", "made-up"]))
        job_id = self.pick(data, among if kind == "among" and among else self.jobs)
        made_up = data.draw(
            st.one_of(
                fuzz_text, st.sampled_from(["0" * 16, "a" * 32, "a" * 33, "-", "0" * 16 + "\n"])
            )
        )
        anyone = self.caller(data)
        if kind == "made-up" or job_id is None:
            return made_up, anyone
        return job_id, self.callers[self.owner[job_id]] if data.draw(st.booleans()) else anyone

    # ---- one example ----

    OPS = (
        ["submit"] * 9
        + ["get"] * 2
        + ["list"] * 3
        + ["cancel"] * 2
        + ["delete"]
        + ["watch"] * 2
        + ["image"] * 2
        + ["nodes", "models", "drain", "health"]
        + ["enroll"] * 2
        + ["agent"] * 6
        + ["raw"] * 2
    )

    def step(self, data: st.DataObject) -> None:
        op = data.draw(st.sampled_from(self.OPS), label="op")
        getattr(self, f"op_{op}")(data)

    def id_checked(self, method: str, job_id: str, caller: Caller, code: grpc.StatusCode) -> None:
        """A keyed caller's call with what is not a job id is refused as
        invalid (or as too large a message)."""
        refused = code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED)
        if caller.user and not JOB_ID_RULE.fullmatch(job_id) and not refused:
            self.anomaly(f"{method} answered {code.name} for {short(job_id)}, not a job id")

    def tenancy(self, method: str, caller: Caller, job: scheduler_pb2.Job) -> None:
        if caller.user is None:
            self.anomaly(f"{method} answered {caller.name} without a valid key")
        elif not caller.admin and job.owner != caller.user:
            self.anomaly(f"{method} showed {caller.user} the job {job.id} of {job.owner}")

    def op_submit(self, data: st.DataObject) -> None:
        spec = data.draw(job_specs(), label="spec")
        caller = self.caller(data)
        answer, code = self.unary("SubmitJob", scheduler_pb2.SubmitJobRequest(spec=spec), caller)
        what = f"{describe(spec)} as {caller.name}"
        if answer is None:
            if code == Code.INVALID_ARGUMENT and caller.user and surely_valid(spec):
                self.anomaly(f"SubmitJob refused a valid spec as invalid: {what}")
            return
        job = answer.job
        self.tenancy("SubmitJob", caller, job)
        self.accepted += 1
        readback, _ = self.unary("GetJob", scheduler_pb2.GetJobRequest(job_id=job.id), caller)
        if readback is None:
            self.anomaly(f"job {job.id} accepted but not readable by its owner: {what}")
            return
        problems = spec_problems(readback.spec) + spec_problems(job.spec)
        if answer.created:
            problems += resolved_as_asked(readback.spec, spec)
        elif readback.spec.request_id != spec.request_id or not spec.request_id:
            problems.append("an earlier job returned for another request id")
        if readback.owner != caller.user:
            problems.append(f"owner {readback.owner}")
        if readback.state == common_pb2.JOB_STATE_UNSPECIFIED:
            problems.append("state unspecified")
        if problems:
            self.anomaly(f"accepted an invalid job {job.id} ({'; '.join(problems)}): {what}")
        if job.id not in self.owner:
            self.jobs.append(job.id)
            self.owner[job.id] = job.owner

    def op_get(self, data: st.DataObject) -> None:
        job_id, caller = self.job_and_caller(data)
        job, code = self.unary("GetJob", scheduler_pb2.GetJobRequest(job_id=job_id), caller)
        self.id_checked("GetJob", job_id, caller, code)
        if job is not None:
            self.tenancy("GetJob", caller, job)

    def op_cancel(self, data: st.DataObject) -> None:
        job_id, caller = self.job_and_caller(data)
        request = scheduler_pb2.CancelJobRequest(job_id=job_id)
        job, code = self.unary("CancelJob", request, caller)
        self.id_checked("CancelJob", job_id, caller, code)
        if job is not None:
            self.tenancy("CancelJob", caller, job)
            terminal = {
                common_pb2.JOB_STATE_SUCCEEDED,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.JOB_STATE_CANCELLED,
            }
            if job.state not in terminal:
                self.anomaly(f"CancelJob left {job.id} {common_pb2.JobState.Name(job.state)}")

    def op_delete(self, data: st.DataObject) -> None:
        job_id, caller = self.job_and_caller(data)
        answer, code = self.unary(
            "DeleteJob", scheduler_pb2.DeleteJobRequest(job_id=job_id), caller
        )
        self.id_checked("DeleteJob", job_id, caller, code)
        if answer is None:
            return
        if caller.user is None or not (caller.admin or self.owner.get(job_id) == caller.user):
            self.anomaly(f"DeleteJob let {caller.name} delete {job_id} of {self.owner.get(job_id)}")
        _, code = self.unary(
            "GetJob", scheduler_pb2.GetJobRequest(job_id=job_id), self.callers["root"]
        )
        if code != Code.NOT_FOUND:
            self.anomaly(f"job {job_id} still there after DeleteJob ({code.name})")

    def op_list(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        wild = data.draw(
            st.sets(st.sampled_from(["states", "owner", "limit", "token"]), max_size=2)
        )
        states = data.draw(st.lists(st.integers(1, 6), max_size=2))
        if "states" in wild:
            states = data.draw(st.lists(st.one_of(st.integers(0, 6), enum_value), max_size=4))
        owner = data.draw(st.sampled_from(["", "", caller.user or "", *KEYED, "nobody"]))
        if "owner" in wild:
            owner = data.draw(fuzz_text)
        limit = data.draw(st.one_of(st.just(0), st.integers(1, 20), st.just(1000)))
        if "limit" in wild:
            limit = data.draw(int32)
        earlier, reused = data.draw(st.booleans()), self.pick(data, self.page_tokens)
        token = reused if earlier and reused is not None else ""
        if "token" in wild:
            token = data.draw(page_token)
        request = scheduler_pb2.ListJobsRequest(
            states=states,  # type: ignore[arg-type]
            owner=owner,
            limit=limit,
            page_token=token,
        )
        listing, _ = self.unary("ListJobs", request, caller)
        if listing is None:
            return
        if len(listing.jobs) > (limit or 50):
            self.anomaly(f"ListJobs gave {len(listing.jobs)} jobs for limit {limit}")
        for job in listing.jobs:
            self.tenancy("ListJobs", caller, job)
            if states and job.state not in states:
                self.anomaly(f"ListJobs gave a {job.state} job for states {states}")
            if owner and job.owner != owner:
                self.anomaly(f"ListJobs gave {job.owner}'s job for owner {short(owner)}")
        created = [job.created_at.ToNanoseconds() for job in listing.jobs]
        if created != sorted(created, reverse=True):
            self.anomaly("ListJobs is not newest first")
        if listing.next_page_token and len(self.page_tokens) < 200:
            self.page_tokens.append(listing.next_page_token)

    def op_watch(self, data: st.DataObject) -> None:
        job_id, caller = self.job_and_caller(data, self.finished)
        after = data.draw(st.one_of(st.integers(0, 8), int64, st.sampled_from([2**31, 2**31 - 1])))
        request = scheduler_pb2.WatchJobRequest(job_id=job_id, after_seq=after)
        events, code = self.streamed("WatchJob", request, caller, WATCH_TIMEOUT, cut_off=True)
        self.id_checked("WatchJob", job_id, caller, code)
        last = after
        for event in events:
            if event.job_id != job_id:
                self.anomaly(f"WatchJob {job_id} gave an event of {event.job_id}")
            if event.seq:
                if event.seq <= last:
                    self.anomaly(f"WatchJob {job_id} after {after}: seq {event.seq} after {last}")
                last = event.seq
        if events and caller.user and not caller.admin and self.owner.get(job_id) != caller.user:
            self.anomaly(f"WatchJob showed {caller.name} the events of {job_id}")

    def op_image(self, data: st.DataObject) -> None:
        job_id, caller = self.job_and_caller(data, self.finished)
        index = data.draw(st.one_of(st.integers(0, 8), int32))
        request = scheduler_pb2.GetImageRequest(job_id=job_id, index=index)
        chunks, code = self.streamed("GetImage", request, caller, STREAM_TIMEOUT)
        self.id_checked("GetImage", job_id, caller, code)
        if code != Code.OK:
            return
        if caller.user is None or not (caller.admin or self.owner.get(job_id) == caller.user):
            self.anomaly(f"GetImage gave {caller.name} an image of {job_id}")
        info = chunks[0].info if chunks else None
        data_bytes = b"".join(chunk.data for chunk in chunks)
        offsets = [chunk.offset for chunk in chunks]
        expected = [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
        if info is None or offsets != expected or len(data_bytes) != info.size_bytes:
            self.anomaly(f"GetImage {job_id}[{index}]: chunks out of order or short")
            return
        if hashlib.sha256(data_bytes).hexdigest() != info.sha256:
            self.anomaly(f"GetImage {job_id}[{index}]: sha256 does not match")
        try:
            size = Image.open(io.BytesIO(data_bytes)).size
        except Exception as exc:
            self.anomaly(f"GetImage {job_id}[{index}]: a stored image is not a PNG ({exc})")
            return
        job, _ = self.unary(
            "GetJob", scheduler_pb2.GetJobRequest(job_id=job_id), self.callers["root"]
        )
        if job is not None and size != (job.spec.width, job.spec.height):
            self.anomaly(
                f"GetImage {job_id}[{index}]: a {size} PNG for a "
                f"{job.spec.width}x{job.spec.height} job"
            )

    def op_nodes(self, data: st.DataObject) -> None:
        self.unary("ListNodes", scheduler_pb2.ListNodesRequest(), self.caller(data))

    def op_models(self, data: st.DataObject) -> None:
        self.unary("ListModels", scheduler_pb2.ListModelsRequest(), self.caller(data))

    def op_health(self, data: st.DataObject) -> None:
        health, _ = self.unary("GetHealth", scheduler_pb2.GetHealthRequest(), self.caller(data))
        if health is not None and health.role != scheduler_pb2.ROLE_LEADER:
            self.anomaly(f"GetHealth: {health}")

    def op_drain(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        known, made_up = data.draw(st.booleans()), data.draw(fuzz_text)
        node = self.pick(data, [*self.nodes, "host-fz-0"]) if known else made_up
        timeout = data.draw(
            st.one_of(st.sampled_from([0.0, 1.0, 7 * 86400.0, 7 * 86400.0 + 1]), double)
        )
        request = scheduler_pb2.DrainNodeRequest(
            node=node, timeout_seconds=timeout, undo=data.draw(st.booleans())
        )
        answer, _ = self.unary("DrainNode", request, caller)
        if answer is not None and not caller.admin:
            self.anomaly(f"DrainNode let {caller.name} drain {short(node)}")

    def op_enroll(self, data: st.DataObject) -> None:
        token = data.draw(
            st.one_of(
                st.just(self.join_token),
                st.just(self.join_token),
                st.sampled_from(self.other_tokens),
                st.just(self.join_token + "x"),
                st.just(self.join_token[:-1]),
                ascii_text.map(lambda text: "sdj_" + text),
                fuzz_text,
            ),
            label="token",
        )
        enrolled = self.pick(data, [*self.nodes])
        node_id = data.draw(
            st.one_of(
                st.just(enrolled),
                st.integers(0, 10**6).map(lambda n: f"fz-new-{n}"),
                st.integers(0, 10**6).map(lambda n: f"fz-new-{n}"),
                st.sampled_from(["a" * 64, "a" * 65, ".a", "a..", "a" + "\u0660"]),
                fuzz_text,
            ),
            label="node_id",
        )
        name = data.draw(st.one_of(st.just(node_id), fuzz_text))
        request = agent_pb2.EnrollRequest(join_token=token, node_id=node_id, name=name)
        self.requests += 1
        try:
            answer = self.gateway.Enroll(request, timeout=UNARY_TIMEOUT)
        except grpc.RpcError as exc:
            self.record("Enroll", exc.code(), exc.details(), describe(request), request=request)
            return
        self.record("Enroll", Code.OK, None, "")
        if token != self.join_token or node_id in self.nodes or not NODE_ID_RULE.fullmatch(node_id):
            self.anomaly(f"Enroll took {describe(request)}")
        self.nodes.setdefault(node_id, answer.credential)

    def op_raw(self, data: st.DataObject) -> None:
        """Bytes that may not parse as the method's request at all."""
        method = data.draw(st.sampled_from(sorted(RAW_METHODS)))
        payload = data.draw(raw_payloads)
        caller = self.caller(data)
        kind = RAW_METHODS[method]
        service = "AgentGateway" if method in AGENT_METHODS else "Scheduler"
        path = f"/sdmesh.v1.{service}/{method}"
        what = f"{short(payload)} as {caller.name}"
        self.requests += 1
        try:
            if kind == "unary":
                self.channel.unary_unary(path, None, None)(
                    payload, metadata=caller.metadata, timeout=UNARY_TIMEOUT
                )
            elif kind == "stream":
                for _ in self.channel.unary_stream(path, None, None)(
                    payload, metadata=caller.metadata, timeout=WATCH_TIMEOUT
                ):
                    pass
            elif kind == "upload":
                self.channel.stream_unary(path, None, None)(
                    iter([payload]), metadata=caller.metadata, timeout=UNARY_TIMEOUT
                )
            elif kind == "fetch":
                metadata = self.node_metadata(self.pick(data, [*self.nodes][:6]))
                for _ in self.channel.unary_stream(path, None, None)(
                    payload, metadata=metadata, timeout=UNARY_TIMEOUT
                ):
                    pass
            else:
                metadata = self.node_metadata(self.pick(data, [*self.nodes][:6]))
                for _ in self.channel.stream_stream(path, None, None)(
                    iter([payload]), metadata=metadata, timeout=STREAM_TIMEOUT
                ):
                    pass
        except grpc.RpcError as exc:
            allowed = ALLOWED | {Code.DEADLINE_EXCEEDED} if method == "WatchJob" else ALLOWED
            self.record(f"raw {method}", exc.code(), exc.details(), what, allowed)
        else:
            self.record(f"raw {method}", Code.OK, None, "")

    def op_agent(self, data: st.DataObject) -> None:
        pool = [*self.nodes][:12]
        node_id = self.pick(data, pool)
        how = data.draw(st.sampled_from(["own"] * 12 + ["none", "garbage", "other", "no-node"]))
        if how == "own":
            metadata = self.node_metadata(node_id)
        elif how == "none":
            metadata = ()
        elif how == "garbage":
            metadata = (
                ("authorization", f"Bearer {data.draw(ascii_text)}"),
                ("x-sdmesh-node", data.draw(ascii_text)),
            )
        elif how == "other":
            other = self.pick(data, pool)
            metadata = (
                ("authorization", f"Bearer {self.nodes[other]}"),
                ("x-sdmesh-node", node_id),
            )
        else:
            metadata = (("authorization", f"Bearer {self.nodes[node_id]}"),)
        if data.draw(st.integers(0, 9)):
            first = agent_pb2.AgentMessage(
                hello=data.draw(hellos(node_id, self.jobs), label="hello")
            )
        else:
            first = data.draw(
                st.one_of(
                    st.just(agent_pb2.AgentMessage()),
                    st.just(agent_pb2.AgentMessage(leaving=agent_pb2.Leaving())),
                    st.builds(Send, target=targets, body=update_bodies).map(self.update_message),
                )
            )
        then = data.draw(st.lists(sends(self.jobs, node_id), max_size=6), label="then")
        # and what it says of the jobs it is given, most often their end
        then += data.draw(st.lists(on_assigned, max_size=3), label="on its jobs")
        polite = data.draw(st.sampled_from([True, True, True, False]))
        self.on_loop(self.agent_session(metadata, first, then, polite), within=60)

    def update_message(
        self, send: Send, assigned: Sequence[agent_pb2.AssignedJob] = ()
    ) -> agent_pb2.AgentMessage:
        target, body = send.target, dict(send.body or {})
        assert target is not None
        body.pop("succeed", None)
        if target.kind == "assigned" and assigned:
            job = assigned[target.pick % len(assigned)]
            job_id, attempt = job.job_id, job.attempt
        elif target.kind == "known" and self.jobs:
            job_id, attempt = self.jobs[target.pick % len(self.jobs)], target.attempt
        else:
            job_id, attempt = target.job_id, target.attempt
        return agent_pb2.AgentMessage(
            job=agent_pb2.JobUpdate(job_id=job_id, attempt=attempt, **body)
        )

    async def agent_session(
        self,
        metadata: tuple[tuple[str, str], ...],
        first: agent_pb2.AgentMessage,
        then: list[Send],
        polite: bool,
    ) -> None:
        """One agent stream: the first message, then (after a welcome) what
        `then` says, about the jobs the stream was assigned among others;
        then the agent hangs up, `polite`ly handing back the jobs it was
        given first, and the stream must end by itself."""
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()

        async def requests() -> Any:
            while (message := await outbox.get()) is not None:
                yield message

        gateway = agent_pb2_grpc.AgentGatewayStub(self.aio_channel)
        call = gateway.Connect(requests(), metadata=metadata, timeout=STREAM_TIMEOUT)
        # Reads go through a queue: a read cancelled on a timeout would
        # cancel the whole call.
        inbox: asyncio.Queue[Any] = asyncio.Queue()  # messages, then None

        async def read_all() -> None:
            try:
                while (message := await call.read()) is not aio.EOF:  # type: ignore[attr-defined]
                    inbox.put_nowait(message)
            finally:
                inbox.put_nowait(None)

        reader = asyncio.ensure_future(read_all())
        what = f"{describe(first)} then {len(then)} messages"
        outbox.put_nowait(first)
        self.requests += 1
        assigned: list[agent_pb2.AssignedJob] = []
        try:
            welcome = await inbox.get()
            if welcome is not None and welcome.WhichOneof("body") == "welcome":
                if any(send.target is not None and send.target.kind == "assigned" for send in then):
                    await self._assignments(inbox, assigned)
                for send in then:
                    self._assigned_by_now(inbox, assigned)
                    await self._send(send, outbox, assigned)
                self._assigned_by_now(inbox, assigned)
                self.reached["jobs assigned"] += len(assigned)
                for job in assigned if polite else ():
                    released = agent_pb2.AttemptEnded(outcome=agent_pb2.ATTEMPT_OUTCOME_RELEASED)
                    update = agent_pb2.JobUpdate(
                        job_id=job.job_id, attempt=job.attempt, ended=released
                    )
                    outbox.put_nowait(agent_pb2.AgentMessage(job=update))
                    self.requests += 1
        finally:
            outbox.put_nowait(None)  # the agent hangs up; the stream must end
        await asyncio.wait([reader], timeout=STREAM_TIMEOUT + 5)
        if not reader.done():
            call.cancel()
            self.anomaly(f"Connect did not end after the agent hung up: {what}")
        elif reader.exception() is not None and not isinstance(reader.exception(), aio.AioRpcError):
            self.anomaly(f"Connect: {reader.exception()!r}: {what}")
        self.record("Connect", await call.code(), await call.details(), what, request=first)

    @staticmethod
    def _assigned_by_now(inbox: asyncio.Queue[Any], into: list[agent_pb2.AssignedJob]) -> None:
        """The jobs assigned to this stream that have come by now."""
        while not inbox.empty():
            message = inbox.get_nowait()
            if message is None:
                inbox.put_nowait(None)
                return
            if message.WhichOneof("body") == "assign":
                into.extend(message.assign.jobs)

    async def _assignments(
        self, inbox: asyncio.Queue[Any], into: list[agent_pb2.AssignedJob]
    ) -> None:
        """The jobs assigned to this stream soon after its welcome: what
        comes within ASSIGNMENT_WAIT, and then only what follows at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ASSIGNMENT_WAIT
        while (left := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(inbox.get(), left)
            except TimeoutError:
                return
            if message is None:
                inbox.put_nowait(None)
                return
            if message.WhichOneof("body") == "assign":
                into.extend(message.assign.jobs)
                deadline = min(deadline, loop.time() + 0.02)

    async def _send(self, send: Send, outbox: asyncio.Queue[Any], assigned: list[Any]) -> None:
        if send.drain is not None:
            stub = scheduler_pb2_grpc.SchedulerStub(self.aio_channel)
            self.requests += 1
            try:
                await stub.DrainNode(
                    send.drain, metadata=self.callers["root"].metadata, timeout=UNARY_TIMEOUT
                )
            except aio.AioRpcError as exc:
                self.record("DrainNode", exc.code(), exc.details(), describe(send.drain))
            else:
                self.record("DrainNode", Code.OK, None, "")
            return
        if send.message is not None:
            outbox.put_nowait(send.message)
            self.requests += 1
            return
        if send.body and send.body.get("succeed"):
            if assigned and send.target is not None:
                job = assigned[send.target.pick % len(assigned)]
                for message in self.success(job):
                    outbox.put_nowait(message)
                    self.requests += 1
                self.reached["whole uploads"] += 1
                if job.job_id in self.owner and job.job_id not in self.finished:
                    self.finished.append(job.job_id)
            return
        message = self.update_message(send, assigned)
        outbox.put_nowait(message)
        self.requests += 1
        if send.target is not None and send.target.kind == "assigned" and assigned:
            body = message.job.WhichOneof("body")
            self.reached[f"{body} on an assigned attempt"] += 1
            if body == "ended" and not message.job.ended.reason.isprintable():
                self.reached["ended with an unprintable reason on an assigned attempt"] += 1

    def success(self, job: agent_pb2.AssignedJob) -> list[agent_pb2.AgentMessage]:
        """What a sound agent sends for a job it ran: started, its PNGs in
        chunks, succeeded."""

        def update(**body: Any) -> agent_pb2.AgentMessage:
            return agent_pb2.AgentMessage(
                job=agent_pb2.JobUpdate(job_id=job.job_id, attempt=job.attempt, **body)
            )

        messages = [update(started=agent_pb2.AttemptStarted())]
        png = small_png(job.spec.width, job.spec.height)
        for index in range(job.spec.batch_size):
            for image in upload_chunks(job, index, png, chunk=256 * 1024):
                messages.append(update(image=image))
        ended = agent_pb2.AttemptEnded(outcome=agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED)
        messages.append(update(ended=ended))
        return messages

    # ---- afterwards ----

    def check_healthy(self) -> None:
        """Still the leader, still taking a valid submit, and an agent can
        still connect and run a job to its PNG."""
        health = self.stub.GetHealth(scheduler_pb2.GetHealthRequest(), timeout=UNARY_TIMEOUT)
        assert health.role == scheduler_pb2.ROLE_LEADER
        # A user of its own: the fuzzing may have filled others' queues.
        registry = self.server.db.store.credentials
        key = registry.create_key("carol", admin=False, expires_at=None, actor="test")[1].text
        plain = scheduler_pb2.SubmitJobRequest(
            spec=common_pb2.JobSpec(prompt="a lighthouse", width=64, height=64, steps=4)
        )
        assert self.stub.SubmitJob(plain, metadata=bearer(key), timeout=UNARY_TIMEOUT).created
        self.enroll("final", self.join_token)
        self.on_loop(self._final_job(bearer(key)))

    async def _final_job(self, carol: tuple[tuple[str, str], ...]) -> None:
        agent = ScriptedAgent(self.server.port, "final", models=(FINAL_MODEL,))
        welcome = await agent.connect(metadata=self.node_metadata("final"))
        assert welcome.WhichOneof("body") == "welcome"
        stub = scheduler_pb2_grpc.SchedulerStub(self.aio_channel)
        spec = common_pb2.JobSpec(
            prompt="after the fuzz", model=FINAL_MODEL, width=64, height=64, steps=4, seed=7
        )
        submitted = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec), metadata=carol)
        job = await agent.assignment()
        assert job.job_id == submitted.job.id
        png = small_png(64, 64)
        agent.succeed(job, [png])
        for _ in range(200):
            found = await stub.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job.job_id), metadata=carol
            )
            if found.state == common_pb2.JOB_STATE_SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        assert found.state == common_pb2.JOB_STATE_SUCCEEDED, found
        image = b"".join(
            [
                chunk.data
                async for chunk in stub.GetImage(
                    scheduler_pb2.GetImageRequest(job_id=job.job_id), metadata=carol
                )
            ]
        )
        assert image == png
        await agent.close()
        await self.aio_channel.close(grace=None)

    def summary(self, kind: str, seconds: float) -> dict[str, Any]:
        return {
            "database": kind,
            "examples": EXAMPLES[kind],
            "requests": self.requests,
            "accepted_submits": self.accepted,
            "seconds": round(seconds, 1),
            "counts": dict(sorted(self.codes.items())),
            "by_method": dict(sorted(self.by_method.items())),
            "agents_reached": dict(sorted(self.reached.items())),
        }


def print_line(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(text, flush=True)


def test_fuzzing_the_scheduler_and_the_agent_stream(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kind = "postgres" if db_url.startswith("postgresql") else "sqlite"
    errors = ErrorLog()
    root, agents_log = logging.getLogger(), logging.getLogger("scheduler.agents")
    agents_level = agents_log.level
    root.addHandler(errors)
    agents_log.setLevel(logging.INFO)
    # Hypothesis keeps caches (not examples: database=None) in its home
    # directory; this one, not .hypothesis in the checkout.
    hypothesis_home = storage_directory(intent_to_write=False).home_directory
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    began = time.monotonic()
    try:
        with scheduler_in_thread(tmp_path / "scheduler", db_url) as (server, loop):
            fuzz = Fuzzer(server, loop)

            @settings(
                max_examples=EXAMPLES[kind],
                deadline=None,
                derandomize=True,
                database=None,
                print_blob=False,
                # Every example leaves the scheduler changed: shrinking one
                # would replay it against another scheduler. Problems are
                # collected with their input instead.
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(st.data())
            def one_example(data: st.DataObject) -> None:
                fuzz.step(data)

            one_example()
            fuzz.check_healthy()
            fuzz.channel.close()
    finally:
        root.removeHandler(errors)
        agents_log.setLevel(agents_level)
        set_hypothesis_home_dir(hypothesis_home)
    summary = fuzz.summary(kind, time.monotonic() - began)
    summary["anomalies"] = fuzz.anomalies
    summary["errors_logged"] = errors.records
    RESULTS[kind] = summary
    (tmp_path / "fuzz_counts.json").write_text(json.dumps(summary, indent=2))
    print_line(
        capsys,
        f"\nfuzz counts ({kind}, {summary['requests']} requests, {summary['seconds']}s): "
        f"{{{', '.join(f'{code}: {n}' for code, n in summary['counts'].items())}}}",
    )
    problems = fuzz.anomalies + [f"logged: {line}" for line in errors.records]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    assert fuzz.accepted >= EXAMPLES[kind] // 40, "too few valid submits to check them"
    assert summary["requests"] >= EXAMPLES[kind]


def test_fuzzing_made_enough_requests(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    if not RESULTS:
        pytest.skip("the fuzzing did not run")
    counts: Counter[str] = Counter()
    for summary in RESULTS.values():
        counts.update(summary["counts"])
    total = sum(summary["requests"] for summary in RESULTS.values())
    path = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
    path.write_text(
        json.dumps({"requests": total, "counts": dict(counts), "runs": RESULTS}, indent=2)
    )
    print_line(
        capsys,
        f"\nfuzz counts: {{{', '.join(f'{c}: {n}' for c, n in sorted(counts.items()))}}} "
        f"({total} requests over {', '.join(RESULTS)}; {path})",
    )
    assert total >= MIN_REQUESTS_PER_RUN


def test_what_an_agent_says_of_an_ended_attempt_is_stored_as_one_printable_line(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the fuzzing: an attempt ended with a NUL in its reason made
    PostgreSQL refuse the write, and the job stayed ASSIGNED for good. The
    reason (and error kind) is stored as one printable line, cut short, and
    the job goes on."""
    nasty = "bad\x00\x1b[31m\u202eline\nbreak" + "x" * 1_000_000

    async def scenario() -> None:
        async with (
            running_scheduler(tmp_path / "scheduler", db_url, heartbeat_seconds=0.5) as server,
            aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            spec = common_pb2.JobSpec(prompt="p", width=64, height=64, steps=4)
            submitted = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec))
            job = await agent.assignment()
            agent.ended(job, agent_pb2.ATTEMPT_OUTCOME_FAILED, nasty, "oom\x00" * 100)
            job = await agent.assignment()  # back in the queue, and out again
            assert job.attempt == 2
            agent.ended(job, agent_pb2.ATTEMPT_OUTCOME_RELEASED, "\x00" * 10)
            job = await agent.assignment()
            agent.succeed(job, [small_png(64, 64)])
            for _ in range(200):
                found = await stub.GetJob(scheduler_pb2.GetJobRequest(job_id=submitted.job.id))
                if found.state == common_pb2.JOB_STATE_SUCCEEDED:
                    break
                await asyncio.sleep(0.05)
            assert found.state == common_pb2.JOB_STATE_SUCCEEDED
            first, second, _ = found.attempts
            assert first.reason.startswith("host-n1: bad\\x00\\x1b[31m\\u202eline breakxxx")
            assert len(first.reason) <= 600 and first.reason.isprintable()
            assert second.reason == "\\x00" * 10
            await agent.close()

    asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


POSTGRES_ONLY = {"hello-nul", "hello-too-long", "enroll-name-nul"}


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def reproduce(name: str, server: SchedulerServer) -> grpc.StatusCode:
    """The smallest input for each of FOUND_CRASHES, and how it ends."""
    registry = server.db.store.credentials
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        if name == "undecodable-request":
            key = registry.create_key("alice", admin=False, expires_at=None, actor="t")[1].text
            get_job = channel.unary_unary("/sdmesh.v1.Scheduler/GetJob", None, None)
            return await code_of(get_job(b"\x0a\x02\xff\xfe", metadata=bearer(key)))
        token = registry.create_join_token(
            expires_at=server.clock() + 60, reusable=True, labels={}, actor="t"
        )[1].text
        gateway = agent_pb2_grpc.AgentGatewayStub(channel)
        if name == "enroll-name-nul":
            request = agent_pb2.EnrollRequest(join_token=token, node_id="n1", name="n\x00")
            return await code_of(gateway.Enroll(request))
        request = agent_pb2.EnrollRequest(join_token=token, node_id="n1", name="n1")
        credential = (await gateway.Enroll(request)).credential
    first = hello("n1")
    if name == "hello-duplicate-models":
        first.hello.models.add(name="tiny", weight_bytes=GIB, dtype="float16")
    elif name == "hello-nul":
        first.hello.hostname = "host\x00"
    else:
        first.hello.hostname = "h" * 256
    agent = ScriptedAgent(server.port, "n1")
    try:
        await agent.connect(
            first, (("authorization", f"Bearer {credential}"), ("x-sdmesh-node", "n1"))
        )
    except aio.AioRpcError as exc:
        return exc.code()
    finally:
        await agent.close()
    return Code.OK


@pytest.mark.parametrize("name", list(FOUND_CRASHES))
def test_a_crash_found_by_fuzzing(name: str, tmp_path: Path) -> None:
    async def scenario(url: str) -> grpc.StatusCode:
        async with running_scheduler(tmp_path / "scheduler", url, no_auth=False) as server:
            return await reproduce(name, server)

    with database("postgres" if name in POSTGRES_ONLY else "sqlite", tmp_path) as url:
        code = asyncio.run(scenario(url))
    assert code in ALLOWED, f"{name}: {code.name}"
