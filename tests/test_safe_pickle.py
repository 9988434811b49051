import argparse
import collections
import importlib
import os
import pickle
import shutil
import sys
import typing

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules.models import weights_io as safe_pickle
from modules.models.weights_io import (
    CheckpointLoadError,
    UnsafeCheckpointError,
    load_ckpt_state_dict,
    load_state_dict_file,
    read_safetensors_header,
    read_safetensors_metadata,
)

# Torch's own loader warns about non-default pickle protocols and deprecated jit APIs; expected here.
pytestmark = [pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
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


# ---------------------------------------------------------------------------------------------
# Plain and Lightning-era checkpoints load
# ---------------------------------------------------------------------------------------------

def test_plain_tensor_dict_uses_torch_weights_only(tmp_path, monkeypatch):
    w = _weights()
    p = tmp_path / "plain.ckpt"
    torch.save(w, p)
    monkeypatch.setattr(safe_pickle, "_restricted_torch_load",
                        lambda path: pytest.fail("restricted path not needed for a plain state dict"))
    _assert_same(load_ckpt_state_dict(p), w)


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


@pytest.mark.parametrize("protocol", [1, 2, 4])
def test_numpy_scalars_and_python_objects_use_restricted_path(tmp_path, protocol):
    # protocol 1 pickles the Namespace via copyreg._reconstructor, 2+ via NEWOBJ
    w = _weights()
    p = tmp_path / "np.ckpt"
    torch.save({"state_dict": w, "best": np.float64(0.25), "arr": np.arange(3), "blob": b"\x00\xff",
                "hp": argparse.Namespace(lr=1e-4), "dd": collections.defaultdict(list, {"a": [1]}),
                "types": typing.Any}, p, pickle_protocol=protocol)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, weights_only=True)  # the case the restricted unpickler exists for
    _assert_same(load_ckpt_state_dict(p), w)


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_non_zip_format(tmp_path, protocol):
    w = _weights()
    p = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": w, "best": np.float32(1.0)}, p, _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)
    _assert_same(load_ckpt_state_dict(p), w)


@pytest.fixture
def fake_lightning(tmp_path, monkeypatch):
    """Checkpoint pickling Lightning/omegaconf objects, saved while fake packages are importable.

    Before loading, the packages are replaced by booby-trapped versions that create a sentinel
    file on import, and left on sys.path: loading must never import them.
    """
    root = tmp_path / "fakepkgs"
    files = {
        "pytorch_lightning/__init__.py": "",
        "pytorch_lightning/callbacks/__init__.py": "",
        "pytorch_lightning/callbacks/model_checkpoint.py":
            "class ModelCheckpoint:\n"
            "    def __init__(self):\n"
            "        self.best_model_score = None\n"
            "        self.dirpath = 'logs/checkpoints'\n",
        "pytorch_lightning/utilities/__init__.py": "",
        "pytorch_lightning/utilities/parsing.py":
            "class AttributeDict(dict):\n    pass\n",
        "omegaconf/__init__.py": "",
        "omegaconf/dictconfig.py":
            "class DictConfig:\n    def __init__(self, content):\n        self._content = content\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        from omegaconf.dictconfig import DictConfig
        from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
        from pytorch_lightning.utilities.parsing import AttributeDict

        mc = ModelCheckpoint()
        mc.best_model_score = torch.tensor(0.5)
        w = _weights()
        ckpt = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": w,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5), "dirpath": "x"}},
            "callback_objects": [mc],
            "hyper_parameters": AttributeDict(lr=1e-4, cfg=DictConfig({"a": 1})),
            "hparams_ns": argparse.Namespace(batch=4),
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}],
        }
        p = tmp_path / "lightning.ckpt"
        torch.save(ckpt, p)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "omegaconf")]:
            del sys.modules[name]

    sentinel = tmp_path / "IMPORTED"
    for rel in files:
        shutil.rmtree(root / os.path.dirname(rel) / "__pycache__", ignore_errors=True)
        (root / rel).write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(root))
    yield p, w, sentinel
    for name in [m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "omegaconf")]:
        del sys.modules[name]


def test_lightning_checkpoint_loads_without_importing_lightning(fake_lightning):
    p, w, sentinel = fake_lightning
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, weights_only=True)
    _assert_same(load_ckpt_state_dict(p), w)
    assert not sentinel.exists()
    assert "pytorch_lightning" not in sys.modules and "omegaconf" not in sys.modules


# ---------------------------------------------------------------------------------------------
# Malicious pickles never run
# ---------------------------------------------------------------------------------------------

