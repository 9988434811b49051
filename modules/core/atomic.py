"""Crash-safe file writes: write a temp file beside the target, fsync, then rename over it.

A reader (or a crash, or a second process) sees either the old complete file or the new
complete file, never a half-written one. Used for config.json, cache.json, images and
anything else that must not be truncated by a kill mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once at import, before any threads exist.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _final_mode(path: Path) -> int:
    # mkstemp creates 0600 files; give the result the mode a plain open() would have had,
    # or keep the mode of the file being replaced.
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(src: str, dst: Path) -> None:
    # On Windows the target may be briefly held open by a reader or an antivirus scanner.
    attempts = 5 if os.name == "nt" else 1
    for attempt in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str = "utf-8",
                  newline: str | None = None) -> Iterator[IO[Any]]:
    """Yield a file object whose contents replace ``path`` only if the block exits cleanly.

    ``mode`` is ``"wb"`` (default) or ``"w"``/``"wt"`` for text. On an exception the temp file is
    removed and ``path`` is left as it was. Parent directories are created.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_output supports modes 'wb', 'w' and 'wt', not {mode!r}")
    target = Path(path)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    # Hidden (leading dot) so folder scans skip it; ends in the target's extension so writers
    # that infer the format from the file name (PIL's Image.save) still work.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        # Reopened by path (not os.fdopen) so fh.name is the temp path, which PIL reads.
        if mode == "wb":
            fh: IO[Any] = open(tmp_name, "wb")
        else:
            fh = open(tmp_name, "w", encoding=encoding, newline=newline)
    except BaseException:
        _silent_unlink(tmp_name)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, _final_mode(target))
        _replace(tmp_name, target)
    except BaseException:
        _silent_unlink(tmp_name)
        raise
    _fsync_dir(directory)


def _silent_unlink(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_output(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    # newline="" keeps the caller's line endings byte for byte on every platform.
    with atomic_output(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 4,
                      ensure_ascii: bool = False, sort_keys: bool = False) -> None:
    """Serialise first, so an unserialisable object never touches the file at all."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    atomic_write_text(path, text + "\n")
