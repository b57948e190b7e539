"""The SQLite database is private: its file 0600, a folder created for it 0700 (issue 9 §9)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from metering.db import create_engine, ping


async def test_a_new_sqlite_database_and_its_folder_are_private(tmp_path: Path) -> None:
    path = tmp_path / "var" / "data" / "gateway.db"
    old = os.umask(0o022)
    try:
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        await ping(engine)  # opens the file, in WAL mode
        await engine.dispose()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700
    for sidecar in path.parent.iterdir():  # -wal and -shm take the database file's mode
        assert stat.S_IMODE(sidecar.stat().st_mode) & 0o077 == 0, sidecar
