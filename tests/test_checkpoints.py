import hashlib
import os
import threading
from pathlib import Path

import pytest

from modules.models import hashes
from modules.models.checkpoints import CheckpointInfo, CheckpointRegistry, natural_sort_key
from modules.models.hashes import HashCache


def _mk(root: Path, rel: str, data: bytes | None = None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if data is not None else rel.encode())
    return p


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ckpt_dir(tmp_path):
    root = tmp_path / "models" / "Stable-diffusion"
    root.mkdir(parents=True)
    return root


def _registry(ckpt_dir, tmp_path, **kw):
    kw.setdefault("hash_cache", HashCache(tmp_path / "cache.json"))
    reg = CheckpointRegistry(ckpt_dir, **kw)
    reg.refresh()
    return reg


def test_natural_sort_key():
    names = ["a10.ckpt", "A2.ckpt", "a1.ckpt", "b.ckpt", "a2b.ckpt"]
    assert sorted(names, key=natural_sort_key) == ["a1.ckpt", "A2.ckpt", "a2b.ckpt", "a10.ckpt", "b.ckpt"]


def test_scan_recursion_order_filters(ckpt_dir, tmp_path):
    for rel in ["model10.safetensors", "model2.safetensors", "Model1.ckpt", "sub/inner.safetensors",
                "sub/deeper/x.ckpt", "notes.txt", "vae.pt", "m.vae.safetensors", "m.vae.ckpt", "m.VAE.pt",
                ".hidden.safetensors", ".git/in_hidden_dir.safetensors", "sub/.cache/y.ckpt",
                "upper.SAFETENSORS"]:
        _mk(ckpt_dir, rel)
    reg = _registry(ckpt_dir, tmp_path, hashing=False)
    assert [i.name for i in reg.list()] == [
        "Model1.ckpt", "model2.safetensors", "model10.safetensors", "sub/deeper/x.ckpt",
        "sub/inner.safetensors", "upper.SAFETENSORS"]
    assert reg.titles() == [i.name for i in reg.list()]  # no hashing: title is the name


def test_checkpoint_info_fields(ckpt_dir, tmp_path):
    f = _mk(ckpt_dir, "sd15/v1-5-pruned.safetensors")
    (ckpt_dir / "sd15" / "v1-5-pruned.yaml").write_text("model: {}\n")
    info = _registry(ckpt_dir, tmp_path, hashing=False).list()[0]
    assert info.filename == str(f) and os.path.isabs(info.filename)
    assert info.name == "sd15/v1-5-pruned.safetensors"
    assert info.name_for_extra == "v1-5-pruned"
    assert info.model_name == "sd15_v1-5-pruned"
    assert info.sha256 is None and info.shorthash is None
    assert info.title == "sd15/v1-5-pruned.safetensors"
    assert info.sidecar_config == ckpt_dir / "sd15" / "v1-5-pruned.yaml"
    assert set(info.ids) >= {info.title, info.name, info.model_name, info.name_for_extra}
    api = info.api_dict()
    assert api["config"] == str(info.sidecar_config) and api["hash"] is None


def test_no_sidecar(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "a.ckpt")
    (ckpt_dir / "a.yml").write_text("")  # only .yaml counts
    assert _registry(ckpt_dir, tmp_path).list()[0].sidecar_config is None


def test_titles_with_hashing(ckpt_dir, tmp_path):
    f = _mk(ckpt_dir, "sub/model.safetensors", b"weights")
    reg = _registry(ckpt_dir, tmp_path)
    info = reg.list()[0]
    assert info.title == "sub/model.safetensors"  # not hashed yet: scan never reads files
    short = reg.calculate_shorthash(info)
    assert short == _sha(f)[:10]
    assert info.sha256 == _sha(f)
    assert info.title == f"sub/model.safetensors [{short}]"
    assert reg.titles() == [info.title]
    assert {short, _sha(f), f"sub/model.safetensors [{short}]", f"model [{short}]"} <= set(info.ids)
    # Cache key follows A1111: checkpoint/<name>
    assert HashCache(tmp_path / "cache.json").cached_sha256(f, "checkpoint/sub/model.safetensors") == _sha(f)
    # A new registry picks the hash up from cache.json at scan time, without reading the file.
    reg2 = _registry(ckpt_dir, tmp_path)
    assert reg2.titles() == [info.title]


