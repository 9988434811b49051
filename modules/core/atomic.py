"""Crash-safe file writes: write a temp file beside the target, fsync, then rename over it.

A reader (or a crash, or a second process) sees either the old complete file or the new
complete file, never a half-written one. Used for config.json, cache.json, images and
anything else that must not be truncated by a kill mid-write.

A write through a symlink (a ``config.json`` linked from a dotfiles repo) replaces the file the link
points to and leaves the link in place.

Temp files are named ``.<target name>.<8 random chars>.atomic-tmp<target suffix>``; a process killed
mid-write leaves one behind, and ``remove_stale_temp_files`` (run at startup on the folders these
writes go to) removes those older than a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_create_bytes", "atomic_create_output", "atomic_output", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "is_temp_file_name",
           "remove_stale_temp_files", "TEMP_MARKER", "STALE_AFTER_SECONDS"]

TEMP_MARKER = ".atomic-tmp"
STALE_AFTER_SECONDS = 60.0
# mkstemp's random part is 8 characters of [a-z0-9_]. The second pattern is the name earlier versions
# used (".tmp" instead of ".atomic-tmp"); both must end in the target's own suffix.
_TEMP_NAMES = (
    re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_MARKER) + r"(?P<ext>\.[^.]*)?$"),
    re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(?P<ext>\.[^.]*)?$"),
)


def is_temp_file_name(name: str) -> bool:
    """Whether ``name`` is a temp file name ``atomic_output`` writes (now or in earlier versions)."""
    for pattern in _TEMP_NAMES:
        m = pattern.match(name)
        if m and m.group("target").endswith(m.group("ext") or ""):
            return True
    return False


def remove_stale_temp_files(directory: str | os.PathLike[str], *, older_than: float = STALE_AFTER_SECONDS,
                            now: float | None = None) -> list[Path]:
    """Remove the temp files a killed writer left in ``directory`` (not its sub-folders).

    Only plain files named like ``atomic_output``'s temp files whose last write is more than
    ``older_than`` seconds ago: a writer in another process may still be busy with a newer one.
    Returns the removed paths; a missing folder or a file that cannot be removed is skipped.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = os.scandir(directory)
    except OSError:
        return removed
    with entries:
        for entry in entries:
            if not is_temp_file_name(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if now - entry.stat(follow_symlinks=False).st_mtime <= older_than:
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed


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
    removed and ``path`` is left as it was. Parent directories are created. If ``path`` is a symlink,
    the file it points to is replaced and the link stays.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_output supports modes 'wb', 'w' and 'wt', not {mode!r}")
    target = Path(path)
    if target.is_symlink():
        # Replace the file the link points to (renaming over the link would replace the link itself).
        # Its folder must exist, as it must for a plain open() through the link.
        target = Path(os.path.realpath(target))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    directory = target.parent
    # Hidden (leading dot) so folder scans skip it; ends in the target's extension so writers
    # that infer the format from the file name (PIL's Image.save) still work.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=f"{TEMP_MARKER}{target.suffix}")
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


def atomic_create_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a *new* file ``path``: FileExistsError if anything (a file, a folder, a
    symlink, even a dangling one) already has that name; an existing file is never replaced.

    The data goes to a temp file beside the target first, which is then hard-linked to the final
    name (``link`` fails when the name exists, atomically with respect to other writers) and
    removed. Where the filesystem has no hard links, the final name is created with ``O_EXCL``.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=f"{TEMP_MARKER}{target.suffix}")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        try:
            os.link(tmp_name, target)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (FAT, some network shares): exclusive create instead
            _exclusive_write(target, data)
    finally:
        _silent_unlink(tmp_name)
    _fsync_dir(directory)


@contextlib.contextmanager
def atomic_create_output(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file object for a *new* file ``path``, written in a stream (a merged checkpoint of
    gigabytes): it appears under its name, complete, only if the block exits cleanly, and never
    replaces anything; FileExistsError if the name is taken (checked first, and again at the end)."""
    target = Path(path)
    if os.path.lexists(target):
        raise FileExistsError(f"{target} already exists")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f"{TEMP_MARKER}{target.suffix}")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        try:
            os.link(tmp_name, target)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: rename, after one more check (not atomic against a racer)
            if os.path.lexists(target):
                raise FileExistsError(f"{target} already exists") from None
            os.rename(tmp_name, target)
    finally:
        _silent_unlink(tmp_name)
    _fsync_dir(target.parent)


def _exclusive_write(target: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _silent_unlink(str(target))
        raise
