"""Spool files on disk: private (0600 in a 0700 folder), each held by exactly one owner.

The owner of a spool file is the process holding an exclusive `flock` on it: its writer while that
worker runs, or the replayer that took it over afterwards. The kernel drops the lock when its holder
dies, so a file nobody holds belongs to a worker that no longer runs, and any live spool may claim it.
Claiming is `open` + `flock(LOCK_EX | LOCK_NB)` + a check that the path still names the locked file: an
owner removes a file (unlink) before it lets go of the lock, so a claimer that won the lock of a file
already removed sees it gone and backs off. A file is therefore replayed by one owner at a time, and
the live writer's file is never claimed (it took the lock before writing its first line).

All file work here is blocking: the spool runs it in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

SUFFIX = ".jsonl"  # every file of the folder with this suffix is spooled usage, whoever wrote it
TEMPORARY = ".tmp"  # a file being rewritten (`SpoolFile.replace_with_tail`): never replayed, removed when stale
MAX_LINE = 64 * 1024  # a longer line is not a record (a torn write glued to garbage): skipped unread
_CHUNK = 64 * 1024


def make_private_folder(path: Path) -> None:
    """`path` and its missing parents, each created 0700 (the spool and the SQLite folder: what they
    hold names tenants and their usage). Folders that exist already are left as they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile by another worker
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask; 0700 only loses bits to it


class SpoolFile:
    """An open spool file whose exclusive lock this process holds; `size` is its length."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size

    @classmethod
    def claim(cls, path: Path, *, create: bool) -> SpoolFile | None:
        """The file at `path`, locked for this process; None when another owner holds it (or it is gone)."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        held = os.fstat(fd)
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        if held.st_nlink == 0 or named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)  # its owner removed it between our open and our lock: it was done with it
            return None
        if held.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # written by an older version, or by hand: private from now on
        return cls(path, fd, held.st_size)

    def append(self, data: bytes) -> None:
        """Write all of `data` and fsync; on an error (a full disk) the file is cut back to where it was,
        so no torn line is left for the next append to glue onto."""
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += os.write(self.fd, view[written:])
            os.fsync(self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += written

    def end_torn_line(self) -> None:
        """End a last line torn by a crash, so that the next entry starts on a line of its own."""
        if self.size and os.pread(self.fd, 1, self.size - 1) != b"\n":
            self.append(b"\n")

    def lines(self, start: int, end: int) -> Iterator[tuple[bytes, int]]:
        """(line, offset after it) of the lines in [start, end), read in chunks; an over-long line comes
        as b"" (not a record). A last line without its newline (torn by a crash) comes as it is."""
        offset = start  # of the next byte to read
        carry = b""  # the start of a line whose end is not read yet
        skipping = False  # within an over-long line
        while offset < end:
            chunk = os.pread(self.fd, min(_CHUNK, end - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            data = carry + chunk
            data_start = offset - len(data)
            position = 0
            while (newline := data.find(b"\n", position)) >= 0:
                line = data[position:newline]
                position = newline + 1
                yield (b"" if skipping else line), data_start + position
                skipping = False
            carry = data[position:]
            if len(carry) > MAX_LINE:
                skipping, carry = True, b""
        if carry or skipping:
            yield (b"" if skipping else carry), offset

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.size = 0

    def replace_with_tail(self, start: int) -> SpoolFile:
        """A new file at this path holding what follows `start`; this one is removed and released.

        The new file is locked before it takes the name (rename is atomic), so the path always names a
        file this process holds; a crash midway leaves this file whole and a stale temporary file.
        """
        temporary = SpoolFile.claim(self.path.with_name(self.path.name + TEMPORARY), create=True)
        if temporary is None:
            raise OSError(f"{self.path}{TEMPORARY} is held by another process")
        try:
            os.ftruncate(temporary.fd, 0)
            temporary.size = 0
            offset = start
            while offset < self.size:
                chunk = os.pread(self.fd, min(_CHUNK, self.size - offset), offset)
                if not chunk:
                    break
                temporary.append(chunk)
                offset += len(chunk)
            os.rename(temporary.path, self.path)
            fsync_folder(self.path.parent)
        except BaseException:
            temporary.remove()
            raise
        temporary.path = self.path
        self.close()
        return temporary

    def remove(self) -> None:
        """Unlink, then release: whoever wins the lock next sees the file gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def other_files(folder: Path, own: set[str]) -> list[tuple[Path, int]]:
    """(path, size) of the spool files and stale temporaries of `folder` not named in `own`."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name in own or not (name.endswith(SUFFIX) or name.endswith(SUFFIX + TEMPORARY)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    found.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
    return found
