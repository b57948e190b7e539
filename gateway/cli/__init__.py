"""The `cosmos-gateway` command: `gateway.cli:main` is the console script (PRODUCT.md §1)."""

from gateway.cli.main import main

__all__ = ["main"]
