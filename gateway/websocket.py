"""WebSocket passthrough: dial the upstream first, then accept the client, then relay frames.

Dialling first means a client is never told "101 Switching Protocols" for a socket the
upstream refuses. WebSockets are rare next to plain requests, so aiohttp's client is fine here.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web

from gateway.errors import BadGateway, GatewayTimeout

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
    def __init__(self, upstream_url: str, *, connect_timeout: float,
                 max_message_size: int = 4 * 2**20) -> None:
        self._base = upstream_url.rstrip("/").replace("http://", "ws://", 1)
        self._connect_timeout = connect_timeout
        self._max_message_size = max_message_size
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def relay(self, request: web.BaseRequest, target: str, headers: list[tuple[str, str]],
                    rid: str) -> web.StreamResponse:
        if self._session is None:
            # The client's own User-Agent is forwarded; aiohttp must not add one of its own.
            timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout,
                                            sock_connect=self._connect_timeout)
            self._session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("User-Agent",),
                                                  timeout=timeout)
        offered = request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        protocols = [p.strip() for p in offered if p.strip()]
        forward = [(k, v) for k, v in headers if k.lower() not in _WS_HANDSHAKE]
        try:
            upstream = await self._session.ws_connect(
                self._base + target, headers=forward, protocols=protocols, autoclose=False,
                autoping=True, max_msg_size=self._max_message_size,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
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
            max_msg_size=self._max_message_size,
        )
        client.headers["X-Request-Id"] = rid
        try:
            await client.prepare(request)
            await _pump_both(client, upstream)
        finally:
            await upstream.close()
            if not client.closed:
                await client.close()
        return client


async def _pump_both(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    tasks = [asyncio.ensure_future(_pump(client, upstream)), asyncio.ensure_future(_pump(upstream, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    async for message in source:
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