class _Reduce:
    """Pickles as ``func(*args)``: the classic pickle code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(sentinel):
    import builtins
    import functools
    import subprocess
    touch = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, f"touch '{sentinel}'"),
        "builtins.exec": _Reduce(builtins.exec, touch),
        "builtins.eval": _Reduce(builtins.eval, f"{touch} or 1"),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(sentinel)]),
        "functools.partial": _Reduce(functools.partial(os.system, f"touch '{sentinel}'")),
        "getattr(os, 'system')": _Reduce(builtins.getattr, _Reduce(builtins.__import__, "os"), "system"),
        "builtins.__import__": _Reduce(builtins.__import__, "os"),
        "importlib.import_module": _Reduce(importlib.import_module, "os"),
        "pickle.loads (nested)": _Reduce(pickle.loads, pickle.dumps(_Reduce(builtins.exec, touch))),
        "torch nested unsafe load": _Reduce(torch.storage._load_from_bytes, b"x"),
    }


@pytest.fixture
def sentinel(tmp_path):
    s = tmp_path / "PWNED"
    yield s
    assert not s.exists(), "a payload ran"


def test_payloads_are_real(tmp_path):
    """Control: the same payload does run under plain pickle, so the refusals below mean something."""
    s = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps({"x": _payloads(s)["builtins.exec"]}, protocol=2))
    assert s.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen",
                                  "functools.partial", "getattr(os, 'system')", "builtins.__import__",
                                  "importlib.import_module", "pickle.loads (nested)",
                                  "torch nested unsafe load"])
def test_raw_pickle_payload_refused(tmp_path, sentinel, kind, protocol):
    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"w": 1, "evil": _payloads(sentinel)[kind]}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError) as err:
        load_ckpt_state_dict(p)
    assert str(p) in str(err.value)
    assert err.value.path == p


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.Popen", "functools.partial"])
def test_torch_zip_payload_refused(tmp_path, sentinel, kind, protocol):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _weights(), "evil": _payloads(sentinel)[kind]}, p, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_ckpt_state_dict(p)
    assert str(p) in str(err.value)
    expected = {"os.system": "posix.system" if os.name == "posix" else "nt.system",
                "builtins.exec": "builtins.exec", "subprocess.Popen": "subprocess.Popen",
                "functools.partial": "functools.partial"}[kind]
    assert err.value.global_name == expected
    assert expected in str(err.value)


def test_payload_in_legacy_format_refused(tmp_path, sentinel):
    p = tmp_path / "evil_legacy.ckpt"
    torch.save({"w": torch.ones(1), "evil": _payloads(sentinel)["os.system"]}, p,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError):
        load_ckpt_state_dict(p)


def test_payload_hidden_inside_lightning_state(fake_lightning, tmp_path, sentinel):
    # The placeholder swallows state, but the evil global inside that state is still refused.
    p = tmp_path / "evil_state.ckpt"
    data = (b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)\x81"
            + pickle.dumps({"x": _payloads(sentinel)["builtins.exec"]}, protocol=2)[2:-1] + b"b.")
    p.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        load_ckpt_state_dict(p)


def _stack_global(module: bytes, name: bytes) -> bytes:
    """Protocol 4 pickle of just ``module.name`` (STACK_GLOBAL allows dotted qualnames)."""
    return (b"\x80\x04\x8c" + bytes([len(module)]) + module
            + b"\x8c" + bytes([len(name)]) + name + b"\x93.")


def test_lookalike_module_names_refused(tmp_path):
    p = tmp_path / "lookalike.ckpt"
    p.write_bytes(b"\x80\x02cpytorch_lightningx.evil\nThing\n)R.")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_lightningx.evil.Thing"):
        load_ckpt_state_dict(p)
    # Dotted attribute paths inside an inert module are not given placeholders either.
    p.write_bytes(_stack_global(b"pytorch_lightning", b"Trainer.__init__.__globals__"))
    with pytest.raises(UnsafeCheckpointError):
        load_ckpt_state_dict(p)


def test_build_on_allowlisted_function_refused(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD (None, {"__defaults__": ...}) would patch
    # the real torch function for the rest of the process.
    before = torch._utils._rebuild_tensor_v2.__defaults__
    p = tmp_path / "build.ckpt"
    p.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN"
                  + pickle.dumps({"__defaults__": ("patched",)}, protocol=2)[2:-1] + b"\x86b.")
    with pytest.raises(UnsafeCheckpointError, match="BUILD"):
        load_ckpt_state_dict(p)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_codecs_other_than_latin1_refused(tmp_path):
    p = tmp_path / "codec.ckpt"
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(UnsafeCheckpointError, match="_codecs.encode"):
        load_ckpt_state_dict(p)


def test_torchscript_archive_never_reaches_jit_load(tmp_path, monkeypatch):
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(M()), str(p))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load_ckpt_state_dict(p)
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        safe_pickle._restricted_torch_load(p)  # the fallback checks on its own as well


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
