"""The store's Lua scripts (`lua/*.lua`), registered once by their SHA1, and the key lifetimes they are given.

`PreparedCheck` is a check's EVALSHA of `lua/check_and_count.lua` packed ahead of time (all but the request
times), and reads the script's compact reply back into one Decision per request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from metering.store import Decision

PERIOD_KEY_GRACE = 7 * 86400  # period counters outlive their period by a week (late records, usage view)
RECORD_MARKER_TTL = 7 * 86400  # a spooled record replayed again within a week is applied once
# Records sent from the request path carry an id too, marked for this long: when a batch's reply is lost
# (a dropped connection, a timeout without a late reply) the record is spooled, and its replay is skipped
# if Redis had applied it after all. Replay starts within seconds of Redis answering again; only an outage
# longer than this after a lost reply leaves a window for counting that record twice. Short, because the
# hot path writes one marker per tenant and pipeline.
LIVE_RECORD_MARKER_TTL = 900
# How long a check call's marker stays (check_and_count.lua): the same window, for the same reason.
CALL_MARKER_TTL = LIVE_RECORD_MARKER_TTL
_CALL_TTL_ARG = b"$%d\r\n%d\r\n" % (len(str(CALL_MARKER_TTL)), CALL_MARKER_TTL)


class _Script:
    """One script of `lua/`, sent by its SHA1 (EVALSHA) once SCRIPT LOAD has registered it."""

    __slots__ = ("sha", "source")

    def __init__(self, name: str) -> None:
        self.source = (resources.files("metering.redis_store") / "lua" / name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


CHECK_SCRIPT = _Script("check_and_count.lua")
RECORD_SCRIPT = _Script("record.lua")


@dataclass(frozen=True, slots=True)
class PreparedCheck:
    """A check's script keys and arguments except the times (see `RedisUsageStore.prepare`).

    `head` and `tail` are the EVALSHA command already in RESP around the times of its requests, so
    sending it costs a concatenation instead of packing two dozen arguments per request.
    """

    tenant: str
    keys: list[str]
    args: list[Any]
    head: bytes  # EVALSHA, the sha, the number of keys and the keys, without the argument count
    tail: bytes  # the arguments after the times
    argc: int  # the command's arguments without the times
    used_names: tuple[str, ...]  # the meters of a decision's `used` values: counters, then guards
    used_units: tuple[int, ...]  # what one admitted request adds to each of them (0 for a guard)
    shape: tuple[bytes, bytes]  # (head, tail): equal for checks that may share one script call

    def decide(self, reply: Any, n: int) -> list[Decision]:
        """The decisions of the `n` requests of one script call, from its reply (see check_and_count.lua)."""
        if not isinstance(reply, list) or len(reply) != n + 1 or len(reply[0]) != len(self.used_names):
            raise ValueError(f"not a reply to {n} checks of {len(self.used_names)} meters")
        names, units = self.used_names, self.used_units
        # No client here decodes replies: float() takes a number's bytes as they are.
        before = [float(value) for value in reply[0]]
        one = len(names) == 1  # the common case: a dict literal costs a fraction of a comprehension
        decisions = []
        admitted = 0
        for item in reply[1:]:
            if item.__class__ is int:  # admitted: the rate's remaining, or -1
                admitted += 1
                allowed, reason, meter, retry_after, remaining, shadow = True, None, None, 0.0, item, None
            elif len(item) == 3:  # admitted, and a shadow rule would have refused it: {remaining, reason, meter}
                admitted += 1
                allowed, reason, meter, retry_after, remaining = True, None, None, 0.0, item[0]
                shadow = (item[1].decode(), item[2].decode())
            else:
                allowed, retry_after, shadow = False, float(item[2]), None
                reason, meter, remaining = item[0].decode(), item[1].decode() or None, item[3]
            if one:
                used = {names[0]: before[0] + units[0] * admitted}
            else:
                used = {name: start + unit * admitted for name, start, unit in zip(names, before, units, strict=True)}
            decisions.append(Decision(allowed, reason, meter, retry_after, used, None if remaining < 0 else remaining,
                                      shadow))
        return decisions

    def pack(self, nows: Sequence[bytes], call_id: str) -> bytes:
        """The whole command for requests at `nows` (microseconds, as digits) in the call `call_id`."""
        return b"".join((b"*%d\r\n" % (self.argc + len(nows) + 2), self.head, _bulk(len(nows)),
                         *[b"$%d\r\n%s\r\n" % (len(now), now) for now in nows], _bulk(call_id), _CALL_TTL_ARG,
                         self.tail))


def _bulk(value: Any) -> bytes:
    """One RESP bulk string, encoded as redis-py and hiredis encode arguments."""
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)
