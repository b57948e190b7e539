"""Stopping background tasks when a library may swallow their cancellation.

redis-py catches `CancelledError` in some windows while it disconnects and goes on as if nothing
happened; a loop task that was cancelled there keeps running, and a shutdown that awaits it hangs.
`cancel_and_wait` cancels again until each task has stopped, within a deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("cosmos_gateway.tasks")

RECANCEL_SECONDS = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None], *, deadline: float = 10.0) -> None:
    """Cancel `tasks` and wait until they are done, cancelling again every RECANCEL_SECONDS those
    that went on; after `deadline` seconds the ones still running are logged and left."""
    given = [task for task in tasks if task is not None]
    pending = {task for task in given if not task.done()}
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    while pending:
        for task in pending:
            task.cancel()
        left = give_up - loop.time()
        if left <= 0:
            log.error("tasks still running after %.0f s of cancelling: %s", deadline,
                      ", ".join(task.get_name() for task in pending))
            return
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, left))
    # Retrieve their outcomes, so none is reported as "exception was never retrieved".
    for task in given:
        if not task.cancelled():
            task.exception()
