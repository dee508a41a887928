"""The SDK against the real scheduler, in process, with keys and mutual TLS
on: the certificates from `make_cluster_certs`, keys from the scheduler's
own registry. A user with a key and a certificate submits and deletes;
without a key, with another user's key, or without a certificate, the
answer is the error sdctl turns into its exit code."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from client import AsyncClient, AuthenticationError, NotFoundError, UnavailableError
from scheduler.server import SchedulerServer
from sdmesh.tls import make_cluster_certs
from tests.scripted import running_scheduler


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 60))


def keys(server: SchedulerServer, *users: str) -> dict[str, str]:
    registry = server.db.store.credentials
    return {
        user: registry.create_key(user, admin=False, expires_at=None, actor="test")[1].text
        for user in users
    }


def test_a_user_with_a_key_and_a_certificate_submits_and_deletes(tmp_path: Path) -> None:
    certs = make_cluster_certs(tmp_path / "certs", ["127.0.0.1"], clients=("alice",))

    def mutual(address: str, api_key: str | None) -> AsyncClient:
        return AsyncClient(
            address,
            api_key=api_key,
            ca_cert=certs["ca"],
            client_cert=certs["alice"],
            client_key=certs["alice-key"],
        )

    async def scenario() -> None:
        async with running_scheduler(
            tmp_path / "scheduler",
            no_auth=False,
            tls_cert=certs["scheduler"],
            tls_key=certs["scheduler-key"],
            client_ca=certs["ca"],
        ) as server:
            address = f"127.0.0.1:{server.port}"
            key = keys(server, "alice", "bob")
            async with mutual(address, key["alice"]) as alice:
                handle = await alice.submit("a lighthouse", width=64, height=64, steps=4)
                assert (await handle.refresh()).owner == "alice"
                async with mutual(address, key["bob"]) as bob:
                    with pytest.raises(NotFoundError):  # another user's job is not there
                        await bob.delete(handle.id)
                async with mutual(address, None) as nobody:
                    with pytest.raises(AuthenticationError) as refused:
                        await nobody.get_job(handle.id)
                    assert refused.value.exit_code == 4
                async with AsyncClient(
                    address, api_key=key["alice"], ca_cert=certs["ca"]
                ) as uncertified:
                    with pytest.raises(UnavailableError, match="check --client-cert"):
                        await uncertified.get_job(handle.id)
                assert await handle.delete() == 0  # queued: cancelled, then gone
                with pytest.raises(NotFoundError):
                    await alice.get_job(handle.id)

    run(scenario())
