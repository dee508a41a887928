"""Server interceptors: one turns exceptions into gRPC statuses and logs the
unexpected ones once; one turns every call away from a standby replica; one
authenticates the caller and sets its Principal.

Both wrap the method handler's behaviour in an async context manager, which
works the same for unary and for streaming responses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc import aio

from scheduler.auth import Authenticator
from scheduler.errors import Standby, status_of
from scheduler.leadership import ReplicaState
from scheduler.principal import Principal, _current, _node_labels, unauthenticated_principal
from sdmesh.errors import InvalidArgument
from sdmesh.wire import (
    AUTHORIZATION_METADATA_KEY,
    NODE_METADATA_KEY,
    USER_METADATA_KEY,
    parse_bearer,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
    Guard = Callable[[aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]
Metadata = tuple[tuple[str, str | bytes], ...]


def _parser(handler: Handler) -> Callable[[Any], Any]:
    """Turns a request's raw bytes into its message. gRPC would do it before
    any interceptor runs and answer bytes that do not parse with UNKNOWN
    (and a logged traceback); parsed here, inside the guard, they are
    INVALID_ARGUMENT like any other bad input."""
    deserialize = handler.request_deserializer

    def parse(raw: Any) -> Any:
        if deserialize is None or not isinstance(raw, bytes):
            return raw
        try:
            return deserialize(raw)
        except Exception:  # DecodeError, invalid UTF-8 in a string field
            raise InvalidArgument(
                "request", f"is not a valid message for this method ({len(raw)} bytes)"
            ) from None

    return parse


def _wrap(handler: Handler, guard: Guard, *, parse_requests: bool = False) -> Handler:
    """The same method handler, with its behaviour run inside `guard`; with
    `parse_requests`, requests arrive as bytes and are parsed inside it."""
    kind = (
        f"{'stream' if handler.request_streaming else 'unary'}_"
        f"{'stream' if handler.response_streaming else 'unary'}"
    )  # unary_unary, unary_stream, stream_unary or stream_stream
    behaviour = getattr(handler, kind)
    parse = _parser(handler) if parse_requests else (lambda raw: raw)

    def requests_of(raw: Any) -> Any:
        if not handler.request_streaming:
            return parse(raw)

        async def parsed() -> AsyncIterator[Any]:
            async for item in raw:
                yield parse(item)

        return parsed()

    wrapped: Callable[..., Any]
    if handler.response_streaming:

        async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                async for response in behaviour(requests_of(request), context):
                    yield response

        wrapped = streaming
    else:

        async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                return await behaviour(requests_of(request), context)

        wrapped = unary
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return cast(
        "Handler",
        factory(
            wrapped,
            request_deserializer=None if parse_requests else handler.request_deserializer,
            response_serializer=handler.response_serializer,
        ),
    )


class _GuardInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every method's behaviour in the guard `guard_for` returns."""

    # The outermost interceptor parses requests inside its guard.
    parses_requests = False

    def guard_for(self, details: grpc.HandlerCallDetails) -> Guard:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap(
            handler,
            self.guard_for(handler_call_details),
            parse_requests=self.parses_requests,
        )


class ErrorInterceptor(_GuardInterceptor):
    """An error raised on purpose -> its status (`scheduler.errors`) with its
    message; anything else -> INTERNAL, logged with its traceback. It is
    the outermost interceptor, so it also parses every request: bytes that
    are not a valid message are INVALID_ARGUMENT."""

    parses_requests = True

    def guard_for(self, details: grpc.HandlerCallDetails) -> Guard:
        method = details.method

        @asynccontextmanager
        async def guard(context: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            try:
                yield
            except aio.AbortError:
                raise
            except Exception as exc:
                status = status_of(exc)
                if status is not None:
                    log.debug("%s: %s", method, exc)
                    code, trailing = status
                    await context.abort(code, str(exc), trailing_metadata=trailing)
                log.exception("%s failed", method)
                # Never the exception's text: it may hold SQL or the input.
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error ({type(exc).__name__}); the scheduler's log has the details",
                )

        return guard


def _metadata_value(metadata: Metadata, wanted: str) -> str | None:
    for key, value in metadata:
        if key == wanted:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def bearer_of(metadata: Metadata) -> str | None:
    """The token of `authorization: Bearer TOKEN`, or None."""
    return parse_bearer(_metadata_value(metadata, AUTHORIZATION_METADATA_KEY))


class AuthInterceptor(_GuardInterceptor):
    """Sets the calling Principal. With auth on, a client's call needs an
    API key and an agent's stream and input fetches its node credential
    (`scheduler.auth`); a join token is checked by Enroll itself, and
    GetHealth is open, so
    that clients and agents can find the leader before they authenticate.
    With --no-auth, `x-sdmesh-user` names the caller, as before keys."""

    OPEN_METHODS = frozenset({"/sdmesh.v1.Scheduler/GetHealth", "/sdmesh.v1.AgentGateway/Enroll"})
    NODE_METHODS = frozenset(
        {"/sdmesh.v1.AgentGateway/Connect", "/sdmesh.v1.AgentGateway/FetchInput"}
    )

    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator  # None: --no-auth

    def guard_for(self, details: grpc.HandlerCallDetails) -> Guard:
        metadata: Metadata = tuple(details.invocation_metadata or ())
        method = details.method
        authenticator = self.authenticator

        async def principal() -> Principal:
            if authenticator is None or method in self.OPEN_METHODS:
                return unauthenticated_principal(_metadata_value(metadata, USER_METADATA_KEY))
            if method in self.NODE_METHODS:
                node, labels = await authenticator.node(
                    bearer_of(metadata), _metadata_value(metadata, NODE_METADATA_KEY) or ""
                )
                _node_labels.set(labels)
                return node
            return await authenticator.user(bearer_of(metadata))

        @asynccontextmanager
        async def guard(_: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            token = _current.set(await principal())
            try:
                yield
            finally:
                # A streaming response may be closed from another context.
                with suppress(ValueError):
                    _current.reset(token)

        return guard


class LeaderInterceptor(_GuardInterceptor):
    """A standby answers only GetHealth; everything else gets UNAVAILABLE
    with the standby's trailing metadata (`sdmesh.wire.is_standby`), which
    sends agents and clients on to the next address in their list."""

    OPEN_METHODS = frozenset({"/sdmesh.v1.Scheduler/GetHealth"})

    def __init__(self, replica: ReplicaState) -> None:
        self.replica = replica

    def guard_for(self, details: grpc.HandlerCallDetails) -> Guard:
        replica = self.replica
        open_method = details.method in self.OPEN_METHODS

        @asynccontextmanager
        async def guard(_: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            if not open_method and not replica.leading:
                raise Standby(replica.standby_message(), replica.leader_address)
            yield

        return guard
