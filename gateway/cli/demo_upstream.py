"""A small stand-in for the CosmosBuilder API, for `make run`, `demo` and first looks.

It keeps chains in memory and reports usage in `X-Cosmos-Usage`, like the real API does.
"""

from __future__ import annotations

import argparse
import itertools

from aiohttp import web

_ids = itertools.count(1)


def demo_app() -> web.Application:
    chains: dict[str, dict[str, object]] = {}

    def usage_headers() -> dict[str, str]:
        return {"X-Cosmos-Usage": f"chains={len(chains)}, storage_gb={len(chains) * 2.5}"}

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def list_chains(request: web.Request) -> web.Response:
        tenant = request.headers.get("X-Cosmos-Tenant")
        mine = [c for c in chains.values() if c["tenant"] == tenant]
        return web.json_response({"chains": mine}, headers=usage_headers())

    async def create_chain(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        chain_id = f"chain-{next(_ids)}"
        chains[chain_id] = {"id": chain_id, "name": str(body.get("name", chain_id)),
                            "tenant": request.headers.get("X-Cosmos-Tenant")}
        return web.json_response(chains[chain_id], status=201, headers=usage_headers())

    async def deploy(request: web.Request) -> web.Response:
        chain_id = request.match_info["chain"]
        if chain_id not in chains:
            return web.json_response({"error": "no such chain"}, status=404)
        return web.json_response({"chain": chain_id, "deployment": next(_ids), "status": "queued"},
                                 status=202, headers=usage_headers())

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({
            "method": request.method, "path": request.raw_path,
            "headers": {k: v for k, v in request.headers.items() if k.lower().startswith("x-")},
        })

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/status", health)
    app.router.add_get("/api/chains", list_chains)
    app.router.add_post("/api/chains", create_chain)
    app.router.add_post("/api/chains/{chain}/deployments", deploy)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(demo_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
