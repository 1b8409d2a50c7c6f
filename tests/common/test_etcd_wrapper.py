"""The etcd wrapper against a real etcd: CAS, leases, watches, unavailability."""

import asyncio

import pytest

from common.etcd import Etcd, EtcdUnavailable, LeaseKeeper, parse_endpoint
from tests.conftest import run_async


def test_put_get_cas_and_prefix(etcd_url):
    async def body():
        async with Etcd(etcd_url) as etcd:
            assert await etcd.get("/t/a") is None
            assert await etcd.create("/t/a", "1")
            assert not await etcd.create("/t/a", "2")
            kv = await etcd.get("/t/a")
            assert kv.value == "1"
            assert await etcd.put_if_revision("/t/a", "3", kv.mod_revision)
            assert not await etcd.put_if_revision("/t/a", "4", kv.mod_revision)
            assert await etcd.put_many_if("/t/a", (await etcd.get("/t/a")).mod_revision, {"/t/b": "x", "/t/c": "y"})
            assert [k.key for k in await etcd.get_prefix("/t/")] == ["/t/a", "/t/b", "/t/c"]
            assert await etcd.delete_prefix("/t/") == 3

    run_async(body())


def test_lease_expires_without_keeper_and_lives_with_it(etcd_url):
    async def body():
        async with Etcd(etcd_url) as etcd:
            kept = await etcd.grant_lease(2)
            dropped = await etcd.grant_lease(2)
            await etcd.put("/l/kept", "1", lease=kept)
            await etcd.put("/l/dropped", "1", lease=dropped)
            keeper = LeaseKeeper(etcd, kept, 2)
            keeper.start()
            await asyncio.sleep(3.5)
            assert await etcd.get("/l/kept") is not None
            assert await etcd.get("/l/dropped") is None
            await keeper.stop(revoke=True)
            assert await etcd.get("/l/kept") is None

    run_async(body())


def test_watch_sees_puts_and_deletes(etcd_url):
    async def body():
        async with Etcd(etcd_url) as etcd:
            seen = []

            async def watcher():
                async for ev in etcd.watch_prefix("/w/"):
                    seen.append((ev.kind, ev.key, ev.value))
                    if len(seen) == 2:
                        return

            task = asyncio.create_task(watcher())
            await asyncio.sleep(0.3)
            await etcd.put("/w/x", "1")
            await etcd.delete("/w/x")
            await asyncio.wait_for(task, 5)
            assert seen == [("put", "/w/x", "1"), ("delete", "/w/x", "")]

    run_async(body())


def test_unreachable_etcd_is_a_temporary_error(etcd_server):
    async def body():
        etcd = Etcd(etcd_server.url, timeout_s=1.0)
        await etcd.connect()
        etcd_server.kill()
        with pytest.raises(EtcdUnavailable):
            await etcd.put("/x", "1")
        await etcd.close()

    run_async(body())


def test_parse_endpoint_rejects_garbage():
    assert parse_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    with pytest.raises(ValueError):
        parse_endpoint("not a url")
