"""Usage counters in Redis: one Lua script per decision, concurrent calls batched into one pipeline.

    store.py     RedisUsageStore: checks, records, reads (usage, billing buckets, tenant index), flush, close
    batching.py  its base `_Batcher`: one pipeline per loop iteration, calls in flight, timeouts, late replies
    calls.py     a script call waiting for a pipeline, and how its reply or failure reaches its caller
    scripts.py   the Lua scripts, the key lifetimes they are given, and `PreparedCheck` (packing, decisions)
    resp.py      the lean pipelined RESP connection of the hot path on a single node
    client.py    the redis-py client for a `redis.url` (single node or Redis Cluster)
    lua/         check_and_count.lua (one request's decision and counts), record.lua (after the response)
"""

from metering.redis_store.batching import MAX_CHECKS_PER_CALL
from metering.redis_store.scripts import PERIOD_KEY_GRACE
from metering.redis_store.store import RedisUsageStore

__all__ = ["MAX_CHECKS_PER_CALL", "PERIOD_KEY_GRACE", "RedisUsageStore"]