def test_hashing_off_never_hashes(ckpt_dir, tmp_path, monkeypatch):
    _mk(ckpt_dir, "m.ckpt")
    monkeypatch.setattr(hashes, "file_sha256", lambda p: pytest.fail("hashed while hashing is off"))
    reg = _registry(ckpt_dir, tmp_path, hashing=False)
    info = reg.list()[0]
    assert reg.calculate_shorthash(info) is None
    assert info.title == "m.ckpt"
    assert reg.hash_all_in_background() is None


def test_calculate_shorthash_updates_current_list_for_stale_info(ckpt_dir, tmp_path):
    f = _mk(ckpt_dir, "m.ckpt")
    reg = _registry(ckpt_dir, tmp_path)
    stale = reg.list()[0]
    reg.refresh()
    reg.calculate_shorthash(stale)
    assert reg.titles() == [f"m.ckpt [{_sha(f)[:10]}]"]


def test_changed_file_gets_new_hash(ckpt_dir, tmp_path):
    f = _mk(ckpt_dir, "m.ckpt", b"v1")
    reg = _registry(ckpt_dir, tmp_path)
    info = reg.list()[0]
    reg.calculate_shorthash(info)
    f.write_bytes(b"v2")
    st = os.stat(f)
    os.utime(f, (st.st_atime, st.st_mtime + 5))
    reg.refresh()
    assert reg.list()[0].title == "m.ckpt"  # stale cache entry not trusted
    assert reg.calculate_shorthash(reg.list()[0]) == hashlib.sha256(b"v2").hexdigest()[:10]


def test_hash_all_in_background(ckpt_dir, tmp_path):
    files = [_mk(ckpt_dir, f"m{i}.ckpt") for i in range(3)]
    reg = _registry(ckpt_dir, tmp_path)
    t = reg.hash_all_in_background()
    assert isinstance(t, threading.Thread) and t.daemon
    t.join(10)
    assert reg.titles() == [f"m{i}.ckpt [{_sha(f)[:10]}]" for i, f in enumerate(files)]


