import hashlib
import json
import logging
import os
import threading

import pytest

from modules.core import atomic
from modules.models import hashes
from modules.models.hashes import HashCache


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _bump_mtime(path, delta=10.0):
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + delta))


@pytest.fixture
def counted(monkeypatch):
    """Count real file hashing passes."""
    calls = []
    real = hashes.file_sha256

    def spy(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(hashes, "file_sha256", spy)
    return calls


def test_sha256_matches_hashlib_and_streams_large_files(tmp_path):
    # > 2 blocks so the streaming loop runs more than once
    data = os.urandom(hashes.BLOCK_SIZE * 2 + 123)
    f = _write(tmp_path / "m.safetensors", data)
    cache = HashCache(tmp_path / "cache.json")
    got = cache.sha256(f, "checkpoint/m.safetensors")
    assert got == hashlib.sha256(data).hexdigest()
    assert got[:10] == hashlib.sha256(data).hexdigest()[:10]


def test_cache_hit_does_not_reread(tmp_path, counted):
    f = _write(tmp_path / "m.ckpt", b"abc")
    cache = HashCache(tmp_path / "cache.json")
    first = cache.sha256(f, "checkpoint/m.ckpt")
    second = cache.sha256(f, "checkpoint/m.ckpt")
    assert first == second
    assert len(counted) == 1
    # A new HashCache object reading the same cache.json also hits.
    again = HashCache(tmp_path / "cache.json").sha256(f, "checkpoint/m.ckpt")
    assert again == first and len(counted) == 1


def test_cached_sha256_never_computes(tmp_path, counted):
    f = _write(tmp_path / "m.ckpt", b"abc")
    cache = HashCache(tmp_path / "cache.json")
    assert cache.cached_sha256(f, "checkpoint/m.ckpt") is None
    assert counted == []
    cache.sha256(f, "checkpoint/m.ckpt")
    assert cache.cached_sha256(f, "checkpoint/m.ckpt") == hashlib.sha256(b"abc").hexdigest()
    assert cache.cached_sha256(tmp_path / "missing", "checkpoint/m.ckpt") is None


def test_new_mtime_invalidates(tmp_path, counted):
    f = _write(tmp_path / "m.ckpt", b"one")
    cache = HashCache(tmp_path / "cache.json")
    assert cache.sha256(f, "k") == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two")
    _bump_mtime(f)
    assert cache.cached_sha256(f, "k") is None
    assert cache.sha256(f, "k") == hashlib.sha256(b"two").hexdigest()
    assert len(counted) == 2
    # An *older* mtime (file restored from backup) also invalidates.
    _bump_mtime(f, -100)
    assert cache.cached_sha256(f, "k") is None


def test_a1111_layout_and_other_sections_preserved(tmp_path):
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(json.dumps({
        "hashes": {"checkpoint/old.ckpt": {"mtime": 1.0, "sha256": "0" * 64}},
        "safetensors-metadata": {"lora/x": {"mtime": 2.0, "value": {"ss_tag": "1"}}},
    }))
    f = _write(tmp_path / "m.safetensors", b"xyz")
    HashCache(cache_file).sha256(f, "checkpoint/m.safetensors")
    saved = json.loads(cache_file.read_text())
    assert saved["safetensors-metadata"] == {"lora/x": {"mtime": 2.0, "value": {"ss_tag": "1"}}}
    assert saved["hashes"]["checkpoint/old.ckpt"] == {"mtime": 1.0, "sha256": "0" * 64}
    entry = saved["hashes"]["checkpoint/m.safetensors"]
    assert entry == {"mtime": os.stat(f).st_mtime, "sha256": hashlib.sha256(b"xyz").hexdigest()}


def test_reads_existing_a1111_cache(tmp_path, counted):
    f = _write(tmp_path / "m.safetensors", b"xyz")
    fake = "ab" * 32  # trust the cache: a matching mtime means no re-read
    (tmp_path / "cache.json").write_text(json.dumps(
        {"hashes": {"checkpoint/m.safetensors": {"mtime": os.stat(f).st_mtime, "sha256": fake}}}))
    cache = HashCache(tmp_path / "cache.json")
    assert cache.sha256(f, "checkpoint/m.safetensors") == fake
    assert counted == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"hashes": []}', "\xff\xfe garbage"])
