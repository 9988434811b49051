"""Reading weights files: legitimate checkpoints load, corrupt ones fail with a clear error.

Pickled checkpoints are read only by ``torch.load(weights_only=True)`` with a few stand-ins for the
non-tensor names A1111-era files carry (modules/models/weights_io.py). The hostile files are in
tests/security/.
"""
import argparse
import collections
import importlib
import os
import shutil
import sys
import types
import typing

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules.models import weights_io
from modules.models.weights_io import (
    CheckpointLoadError,
    PickledPlaceholder,
    UnsafeCheckpointError,
    load_ckpt_state_dict,
    load_state_dict_file,
    read_safetensors_header,
    read_safetensors_metadata,
)

# Torch's own loader warns about non-default pickle protocols and TorchScript archives; expected here.
pytestmark = [pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
              pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _weights():
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3, generator=g),
        "first_stage_model.decoder.conv_out.bias": torch.randn(3, generator=g).half(),
    }


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k])


def _load_whole(path):
    """The whole unpickled object (not only the tensors), through the loader's one torch.load call."""
    return weights_io._read_pickle_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Plain and Lightning-era checkpoints load
# ---------------------------------------------------------------------------------------------

def test_plain_tensor_dict_is_read_by_torch_weights_only(tmp_path, monkeypatch):
    w = _weights()
    p = tmp_path / "plain.ckpt"
    torch.save(w, p)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    _assert_same(load_ckpt_state_dict(p), w)
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": False}]


def test_state_dict_key_unwrapped_and_non_tensors_dropped(tmp_path):
    w = _weights()
    p = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {**w, "not_a_tensor": 3}, "global_step": 470000, "epoch": 6}, p)
    _assert_same(load_ckpt_state_dict(p), w)


def test_parameters_become_plain_tensors(tmp_path):
    p = tmp_path / "param.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, p)
    got = load_ckpt_state_dict(p)
    assert type(got["w"]) is torch.Tensor and not got["w"].requires_grad


def test_tiny_model_ckpt_loads(tmp_path):
    from tiny_models import make_checkpoint

    ck = make_checkpoint(tmp_path / "tiny.ckpt", "sd1", fmt="ckpt")
    _assert_same(load_state_dict_file(ck.path), ck.ldm_state_dict)


@pytest.mark.parametrize("value", [np.int64(470000), np.int32(-3), np.uint8(7), np.float64(0.25), np.float32(1.5),
                                   np.float16(2.0), np.bool_(True), np.complex128(1 + 2j)], ids=repr)
def test_numpy_scalars_are_rebuilt(tmp_path, value):
    p = tmp_path / "np.ckpt"
    torch.save({"state_dict": _weights(), "best": value}, p)
    got = _load_whole(p)["best"]
    assert type(got) is type(value) and got == value and got.dtype == value.dtype


def test_python_objects_from_training_become_placeholders(tmp_path):
    w = _weights()
    p = tmp_path / "objects.ckpt"
    torch.save({"state_dict": w, "hp": argparse.Namespace(lr=1e-4), "blob": b"\x00\xff",
                "dd": collections.defaultdict(list, {"a": [1]}), "types": typing.Any,
                "kinds": [dict, list, int, float, str, bool], "s": {1, 2}}, p)
    obj = _load_whole(p)
    assert isinstance(obj["hp"], PickledPlaceholder) and obj["hp"].original == "argparse.Namespace"
    assert obj["hp"].pickled_state == {"lr": 1e-4}
    assert obj["dd"] == {"a": [1]} and type(obj["dd"]) is dict  # no default factory from a file
    assert obj["blob"] == b"\x00\xff" and obj["kinds"] == [dict, list, int, float, str, bool]
    assert obj["types"].original == "typing.Any"
    _assert_same(load_ckpt_state_dict(p), w)


def test_numpy_arrays_are_refused(tmp_path):
    p = tmp_path / "array.ckpt"
    torch.save({"state_dict": _weights(), "arr": np.arange(3)}, p)
    with pytest.raises(UnsafeCheckpointError, match=r"multiarray\._reconstruct.*\.safetensors"):
        load_ckpt_state_dict(p)