def test_symlinked_dir_followed_and_loops_guarded(ckpt_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    _mk(outside, "linked_model.safetensors")
    _mk(ckpt_dir, "real.ckpt")
    try:
        os.symlink(outside, ckpt_dir / "link", target_is_directory=True)
        os.symlink(ckpt_dir, ckpt_dir / "loop", target_is_directory=True)  # points at its parent
        os.symlink(tmp_path / "missing.ckpt", ckpt_dir / "broken.ckpt")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available")
    reg = _registry(ckpt_dir, tmp_path, hashing=False)
    names = [i.name for i in reg.list()]
    assert names == ["link/linked_model.safetensors", "real.ckpt"]
    assert reg.list()[0].filename == str(ckpt_dir / "link" / "linked_model.safetensors")


def test_extra_files(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "a.ckpt")
    inside = _mk(ckpt_dir, "sub/b.safetensors")
    outside = _mk(tmp_path / "other", "custom.safetensors")
    reg = _registry(ckpt_dir, tmp_path, hashing=False,
                    extra_files=[outside, inside, tmp_path / "does-not-exist.ckpt", outside])
    names = [i.name for i in reg.list()]
    # Extras first (A1111 lists --ckpt first); one inside the folder keeps its relative name, once.
    assert names == ["custom.safetensors", "sub/b.safetensors", "a.ckpt"]
    assert reg.list()[0].filename == str(outside)


def test_refresh_picks_up_new_and_removed_files(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "a.ckpt")
    reg = _registry(ckpt_dir, tmp_path, hashing=False)
    assert reg.titles() == ["a.ckpt"]
    _mk(ckpt_dir, "new/b.safetensors")
    assert reg.titles() == ["a.ckpt"]  # until refresh
    reg.refresh()
    assert reg.titles() == ["a.ckpt", "new/b.safetensors"]
    (ckpt_dir / "a.ckpt").unlink()
    reg.refresh()
    assert reg.titles() == ["new/b.safetensors"]


def test_empty_folder_and_missing_folder(tmp_path):
    reg = CheckpointRegistry(tmp_path / "models" / "Stable-diffusion")
    assert reg.refresh() == []
    assert reg.list() == [] and reg.titles() == []
    msg = reg.empty_message()
    assert os.path.abspath(tmp_path / "models" / "Stable-diffusion") in msg
    assert ".safetensors" in msg
    assert reg.get_closest("anything") is None


@pytest.fixture
def lookup_reg(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "sd15/v1-5-pruned.safetensors", b"one")
    _mk(ckpt_dir, "sdxl/sd_xl_base_1.0.safetensors", b"two")
    _mk(ckpt_dir, "dreamshaper_8.safetensors", b"three")
    _mk(ckpt_dir, "other/v1-5-pruned-emaonly.ckpt", b"four")
    reg = _registry(ckpt_dir, tmp_path)
    for info in reg.list():
        reg.calculate_shorthash(info)
    return reg


def _by_name(reg, name) -> CheckpointInfo:
    return next(i for i in reg.list() if i.name == name)


def test_get_closest_each_form(lookup_reg):
    reg = lookup_reg
    sd15 = _by_name(reg, "sd15/v1-5-pruned.safetensors")
    xl = _by_name(reg, "sdxl/sd_xl_base_1.0.safetensors")
    ds = _by_name(reg, "dreamshaper_8.safetensors")
    ema = _by_name(reg, "other/v1-5-pruned-emaonly.ckpt")

    assert reg.get_closest(sd15.title) is sd15                         # 1 title
    assert reg.get_closest("sd15/v1-5-pruned.safetensors") is sd15     # 2 name
    assert reg.get_closest("sd15\\v1-5-pruned.safetensors") is sd15    # 2 Windows separators
    assert reg.get_closest(sd15.filename) is sd15                      # 2 absolute path
    assert reg.get_closest("sdxl_sd_xl_base_1.0") is xl                # 3 model_name
    assert reg.get_closest("dreamshaper_8") is ds                      # 4 stem
    assert reg.get_closest(ema.sha256) is ema                          # 5 full sha256
    assert reg.get_closest(ema.sha256.upper()) is ema
    assert reg.get_closest(ema.shorthash) is ema                       # 5 shorthash
    assert reg.get_closest(ema.sha256[:8]) is ema                      # 6 hash prefix (old 8-digit style)
    assert reg.get_closest("sd15/v1-5-pruned.safetensors [0123456789]") is sd15  # 7 stale hash
    assert reg.get_closest("dreamshaper_8 [0123456789]") is ds          # 7 stem + stale hash
    assert reg.get_closest("DREAMSHAPER_8.SAFETENSORS") is ds          # 8 case-insensitive basename
    assert reg.get_closest("SD15/V1-5-PRUNED.SAFETENSORS") is sd15     # 8 case-insensitive name
    assert reg.get_closest("xl_base") is xl                            # 9 substring
    assert reg.get_closest("v1-5") is sd15                             # 9 shortest title wins
    assert reg.get_closest("emaonly") is ema
    assert reg.get_closest("nothing like it") is None
    assert reg.get_closest("") is None


def test_get_closest_without_hashing(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "a/model.safetensors")
    reg = _registry(ckpt_dir, tmp_path, hashing=False)
    info = reg.list()[0]
    # A title saved by A1111 (with hash) still finds the unhashed entry.
    assert reg.get_closest("a/model.safetensors [6ce0161689]") is info
    assert reg.get_closest("6ce0161689") is None


def test_get_closest_prefers_exact_over_substring(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "model.safetensors")
    _mk(ckpt_dir, "model.safetensors.old/model.safetensors")  # substring of a longer title
    reg = _registry(ckpt_dir, tmp_path, hashing=False)
    assert reg.get_closest("model.safetensors").name == "model.safetensors"
    assert reg.get_closest("model").name == "model.safetensors"


def test_short_hex_names_are_not_hash_prefixes(ckpt_dir, tmp_path):
    _mk(ckpt_dir, "abc.ckpt", b"x")
    reg = _registry(ckpt_dir, tmp_path)
    info = reg.list()[0]
    reg.calculate_shorthash(info)
    assert reg.get_closest("abc") is info  # stem match, not a 3-digit hash prefix
    # 4 hex digits are below the prefix minimum; they still match as a substring of the title.
    assert reg.get_closest(info.sha256[:4]) is info
    assert reg.get_closest(info.sha256[12:20]) is None  # 8 digits, but not a prefix nor in the title


def test_concurrent_refresh_and_reads(ckpt_dir, tmp_path):
    for i in range(20):
        _mk(ckpt_dir, f"m{i}.ckpt")
    reg = _registry(ckpt_dir, tmp_path)
    errors = []

    def reader():
        try:
            for _ in range(50):
                assert len(reg.titles()) == 20
                reg.get_closest("m1")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    threads.append(threading.Thread(target=lambda: [reg.refresh() for _ in range(20)]))
    threads.append(reg.hash_all_in_background())
    for t in threads[:-1]:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
