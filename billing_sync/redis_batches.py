"""Batches of Redis commands, one round trip each, for the mover of `billing_sync.ledger`.

The mover sends each step of a move (lock, stage, store the plans, carry, release) for a whole group of
buckets at once. To a single Redis node over plain TCP a batch goes on a lean connection
(`metering.redis_store.resp`: hiredis packs and parses in C, where redis-py's pipeline spent half of a
move's CPU in Python); to a Redis Cluster, over TLS or a unix socket, as a redis-py pipeline. Either way
the replies come back in order, a command Redis refused as a `ResponseError` in its place, and a hash as a
dict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from metering.redis_store.resp import RespConnection

BATCH_TIMEOUT = 10.0  # seconds for the replies of one batch; then the connection is closed and the pass fails


class RedisBatches:
    """Sends batches of commands to `redis`; `close()` when done."""

    def __init__(self, redis: Redis | RedisCluster, *, timeout: float = BATCH_TIMEOUT) -> None:
        self._redis = redis
        self._timeout = timeout
        # Only a plain client: a subclass may change how commands are sent (the tests' fault doubles do).
        self._resp = RespConnection.for_client(redis) if type(redis) is Redis else None

    async def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The replies to `commands`, sent at once; refused commands' `ResponseError`s in their places."""
        if not commands:
            return []
        if self._resp is None:
            pipe = self._redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            async with asyncio.timeout(self._timeout):  # the same deadline as the single-node path
                return list(await pipe.execute(raise_on_error=False))
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._resp.execute(commands)
        except TimeoutError:
            self._resp.close()  # Redis is stuck: the next batch starts on a new connection
            raise
        return [ResponseError(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply for reply in replies]

    async def run_checked(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """`run`, raising the first refusal: for commands Redis has no reason to refuse."""
        replies = await self.run(commands)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()


def as_hash(reply: Any) -> dict[Any, Any]:
    """An HGETALL reply as a dict: redis-py makes one, hiredis hands the flat field/value list."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))