def test_pickle_protocol_3_and_later_are_refused_by_torch(tmp_path):
    # torch.save writes protocol 2; torch's weights-only unpickler reads nothing newer.
    p = tmp_path / "p4.ckpt"
    torch.save(_weights(), p, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="opcode FRAME") as err:
        load_ckpt_state_dict(p)
    assert err.value.global_name == "opcode FRAME"


def test_legacy_non_zip_format(tmp_path):
    w = _weights()
    p = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": w, "best": np.float32(1.0)}, p, _use_new_zipfile_serialization=False)
    _assert_same(load_ckpt_state_dict(p), w)


def test_the_torch_allowlist_is_left_as_it_was(tmp_path):
    before = list(torch.serialization.get_safe_globals())
    ok, bad = tmp_path / "ok.ckpt", tmp_path / "bad.ckpt"
    torch.save({"state_dict": _weights(), "hp": argparse.Namespace(a=1)}, ok)
    torch.save({"state_dict": _weights(), "arr": np.arange(2)}, bad)
    load_ckpt_state_dict(ok)
    with pytest.raises(UnsafeCheckpointError):
        load_ckpt_state_dict(bad)
    assert list(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(ok, weights_only=True)  # the stand-ins exist only inside the loader's call


def test_placeholders_store_state_and_do_nothing_else():
    pairs = {name: obj for obj, name in weights_io.extra_safe_globals()}
    mc = pairs["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    obj = mc.__new__(mc, "ignored", 1)
    obj.__init__("ignored")
    obj.__setstate__({"__class__": int, "__reduce__": "x"})
    assert type(obj) is mc and obj.pickled_state == {"__class__": int, "__reduce__": "x"}
    assert not hasattr(obj, "__dict__")  # no attribute can be set from a file's names
    assert pairs["pytorch_lightning.utilities.parsing.AttributeDict"]() == {}
    assert type(pairs["collections.defaultdict"](list)) is dict


LIGHTNING_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                     "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")


@pytest.fixture
def lightning_checkpoint(tmp_path, monkeypatch):
    """A checkpoint naming exactly the globals a Lightning-trained file names.

    The classes are defined here under Lightning's module names in fake modules that exist in
    sys.modules only while saving. Before loading, a booby-trapped ``pytorch_lightning`` package that
    creates a sentinel file on import is put first on sys.path: loading must never import it.
    """
    fakes = {name: types.ModuleType(name) for name in LIGHTNING_MODULES}

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
            self.dirpath = "logs/checkpoints"

    class AttributeDict(dict):
        pass

    for cls, module in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                        (AttributeDict, "pytorch_lightning.utilities.parsing")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(fakes[module], cls.__name__, cls)
    w = _weights()
    ckpt = {
        "epoch": 6,
        "global_step": np.int64(470000),
        "pytorch-lightning_version": "1.4.2",
        "state_dict": w,
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5), "dirpath": "x"}},
        "callback_objects": [ModelCheckpoint()],
        "hyper_parameters": argparse.Namespace(lr=1e-4, batch=4),
        "hparams": AttributeDict(lr=1e-4, layers=[1, 2]),
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}],
    }
    try:
        import omegaconf
    except ImportError:
        omegaconf = None
    if omegaconf is not None:
        ckpt["cfg"] = omegaconf.OmegaConf.create({"model": {"base_learning_rate": 1e-4, "params": [1, "x", None]}})
    p = tmp_path / "lightning.ckpt"
    with monkeypatch.context() as m:
        for name, module in fakes.items():
            m.setitem(sys.modules, name, module)
        torch.save(ckpt, p)
    assert not any(name in sys.modules for name in LIGHTNING_MODULES)

    sentinel = tmp_path / "IMPORTED"
    trap = tmp_path / "trap" / "pytorch_lightning"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    for sub in ("callbacks", "utilities"):
        shutil.copytree(trap, trap / sub, dirs_exist_ok=True)
    monkeypatch.syspath_prepend(str(tmp_path / "trap"))
    importlib.invalidate_caches()
    yield p, w, sentinel
    for name in [m for m in sys.modules if m.split(".")[0] == "pytorch_lightning"]:
        del sys.modules[name]


