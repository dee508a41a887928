"""Server interceptors: one turns exceptions into gRPC statuses and logs the
unexpected ones once; one turns every call away from a standby replica; one
sets the calling Principal from request metadata.

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

from scheduler.errors import Standby, status_of
from scheduler.leadership import ReplicaState
from scheduler.principal import _current, principal_from_metadata

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
    Guard = Callable[[aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]


def _wrap(handler: Handler, guard: Guard) -> Handler:
    """The same method handler, with its behaviour run inside `guard`."""
    kind = (
        f"{'stream' if handler.request_streaming else 'unary'}_"
        f"{'stream' if handler.response_streaming else 'unary'}"
    )  # unary_unary, unary_stream, stream_unary or stream_stream
    behaviour = getattr(handler, kind)
    wrapped: Callable[..., Any]
    if handler.response_streaming:

        async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                async for response in behaviour(request, context):
                    yield response

        wrapped = streaming
    else:

        async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                return await behaviour(request, context)

        wrapped = unary
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return cast(
        "Handler",
        factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        ),
    )


class _GuardInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every method's behaviour in the guard `guard_for` returns."""

    def guard_for(self, details: grpc.HandlerCallDetails) -> Guard:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap(handler, self.guard_for(handler_call_details))


class ErrorInterceptor(_GuardInterceptor):
    """An error raised on purpose -> its status (`scheduler.errors`) with its
    message; anything else -> INTERNAL, logged with its traceback."""

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
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
                )

        return guard


class PrincipalInterceptor(_GuardInterceptor):
    def guard_for(self, details: grpc.HandlerCallDetails) -> Guard:
        metadata = tuple(details.invocation_metadata or ())

        @asynccontextmanager
        async def guard(_: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            token = _current.set(principal_from_metadata(metadata))
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
