import hashlib
import logging
from pathlib import Path

import pytest

from modules.models.hashes import HashCache
from modules.models.vae import UnknownVaeError, VaeInfo, VaeRegistry


def _mk(root: Path, rel: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(rel.encode())
    return p


@pytest.fixture
def dirs(tmp_path):
    vae_dir = tmp_path / "models" / "VAE"
    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    vae_dir.mkdir(parents=True)
    ckpt_dir.mkdir(parents=True)
    return vae_dir, ckpt_dir


def _reg(dirs, **kw):
    reg = VaeRegistry(*dirs, **kw)
    reg.refresh()
    return reg


def test_scan(dirs):
    vae_dir, ckpt_dir = dirs
    for rel in ["vae-ft-mse-840000-ema-pruned.safetensors", "kl-f8-anime2.ckpt", "sub/orangemix.vae.pt",
                "sub/readme.txt", ".hidden.pt", "a10.pt", "a2.pt"]:
        _mk(vae_dir, rel)
    for rel in ["dreamshaper.safetensors", "dreamshaper.vae.safetensors", "sub/x.vae.ckpt", "y.vae.pt",
                "not_a_vae.pt"]:
        _mk(ckpt_dir, rel)
    reg = _reg(dirs)
    assert reg.names() == [
        "a2.pt", "a10.pt", "kl-f8-anime2.ckpt", "orangemix.vae.pt", "vae-ft-mse-840000-ema-pruned.safetensors",
        "dreamshaper.vae.safetensors", "x.vae.ckpt", "y.vae.pt"]
    assert reg.choices()[:2] == ["Automatic", "None"]
    assert all(Path(i.filename).is_absolute() for i in reg.list())


def test_duplicate_basenames_get_relative_names(dirs):
    vae_dir, ckpt_dir = dirs
    _mk(vae_dir, "a/vae.safetensors")
    _mk(vae_dir, "b/vae.safetensors")
    assert _reg(dirs).names() == ["vae.safetensors", "b/vae.safetensors"]


def test_empty_and_missing_dirs(tmp_path):
    reg = VaeRegistry(tmp_path / "nope", tmp_path / "nope2")
    assert reg.refresh() == [] and reg.names() == []
    assert reg.resolve("Automatic", str(tmp_path / "nope2" / "m.safetensors")) is None


def test_resolve_none_means_baked_in(dirs):
    vae_dir, ckpt_dir = dirs
    _mk(vae_dir, "m.safetensors")
    _mk(ckpt_dir, "m.vae.pt")
    ckpt = _mk(ckpt_dir, "m.safetensors")
    assert _reg(dirs).resolve("None", str(ckpt)) is None


def test_resolve_by_name(dirs):
    vae_dir, ckpt_dir = dirs
    f = _mk(vae_dir, "sub/vae-ft-mse-840000-ema-pruned.safetensors")
    ckpt = _mk(ckpt_dir, "m.safetensors")
    reg = _reg(dirs)
    expected = VaeInfo(filename=str(f), name="vae-ft-mse-840000-ema-pruned.safetensors")
    assert reg.resolve("vae-ft-mse-840000-ema-pruned.safetensors", str(ckpt)) == expected
    assert reg.resolve("VAE-FT-MSE-840000-EMA-PRUNED", str(ckpt)) == expected  # unique stem, any case
    assert reg.resolve(str(f), str(ckpt)) == expected  # absolute path


def test_unknown_name_strict_raises_with_choices(dirs):
    vae_dir, ckpt_dir = dirs
    _mk(vae_dir, "good.safetensors")
    reg = _reg(dirs)
    with pytest.raises(UnknownVaeError) as err:
        reg.resolve("typo.safetensors", None)
    assert isinstance(err.value, KeyError)
    msg = str(err.value)
    assert "typo.safetensors" in msg and "good.safetensors" in msg and "Automatic" in msg
    assert not msg.startswith('"')  # readable, not KeyError's repr


def test_unknown_name_lenient_falls_back_to_automatic(dirs, caplog):
    vae_dir, ckpt_dir = dirs
    ckpt = _mk(ckpt_dir, "model.safetensors")
    beside = _mk(ckpt_dir, "model.vae.pt")
    reg = _reg(dirs)
    with caplog.at_level(logging.WARNING, logger="modules.sd_vae"):
        got = reg.resolve("gone.safetensors", str(ckpt), strict=False)
    assert got is not None and got.filename == str(beside)
    assert "gone.safetensors" in caplog.text


def test_automatic_prefers_file_beside_checkpoint(dirs):
    vae_dir, ckpt_dir = dirs
    ckpt = _mk(ckpt_dir, "sub/model.safetensors")
    _mk(vae_dir, "model.safetensors")
    pt = _mk(ckpt_dir, "sub/model.vae.pt")
    reg = _reg(dirs)
    assert reg.resolve("Automatic", str(ckpt)).filename == str(pt)
    st = _mk(ckpt_dir, "sub/model.vae.safetensors")  # safetensors preferred, found without refresh
    got = reg.resolve("Automatic", str(ckpt))
    assert got == VaeInfo(filename=str(st), name="model.vae.safetensors")
    assert reg.resolve("", str(ckpt)) == got  # empty setting means Automatic
    assert reg.resolve(None, str(ckpt)) == got


def test_automatic_from_vae_dir_by_stem(dirs):
    vae_dir, ckpt_dir = dirs
    ckpt = _mk(ckpt_dir, "anything-v3.safetensors")
    _mk(vae_dir, "anything-v3-extra.pt")
    _mk(vae_dir, "anything-v3.vae.pt")
    reg = _reg(dirs)
    assert reg.resolve("Automatic", str(ckpt)).name == "anything-v3.vae.pt"  # <stem>.vae beats prefix
    exact = _mk(vae_dir, "zzz/anything-v3.safetensors")
    reg.refresh()
    assert reg.resolve("Automatic", str(ckpt)).filename == str(exact)  # equal stem beats both
    (vae_dir / "anything-v3.vae.pt").unlink()
    exact.unlink()
    reg.refresh()
    assert reg.resolve("Automatic", str(ckpt)).name == "anything-v3-extra.pt"  # A1111 prefix rule


def test_automatic_without_match_is_baked_in(dirs):
    vae_dir, ckpt_dir = dirs
    ckpt = _mk(ckpt_dir, "model.safetensors")
    _mk(vae_dir, "unrelated.safetensors")
    _mk(ckpt_dir, "other.vae.pt")  # belongs to another checkpoint
    reg = _reg(dirs)
    assert reg.resolve("Automatic", str(ckpt)) is None
    assert reg.resolve("Automatic", None) is None


def test_vae_shorthash(dirs, tmp_path):
    vae_dir, _ = dirs
    f = _mk(vae_dir, "v.safetensors")
    reg = _reg(dirs, hash_cache=HashCache(tmp_path / "cache.json"))
    assert reg.shorthash(reg.list()[0]) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert _reg(dirs).shorthash(reg.list()[0]) is None
