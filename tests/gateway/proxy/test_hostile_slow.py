"""Slow and idle clients cannot starve others (PRODUCT.md §3, §5): bounded waits for an upstream
connection, WebSocket limits and idle timeouts. A real `cosmos-gateway serve` process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.gateway.conftest import StartGateway
from tests.support import GatewayProcess, Upstream, bearer

pytestmark = pytest.mark.timeout(90)

DEPLOY = "/api/chains/c1/deployments"
PLANS: dict[str, Any] = {"starter": {"rate": {"per_second": 1000, "burst": 1000},
                                     "quotas": {"chain_deployments": {"limit": 100}}}}


@dataclass
class State:
    open_websockets: int = 0


def slow_app(state: State) -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "2")))
        return web.Response(text="slow")

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        state.open_websockets += 1
        try:
            async for message in ws:
                if message.type == web.WSMsgType.TEXT:
                    await ws.send_str("echo:" + message.data)
        finally:
            state.open_websockets -= 1
        return ws

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await request.read())})

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass
class Setup:
    gateway: GatewayProcess
    state: State

    @property
    def url(self) -> str:
        return self.gateway.url


MakeSetup = Callable[..., Awaitable[Setup]]


@pytest.fixture
def make(start_gateway: StartGateway) -> MakeSetup:
    async def start(**overrides: Any) -> Setup:
        state = State()
        upstream = await Upstream(slow_app(state)).start()
        overrides["upstream"] = {"read_timeout": 10, **overrides.get("upstream", {})}
        return Setup(start_gateway(upstream, plans=PLANS, **overrides), state)

    return start


async def deployments_used(session: aiohttp.ClientSession, setup: Setup, tenant: str) -> float:
    async with session.get(setup.url + "/_gateway/usage", headers=bearer(tenant)) as response:
        assert response.status == 200
        return (await response.json())["meters"]["chain_deployments"]["used"]


async def until(predicate: Callable[[], Awaitable[bool]], limit: float) -> None:
    """Polls what the gateway process changes on its own (a count written after the response, a close)."""
    async with asyncio.timeout(limit):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ the upstream pool


async def test_waiting_for_an_upstream_connection_is_bounded(make: MakeSetup) -> None:
    setup = await make(upstream={"max_connections": 2, "pool_timeout": 0.5})
    async with aiohttp.ClientSession() as session:
        slow = [asyncio.ensure_future(session.get(setup.url + "/slow?delay=4", headers=bearer()))
                for _ in range(2)]
        await asyncio.sleep(0.5)  # both upstream connections are taken now

        async def deploy() -> tuple[int, dict[str, Any], str | None, float]:
            started = time.monotonic()
            async with session.post(setup.url + DEPLOY, headers=bearer("waiting"), data=b"{}") as response:
                return (response.status, await response.json(), response.headers.get("Retry-After"),
                        time.monotonic() - started)

        answers = await asyncio.wait_for(asyncio.gather(*(deploy() for _ in range(3))), 10)
        for status, problem, retry_after, took in answers:
            assert status == 503 and problem["type"].endswith("/upstream-busy"), problem
            assert retry_after == "1"
            assert took < 3  # pool_timeout (0.5 s) and some slack; the slow requests hold on for 4 s
        # A request that never reached the upstream counts nothing.
        await until(lambda: _equals(deployments_used(session, setup, "waiting"), 0), 5)
        for response in await asyncio.gather(*slow):
            assert response.status == 200
            response.release()
        async with session.post(setup.url + DEPLOY, headers=bearer("waiting"), data=b"{}") as response:
            assert response.status == 200
        await until(lambda: _equals(deployments_used(session, setup, "waiting"), 1), 5)


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


# ------------------------------------------------------------------------------ WebSockets


async def test_websocket_limit_and_idle_timeout(make: MakeSetup) -> None:
    setup = await make(websocket={"max_connections": 3, "idle_timeout": 1})
    async with aiohttp.ClientSession() as session:
        idle = [await session.ws_connect(setup.url + "/ws", headers=bearer()) for _ in range(3)]
        # A fourth is refused before the upstream is dialled.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(setup.url + "/ws", headers=bearer())
        assert refused.value.status == 503
        assert setup.state.open_websockets == 3
        # No message either way for idle_timeout (1 s): the gateway closes both sides.
        for ws in idle:
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.GOING_AWAY
            await ws.close()

        async def upstream_closed() -> bool:
            return setup.state.open_websockets == 0

        await until(upstream_closed, 5)
        # A relay that carries messages stays open past idle_timeout; the slots are free again.
        async with session.ws_connect(setup.url + "/ws", headers=bearer()) as chatty:
            for i in range(8):  # 2.4 s, gaps of 0.3 s
                await chatty.send_str(str(i))
                assert await chatty.receive_str(timeout=5) == f"echo:{i}"
                await asyncio.sleep(0.3)


async def test_more_websockets_than_aiohttps_default_connector_limit(make: MakeSetup) -> None:
    setup = await make(websocket={"max_connections": 200})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = []
        try:
            for _ in range(101):  # aiohttp's client pool holds 100 by default: the 101st used to wait
                sockets.append(await asyncio.wait_for(session.ws_connect(setup.url + "/ws", headers=bearer()), 5))
            await sockets[-1].send_str("last")
            assert await sockets[-1].receive_str(timeout=5) == "echo:last"
        finally:
            for ws in sockets:
                await ws.close()


# ------------------------------------------------------------------------------ all at once


async def test_slow_and_idle_clients_do_not_starve_others(make: MakeSetup) -> None:
    setup = await make(listen={"body_timeout": 2, "max_connections": 1000},
                       upstream={"max_connections": 3, "pool_timeout": 0.5},
                       websocket={"max_connections": 10, "idle_timeout": 30})
    token = bearer()["Authorization"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # 20 clients trickling small bodies (one byte every 0.3 s), 20 whose heads never end.
        tricklers = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", setup.gateway.proxy_port)
            writer.write(f"POST /api/x HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                         "Content-Length: 1000\r\n\r\n".encode())
            tricklers.append((reader, writer))
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", setup.gateway.proxy_port)
            writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\n")
            tricklers.append((reader, writer))

        async def trickle() -> None:
            while True:
                for _, writer in tricklers[:20]:
                    writer.write(b"t")
                await asyncio.sleep(0.3)

        trickling = asyncio.ensure_future(trickle())
        # 10 idle WebSockets (the limit), and three slow requests that take every upstream connection.
        sockets = [await session.ws_connect(setup.url + "/ws", headers=bearer()) for _ in range(10)]
        slow = [asyncio.ensure_future(session.get(setup.url + "/slow?delay=3", headers=bearer()))
                for _ in range(3)]
        try:
            await asyncio.sleep(0.5)
            # Meanwhile: the gateway's own endpoints answer at once, a proxied request gets a prompt 503
            # instead of hanging behind the slow ones (and five waiters queue up, and are let go in time).
            async with asyncio.timeout(5):
                async with session.get(setup.url + "/_gateway/usage", headers=bearer()) as response:
                    assert response.status == 200
                waiting = await asyncio.gather(*(session.get(setup.url + "/api/x", headers=bearer())
                                                 for _ in range(5)))
                assert [r.status for r in waiting] == [503] * 5
                for response in waiting:
                    response.release()
            for response in await asyncio.wait_for(asyncio.gather(*slow), 10):
                assert response.status == 200
                response.release()
            # The slow ones are done: normal requests are served again, tricklers and sockets still there.
            async with asyncio.timeout(5):
                for _ in range(5):
                    async with session.post(setup.url + "/api/x", headers=bearer(), data=b"n" * 100) as response:
                        assert response.status == 200
                        assert json.loads(await response.read()) == {"size": 100}
            assert setup.state.open_websockets == 10
        finally:
            trickling.cancel()
            for _, writer in tricklers:
                writer.close()
            for ws in sockets:
                await ws.close()
