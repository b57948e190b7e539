"""cosmos-gateway: the authenticated, streaming reverse proxy and its admin listener."""
