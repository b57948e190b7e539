"""The redis-py client for a `redis.url`: a single node, or (`redis+cluster://`) a Redis Cluster."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].endswith("+cluster")


def redis_client(url: str) -> aioredis.Redis | RedisCluster:
    """A client for `redis://`, `rediss://`, `unix://` or (`redis+cluster://`) a Redis Cluster."""
    if is_cluster_url(url):
        # No whole-pipeline retries: redis-py would send a batch again after a timeout although some
        # nodes may have run it, counting those requests twice. MOVED/ASK are still followed (they mean
        # "not run here"); a failed batch is fail-open/fail-closed business, decided by the limiter.
        return RedisCluster.from_url(url.replace("+cluster", "", 1), socket_timeout=0.5,
                                     socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
