"""Leader election through one etcd key under the leader's lease.

A replica becomes leader by creating ``Keys.leader()`` (create-if-absent) under
its own lease and keeps the lease alive (``LeaseKeeper``). Standbys watch the
key from the revision they read it at, so they cannot miss its deletion, and
try to create it the moment it disappears: after a leader dies, a standby leads
within the lease TTL (plus etcd's expiry granularity).

A leader that cannot refresh its lease for a TTL steps down (``on_demoted``)
before anyone else can have taken over, then competes again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from common.etcd import Etcd, EtcdError, EtcdUnavailable, LeaseKeeper
from common.retry import Backoff
from protos.keys import Keys
from protos.records import LeaderRecord, RecordError

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(self, etcd: Etcd, keys: Keys, record: LeaderRecord, *, ttl_s: int,
                 on_elected: Callable[[], Awaitable[None]], on_demoted: Callable[[str], Awaitable[None]]) -> None:
        if ttl_s < 1:
            raise ValueError(f"leader lease TTL must be >= 1 s, got {ttl_s}")
        self.etcd = etcd
        self.keys = keys
        self.record = record
        self.ttl_s = ttl_s
        self.on_elected = on_elected
        self.on_demoted = on_demoted
        self.is_leader = False
        self.leader: LeaderRecord | None = None
        """The current leader as last seen (self when leading)."""
        self._keeper: LeaseKeeper | None = None

    async def run(self) -> None:
        backoff = Backoff(0.1, 1.0)
        while True:
            try:
                lost = asyncio.Event()
                lease = await self.etcd.grant_lease(self.ttl_s)
                if await self._try_lead(lease, lost):
                    backoff.reset()
                    await lost.wait()
                    continue
                await self._revoke(lease)
                await self._wait_for_vacancy()
                backoff.reset()
            except EtcdUnavailable as exc:
                log.warning("leader election: etcd unavailable (will retry): %s", exc)
                await backoff.sleep()
            except EtcdError as exc:  # permanent for that request: this round is skipped, the next starts afresh
                log.error("leader election round skipped: etcd refused a request: %s", exc)
                await backoff.sleep()

    async def _try_lead(self, lease: int, lost: asyncio.Event) -> bool:
        record = LeaderRecord(id=self.record.id, address=self.record.address, since=time.time())
        if not await self.etcd.create(self.keys.leader(), record.to_json(), lease=lease):
            return False

        async def demoted(reason: str) -> None:
            self.is_leader = False
            log.warning("controller %s lost leadership: %s", self.record.id, reason)
            await self.on_demoted(reason)
            lost.set()

        keeper = LeaseKeeper(self.etcd, lease, self.ttl_s, on_lost=demoted)
        keeper.start()
        self._keeper = keeper
        self.is_leader = True
        self.leader = record
        log.info("controller %s is the leader (%s)", record.id, record.address)
        await self.on_elected()
        return True

    async def resign(self) -> None:
        """Stop keeping the leader lease and revoke it (call after cancelling ``run``):
        the leader key disappears now, so a standby leads at once instead of after a TTL."""
        keeper, self._keeper = self._keeper, None
        was_leader, self.is_leader = self.is_leader, False
        if keeper is not None:
            await keeper.stop(revoke=was_leader)
            if was_leader:
                log.info("controller %s resigned leadership", self.record.id)

    async def _revoke(self, lease: int) -> None:
        try:
            await self.etcd.revoke_lease(lease)
        except (EtcdError, EtcdUnavailable) as exc:
            log.debug("revoke unused lease: %s", exc)

    async def _wait_for_vacancy(self) -> None:
        """Return when the leader key is gone (or after a TTL, to look again)."""
        kv = await self.etcd.get(self.keys.leader())
        if kv is None:
            return
        try:
            self.leader = LeaderRecord.from_json(kv.value)
        except RecordError as exc:
            log.warning("malformed leader record (waiting for its lease to expire): %s", exc)
            self.leader = None

        async def deleted() -> None:
            async for ev in self.etcd.watch_prefix(self.keys.leader(), start_revision=kv.mod_revision + 1):
                if ev.key == self.keys.leader() and ev.kind == "delete":
                    return
        try:
            await asyncio.wait_for(deleted(), self.ttl_s)
        except asyncio.TimeoutError:
            pass