def test_lightning_checkpoint_loads_without_importing_lightning(lightning_checkpoint):
    p, w, sentinel = lightning_checkpoint
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    assert {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "argparse.Namespace",
            "pytorch_lightning.utilities.parsing.AttributeDict"} <= names
    assert any(n.endswith("multiarray.scalar") for n in names) and "numpy.dtype" in names

    _assert_same(load_ckpt_state_dict(p), w)
    obj = _load_whole(p)
    assert obj["global_step"] == 470000 and isinstance(obj["global_step"], np.int64)
    (key,) = obj["callbacks"]
    assert key.original == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert obj["callbacks"][key]["best_model_score"] == 0.5
    assert obj["hparams"] == {"lr": 1e-4, "layers": [1, 2]}
    assert not sentinel.exists()
    assert "pytorch_lightning" not in sys.modules


# ---------------------------------------------------------------------------------------------
# Corrupt files and dispatch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_ckpt(tmp_path, legacy):
    p = tmp_path / "trunc.ckpt"
    torch.save({"state_dict": _weights()}, p, _use_new_zipfile_serialization=not legacy)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError) as err:
        load_ckpt_state_dict(p)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(p) in str(err.value) and err.value.path == p


def test_garbage_and_empty_ckpt(tmp_path):
    for name, data in [("empty.ckpt", b""), ("garbage.ckpt", os.urandom(1000))]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointLoadError, match=name):
            load_ckpt_state_dict(p)


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), p)
    with pytest.raises(CheckpointLoadError, match="not a dict of tensors"):
        load_ckpt_state_dict(p)
    torch.save({"epoch": 3}, p)
    with pytest.raises(CheckpointLoadError, match="no tensors"):
        load_ckpt_state_dict(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointLoadError, match="no such file"):
        load_ckpt_state_dict(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointLoadError, match="no such file"):
        load_state_dict_file(tmp_path / "nope.safetensors")


def test_safetensors_header_and_load(tmp_path):
    w = _weights()
    p = tmp_path / "m.safetensors"
    save_file(w, str(p), metadata={"format": "pt", "ss_tag": "x"})
    header = read_safetensors_header(p)
    assert header == {
        "model.diffusion_model.input_blocks.0.0.weight": ("F32", (4, 4, 3, 3)),
        "first_stage_model.decoder.conv_out.bias": ("F16", (3,)),
    }
    assert read_safetensors_metadata(p) == {"format": "pt", "ss_tag": "x"}
    _assert_same(load_state_dict_file(p), w)


@pytest.mark.parametrize("cut", ["in_length", "in_header", "in_data"])
def test_truncated_safetensors(tmp_path, cut):
    p = tmp_path / "m.safetensors"
    save_file(_weights(), str(p))
    data = p.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    keep = {"in_length": 5, "in_header": 8 + header_len // 2, "in_data": len(data) - 10}[cut]
    p.write_bytes(data[:keep])
    for fn in (read_safetensors_header, load_state_dict_file):
        with pytest.raises(CheckpointLoadError) as err:
            fn(p)
        assert str(p) in str(err.value)
    if cut != "in_length":
        assert "truncated" in str(err.value)


def test_safetensors_garbage(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(CheckpointLoadError, match="JSON"):
        read_safetensors_header(p)
    p.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointLoadError, match="g.safetensors"):
        load_state_dict_file(p)


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin"])
def test_dispatch_pickle_extensions(tmp_path, ext):
    w = _weights()
    p = tmp_path / f"m{ext}"
    torch.save(w, p)
    _assert_same(load_state_dict_file(p), w)


def test_dispatch_unknown_extension(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointLoadError, match="unsupported file type .onnx"):
        load_state_dict_file(p)


def test_torchscript_archive_never_reaches_jit_load(tmp_path, monkeypatch):
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(M()), str(p))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript") as err:
        load_ckpt_state_dict(p)
    assert err.value.global_name == "TorchScript archive" and "scripted.pt" in str(err.value)