def test_corrupt_cache_is_backed_up_not_fatal(tmp_path, caplog, content):
    cache_file = tmp_path / "cache.json"
    cache_file.write_bytes(content.encode("latin-1"))
    f = _write(tmp_path / "m.ckpt", b"abc")
    with caplog.at_level(logging.WARNING, logger="modules.hashes"):
        cache = HashCache(cache_file)
        assert cache.cached_sha256(f, "k") is None
        assert cache.sha256(f, "k") == hashlib.sha256(b"abc").hexdigest()
    backups = list(tmp_path.glob("cache.json.bak-*"))
    assert len(backups) == 1
    assert backups[0].read_bytes() == content.encode("latin-1")
    assert "unreadable" in caplog.text
    assert json.loads(cache_file.read_text())["hashes"]["k"]["sha256"] == hashlib.sha256(b"abc").hexdigest()


def test_malformed_entry_is_a_miss(tmp_path):
    f = _write(tmp_path / "m.ckpt", b"abc")
    mtime = os.stat(f).st_mtime
    (tmp_path / "cache.json").write_text(json.dumps({"hashes": {
        "a": "nope", "b": {"mtime": mtime, "sha256": "zz"}, "c": {"mtime": "x", "sha256": "0" * 64}}}))
    cache = HashCache(tmp_path / "cache.json")
    for key in "abc":
        assert cache.cached_sha256(f, key) is None


def test_save_is_atomic_and_valid_json(tmp_path, monkeypatch):
    cache_file = tmp_path / "cache.json"
    files = [_write(tmp_path / f"m{i}.ckpt", bytes([i]) * 10) for i in range(3)]
    cache = HashCache(cache_file)
    for i, f in enumerate(files):
        cache.sha256(f, f"k{i}")
        assert len(json.loads(cache_file.read_text())["hashes"]) == i + 1
    # No temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # A crash during the write leaves the previous complete cache.json in place.
    before = cache_file.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "_replace", boom)
    extra = _write(tmp_path / "late.ckpt", b"late")
    assert cache.sha256(extra, "late") == hashlib.sha256(b"late").hexdigest()  # still returns
    assert cache_file.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_memory_only_cache(tmp_path, counted):
    f = _write(tmp_path / "m.ckpt", b"abc")
    cache = HashCache(None)
    cache.sha256(f, "k")
    cache.sha256(f, "k")
    assert len(counted) == 1
    assert list(tmp_path.iterdir()) == [f]


def test_concurrent_requests_hash_once(tmp_path, counted):
    f = _write(tmp_path / "m.ckpt", os.urandom(3 * hashes.BLOCK_SIZE))
    cache = HashCache(tmp_path / "cache.json")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.sha256(f, "k"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6
    assert len(counted) == 1


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        HashCache(tmp_path / "cache.json").sha256(tmp_path / "nope.ckpt", "k")


def test_atomic_helpers(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic.atomic_write_json(p, {"a": "é"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": "é"}
    atomic.atomic_write_text(p, "line1\r\nline2\n")
    assert p.read_bytes() == b"line1\r\nline2\n"
    atomic.atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"

    with pytest.raises(RuntimeError):
        with atomic.atomic_output(p, "wb") as fh:
            fh.write(b"partial")
            raise RuntimeError("crash")
    assert p.read_bytes() == b"\x00\x01"
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]

    with pytest.raises(TypeError):
        atomic.atomic_write_json(p, {"bad": object()})
    assert p.read_bytes() == b"\x00\x01"

    with pytest.raises(ValueError):
        with atomic.atomic_output(p, "ab"):
            pass

    if os.name == "posix":
        os.chmod(p, 0o640)
        atomic.atomic_write_bytes(p, b"new")
        assert (os.stat(p).st_mode & 0o777) == 0o640  # replacing keeps the mode
        fresh = tmp_path / "fresh.bin"
        atomic.atomic_write_bytes(fresh, b"x")
        assert (os.stat(fresh).st_mode & 0o777) == (0o666 & ~atomic._UMASK)


def test_atomic_output_text_mode(tmp_path):
    p = tmp_path / "t.txt"
    with atomic.atomic_output(p, "w") as fh:
        fh.write("héllo")
    assert p.read_text(encoding="utf-8") == "héllo"


def test_atomic_output_with_pil_inferring_format_from_name(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    p = tmp_path / "00001-123.png"
    with atomic.atomic_output(p) as fh:
        Image.new("RGB", (4, 4), "red").save(fh)  # no format=: PIL reads it from fh.name
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (4, 4)
    assert [q.name for q in tmp_path.iterdir()] == ["00001-123.png"]
