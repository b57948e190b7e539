"""WebSocket passthrough: dial the upstream first, then accept the client, then relay frames.

Dialling first means a client is never told "101 Switching Protocols" for a socket the
upstream refuses. WebSockets are rare next to plain requests, so aiohttp's client is fine here.
A worker relays at most `max_connections` at once (beyond, 503 before dialling), and a relay with
no message either way for `idle_timeout` seconds is closed on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.errors import BadGateway, GatewayTimeout, UpstreamBusy

# Waiting for the other side's close frame, on either side, at most this long.
CLOSE_TIMEOUT = 5.0

# Negotiated per connection by aiohttp on each side; never copied across.
_WS_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
    "sec-websocket-accept", "host",
})


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade")
    if upgrade is None or upgrade.lower() != "websocket":
        return False
    connection = request.headers.get("Connection", "")
    return "upgrade" in (t.strip().lower() for t in connection.split(","))


class WebSocketRelay:
    def __init__(self, upstream_url: str, *, connect_timeout: float, max_connections: int = 1000,
                 idle_timeout: float = 300.0, max_message_size: int = 4 * 2**20) -> None:
        self._base = upstream_url.rstrip("/").replace("http://", "ws://", 1)
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._max_message_size = max_message_size
        self._session: aiohttp.ClientSession | None = None
        self.active = 0  # relays dialling or open

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def relay(self, request: web.BaseRequest, target: str, headers: list[tuple[str, str]],
                    rid: str) -> web.StreamResponse:
        if self.active >= self._max_connections:
            raise UpstreamBusy(f"this worker relays {self._max_connections} WebSockets already")
        self.active += 1
        try:
            return await self._relay(request, target, headers, rid)
        finally:
            self.active -= 1

    async def _relay(self, request: web.BaseRequest, target: str, headers: list[tuple[str, str]],
                     rid: str) -> web.StreamResponse:
        if self._session is None:
            # The client's own User-Agent is forwarded; aiohttp must not add one of its own.
            timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout,
                                            sock_connect=self._connect_timeout)
            # No connector limit (its default, 100, would queue the 101st upgrade): `max_connections` counts.
            self._session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent",),
                                                  timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        offered = request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        protocols = [p.strip() for p in offered if p.strip()]
        forward = [(k, v) for k, v in headers if k.lower() not in _WS_HANDSHAKE]
        try:
            upstream = await self._session.ws_connect(
                self._base + target, headers=forward, protocols=protocols, autoclose=False,
                autoping=True, max_msg_size=self._max_message_size,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                compress=0,
            )
        except TimeoutError:
            raise GatewayTimeout("the upstream did not accept the WebSocket in time") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise BadGateway(f"the upstream refused the WebSocket upgrade (status {exc.status})") from None
        except (aiohttp.ClientError, OSError):
            raise BadGateway("the upstream could not be reached") from None
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (), autoclose=False, autoping=True,
            max_msg_size=self._max_message_size, timeout=CLOSE_TIMEOUT,
        )
        client.headers["X-Request-Id"] = rid
        code = WSCloseCode.OK
        try:
            await client.prepare(request)
            if await _pump_both(client, upstream, self._idle_timeout):
                code = WSCloseCode.GOING_AWAY
        finally:
            await upstream.close(code=code)
            if not client.closed:
                await client.close(code=code)
        return client


class _Activity:
    """When a relay last carried a message, either way."""

    __slots__ = ("last", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last = loop.time()


async def _pump_both(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                     idle_timeout: float) -> bool:
    """Relay both ways until one side closes (False) or neither sends for `idle_timeout` (True)."""
    loop = asyncio.get_running_loop()
    activity = _Activity(loop)
    tasks = [asyncio.ensure_future(_pump(client, upstream, activity)),
             asyncio.ensure_future(_pump(upstream, client, activity))]
    idle = loop.create_future()

    def check() -> None:
        nonlocal timer
        due = activity.last + idle_timeout
        if loop.time() >= due:
            if not idle.done():
                idle.set_result(None)
        else:  # one timer per relay, moved on lazily: nothing to do per message but note the time
            timer = loop.call_at(due, check)

    timer = loop.call_at(activity.last + idle_timeout, check)
    try:
        await asyncio.wait([*tasks, idle], return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return idle.done()


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, activity: _Activity) -> None:
    async for message in source:
        activity.last = activity.loop.time()
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == WSMsgType.CLOSE:
            await sink.close(code=source.close_code or 1000, message=(message.extra or "").encode())
            return
        elif message.type in (WSMsgType.ERROR, WSMsgType.CLOSED):
            return
    # Iteration ends when the source closed: close the other side with the same code.
    await sink.close(code=source.close_code or 1000)
