"""The spool's line format: one JSON object per `Record`, and reading lines back (pure, no I/O).

    {"id": "<uuid4 hex>", "tenant": "acme", "period_start": 1719792000, "period_end": 1722470400,
     "bucket_start": 1719800100, "bucket_ttl": 691200, "refund": [], "add": [["bandwidth_bytes", 512]],
     "gauges": [], "count": [["api_calls", 1]], "bill": [["api_calls", 1]], "call": [<marker key>, <index>, <mode>]}

A line that does not parse (a crash mid-write, a hand-edited file) is no record: readers skip it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from metering.store import Record

_PAIRS = ("refund", "add", "gauges", "count", "bill")


def to_entry(record: Record) -> dict[str, Any]:
    """The JSON form of a record; it must carry a `record_id`."""
    if record.record_id is None:
        raise ValueError("a spooled record needs a record_id")
    entry: dict[str, Any] = {
        "id": record.record_id, "tenant": record.tenant, "period_start": record.period_start,
        "period_end": record.period_end, "bucket_start": record.bucket_start, "bucket_ttl": record.bucket_ttl,
    }
    for name in _PAIRS:
        entry[name] = [list(pair) for pair in getattr(record, name)]
    if record.check_call is not None:
        entry["call"] = [record.check_call[0], record.check_call[1], 2 if record.only_if_admitted else 1]
    return entry


def _pairs(raw: Any, value_type: type) -> tuple[tuple[str, Any], ...]:
    if not isinstance(raw, list):
        raise ValueError("expected a list of [meter, value]")
    pairs = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"bad pair {item!r}")
        value = item[1]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"bad value {value!r}")
        pairs.append((item[0], value_type(value)))
    return tuple(pairs)


def from_entry(entry: Any) -> Record:
    """The record of one JSON entry; ValueError (or TypeError/KeyError) when it is not one."""
    if not isinstance(entry, dict):
        raise ValueError("an entry is a JSON object")
    ints = [entry[name] for name in ("period_start", "period_end", "bucket_start", "bucket_ttl")]
    if any(type(value) is not int for value in ints) or not isinstance(entry["tenant"], str):
        raise ValueError("bad tenant or epoch")
    if not isinstance(entry["id"], str):
        raise ValueError("bad id")
    call = entry.get("call")
    if call is not None and not (isinstance(call, list) and len(call) == 3 and isinstance(call[0], str)
                                 and type(call[1]) is int and call[2] in (1, 2)):
        raise ValueError("bad call")
    return Record(
        entry["tenant"], *ints,
        refund=_pairs(entry["refund"], int), add=_pairs(entry["add"], int),
        gauges=_pairs(entry["gauges"], float), count=_pairs(entry["count"], int),
        bill=_pairs(entry["bill"], int), record_id=entry["id"],
        check_call=None if call is None else (call[0], call[1]), only_if_admitted=call is not None and call[2] == 2,
    )


def line_of(record: Record) -> bytes:
    return json.dumps(to_entry(record), separators=(",", ":")).encode() + b"\n"


def parse_line(line: bytes) -> Record | None:
    if not line.strip():
        return None
    try:
        return from_entry(json.loads(line))
    except (ValueError, TypeError, KeyError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def read_batch(lines: Iterator[tuple[bytes, int]], size: int) -> tuple[list[Record], int, int | None]:
    """Up to `size` records from `lines`, the lines that were not records, and the offset after them."""
    records: list[Record] = []
    bad, end = 0, None
    for line, end in lines:  # noqa: B007  (`end` is read after the loop)
        record = parse_line(line)
        if record is not None:
            records.append(record)
            if len(records) >= size:
                break
        elif line.strip():
            bad += 1
    return records, bad, end
