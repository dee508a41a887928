"""The blocking SDK: a thin wrapper that runs `AsyncClient` on a private
event loop in a background thread. Every method forwards to the async core."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar, Unpack

from client._async import AsyncClient, AsyncJobHandle, OnRetry
from client._config import DEFAULT_RECONNECT_TIMEOUT
from client._inputs import ImageInput, SubmitOptions
from client._models import Event, Health, Image, Job, Model, Node
from sdmesh.kinds import InputInfo

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="sdmesh-client", daemon=True
        )
        self._thread.start()
        # The pumps of iterators still open: closing the client stops them,
        # whether or not their iterators were closed (one left behind by an
        # exception is closed only when it is collected, after the loop).
        self._pumps: set[asyncio.Task[None]] = set()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs `coroutine` on the loop and returns what it returns, or
        raises what it raised, here: a SystemExit or KeyboardInterrupt
        raised on the loop (from an on_retry callback) would otherwise end
        the loop's thread, and every later call would wait for ever."""

        async def guarded() -> tuple[bool, Any]:
            try:
                return True, await coroutine
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                return False, exc

        succeeded, value = asyncio.run_coroutine_threadsafe(guarded(), self.loop).result()
        if not succeeded:
            raise value
        result: T = value
        return result

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Yields what the async iterator yields. A task on the loop pumps it
        into a queue, so that leaving early (an exception, Ctrl-C) can cancel
        the task and wait for it, and the stream is always closed."""
        items: queue.Queue[tuple[bool, Any]] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in iterator:
                    items.put((True, item))
            except asyncio.CancelledError as exc:  # ends the sync side too
                items.put((False, exc))
                raise
            except BaseException as exc:
                # Raised on the caller's side, not here: a SystemExit from an
                # on_retry callback (rich's, on a broken pipe) would end the
                # loop's thread and leave every later call waiting for ever.
                items.put((False, exc))
                return
            items.put((False, None))

        async def start() -> asyncio.Task[None]:
            task = asyncio.ensure_future(pump())
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)
            return task

        task = self.run(start())
        try:
            while True:
                more, value = items.get()
                if more:
                    yield value
                elif value is None:
                    return
                else:
                    raise value
        finally:
            if not self.loop.is_closed():
                self.run(_stop(task))

    def close(self) -> None:
        async def stop_pumps() -> None:  # on the loop, where the set changes
            await _stop(*self._pumps)

        self.run(stop_pumps())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with suppress(BaseException):
            await task


class Client:
    """Blocking twin of `AsyncClient`, with the same arguments (the API key
    and TLS files among them); use as `with Client() as client:`.
    `on_retry` is called on the client's own thread."""

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        user: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        on_retry: OnRetry | None = None,
        api_key: str | None = None,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> None:
        self._runner = _LoopThread()

        async def make() -> AsyncClient:  # the channels must belong to that loop
            return AsyncClient(
                address,
                user=user,
                timeout=timeout,
                reconnect_timeout=reconnect_timeout,
                on_retry=on_retry,
                api_key=api_key,
                ca_cert=ca_cert,
                client_cert=client_cert,
                client_key=client_key,
            )

        try:
            self._async = self._runner.run(make())
        except BaseException:
            self._runner.close()
            raise
        self.addresses = self._async.addresses
        self.user = self._async.user
        self.tls = self._async.tls

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self._async.address

    @property
    def on_retry(self) -> OnRetry | None:
        return self._async.on_retry

    @on_retry.setter
    def on_retry(self, hook: OnRetry | None) -> None:
        self._async.on_retry = hook

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._async.close())
        self._runner.close()

    def submit(self, prompt: str, **options: Unpack[SubmitOptions]) -> JobHandle:
        """Queues a job; see `SubmitOptions` for what it can ask for."""
        return JobHandle(self, self._runner.run(self._async.submit(prompt, **options)))

    def upload(self, image: ImageInput, *, field: str = "image") -> InputInfo:
        """See `AsyncClient.upload`."""
        return self._runner.run(self._async.upload(image, field=field))

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, self._async.job(job_id))

    def get_job(self, job_id: str) -> Job:
        return self._runner.run(self._async.get_job(job_id))

    def list_jobs(
        self, *, states: Iterable[str] = (), owner: str = "", limit: int = 50
    ) -> list[Job]:
        return self._runner.run(self._async.list_jobs(states=states, owner=owner, limit=limit))

    def cancel(self, job_id: str) -> Job:
        return self._runner.run(self._async.cancel(job_id))

    def delete(self, job_id: str) -> int:
        """See `AsyncClient.delete`."""
        return self._runner.run(self._async.delete(job_id))

    def watch(self, job_id: str, after_seq: int = 0) -> Iterator[Event]:
        return self._runner.iterate(self._async.watch(job_id, after_seq))

    def download_image(self, job_id: str, index: int) -> Image:
        return self._runner.run(self._async.download_image(job_id, index))

    def list_nodes(self) -> list[Node]:
        return self._runner.run(self._async.list_nodes())

    def list_models(self) -> list[Model]:
        return self._runner.run(self._async.list_models())

    def drain_node(self, node: str, *, timeout: float | None = None, undo: bool = False) -> Node:
        """See `AsyncClient.drain_node`."""
        return self._runner.run(self._async.drain_node(node, timeout=timeout, undo=undo))

    def health(self, address: str | None = None) -> Health:
        """See `AsyncClient.health`."""
        return self._runner.run(self._async.health(address))


class JobHandle:
    """A handle on one job: its events, its end, its images."""

    def __init__(self, client: Client, handle: AsyncJobHandle) -> None:
        self._client = client
        self._handle = handle
        self.id = handle.id

    def __repr__(self) -> str:
        return repr(self._handle).replace("AsyncJobHandle", "JobHandle")

    @property
    def last_known(self) -> Job | None:
        return self._handle.last_known

    def refresh(self) -> Job:
        return self._client._runner.run(self._handle.refresh())

    def events(self, after_seq: int = 0) -> Iterator[Event]:
        return self._client._runner.iterate(self._handle.events(after_seq))

    def wait(self) -> Job:
        return self._client._runner.run(self._handle.wait())

    def images(self) -> list[Image]:
        return self._client._runner.run(self._handle.images())

    def save_images(self, directory: str | Path) -> list[Path]:
        return self._client._runner.run(self._handle.save_images(directory))

    def cancel(self) -> Job:
        return self._client._runner.run(self._handle.cancel())

    def delete(self) -> int:
        return self._client._runner.run(self._handle.delete())
