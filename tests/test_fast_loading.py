"""Memory-mapped loading (models/materialise.py): ready at once, weights copied off the file in the
background or on first use, bit-identical results, and a file truncated in place afterwards harms nothing."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from modules.models.devices import cpu_policy
from modules.models.loader import load_checkpoint
from modules.models.materialise import CAN_MAP, Materialiser
from tiny_models import fp16_checkpoint

pytestmark = pytest.mark.skipif(not CAN_MAP, reason="memory-mapped loading needs /proc/self/maps (Linux)")


def _in_memory_copy(path: Path, dest: Path) -> Path:
    """The same bytes under another name, loaded the old way (read into memory, no mapping)."""
    dest.write_bytes(path.read_bytes())
    return dest


def _mapped(path: Path) -> bool:
    real = str(path.resolve())
    with open("/proc/self/maps", encoding="utf-8") as fh:
        return any(line.rstrip().endswith(real) for line in fh)


def _outputs(components: dict) -> list[torch.Tensor]:
    unet, te, vae = components["unet"], components["text_encoder"], components["vae"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():
        return [unet(x, 10, emb).sample, te(ids)[0], vae.decode(x).sample, vae.encode(torch.randn(1, 3, 16, 16,
                                                                                            generator=g)).latent_dist.mean]


def _file_backed(model) -> list[str]:
    mat = model.materialiser
    return [f"{c}.{n}" for c, m in model.components.items() if isinstance(m, torch.nn.Module)
            for n, t in [*m.named_parameters(), *m.named_buffers()] if mat is not None and mat.file_backed(t)]


@pytest.mark.parametrize("lowram", [False, True], ids=["fp32", "lowram"])
def test_mapped_load_gives_exactly_the_in_memory_result_and_leaves_the_file(tmp_path, monkeypatch, lowram):
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    reference_path = _in_memory_copy(path, tmp_path / "b.safetensors")
    monkeypatch.setattr("modules.models.loader.CAN_MAP", False)   # the old reader: everything read into memory
    reference = load_checkpoint(reference_path, cpu_policy(lowram=lowram))
    assert reference.materialiser is None
    expected = _outputs(reference.components)
    monkeypatch.undo()

    model = load_checkpoint(path, cpu_policy(lowram=lowram))
    assert model.materialiser is not None  # the file was memory-mapped
    got = _outputs(model.components)  # may run while the background copy is under way
    model.wait_materialised()
    # fp32 mode copies every tensor off the file; low-RAM keeps the half-precision layers as views of the
    # mapping, so the idle components' pages can be dropped (models/residency.py)
    assert model.materialiser.done and bool(_file_backed(model)) == lowram
    assert (model.residency is not None) == lowram
    for a, b in zip(got + _outputs(model.components), expected + expected):
        assert torch.equal(a, b)
    kept = {p.dtype for p in model.components["unet"].parameters()}
    assert (torch.float16 in kept) == lowram  # low-RAM keeps the file's fp16; fp32 mode converted everything
    del reference
    gc.collect()
    assert _mapped(path) == lowram  # fp32: every tensor copied, the mapping is gone
    model.unload()
    del model
    gc.collect()
    assert not _mapped(path)  # unloaded: the mapping is gone in both modes


def test_layers_copy_off_the_file_on_first_use_without_the_thread(tmp_path, monkeypatch):
    """A job that runs before the background copy reaches a layer copies that layer itself, first."""
    monkeypatch.setattr(Materialiser, "start", lambda self: None)
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    model = load_checkpoint(path, cpu_policy())  # fp32 mode (low-RAM keeps layers mapped: residency.py)
    conv = model.components["unet"].down_blocks[0].resnets[0].conv1
    assert model.materialiser.file_backed(conv.weight)
    _outputs(model.components)
    assert not model.materialiser.file_backed(conv.weight) and conv.weight.dtype == torch.float32
    model.materialiser.run_now()
    assert _file_backed(model) == []
    gc.collect()
    assert not _mapped(path)


def test_a_file_truncated_in_place_after_loading_harms_nothing(tmp_path):
    """What mmap risks (SIGBUS when another program truncates the file under the mapping) cannot happen
    once the weights are copied off: the model still runs and gives the same result."""
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    model = load_checkpoint(path, cpu_policy())
    model.wait_materialised()
    before = _outputs(model.components)
    with open(path, "r+b") as fh:  # in place, as `cp` or a download tool would
        fh.truncate(0)
    after = _outputs(model.components)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_unloading_during_the_background_copy_stops_it_and_frees_the_mapping(tmp_path):
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    model = load_checkpoint(path, cpu_policy())
    mat = model.materialiser
    model.unload()
    assert model.materialiser is None
    assert mat._thread is None or not mat._thread.is_alive()
    del model, mat
    gc.collect()
    assert not _mapped(path)


def test_lora_merging_waits_until_the_weights_are_off_the_file(tmp_path, monkeypatch):
    """Merging writes weights outside a forward: it must not race the background copy."""
    import threading

    from modules.engine.networks import activation

    gate = threading.Event()
    run = Materialiser._run
    monkeypatch.setattr(Materialiser, "_run", lambda self: (gate.wait(), run(self)))
    model = load_checkpoint(fp16_checkpoint(tmp_path / "a.safetensors"), cpu_policy())
    assert not model.materialiser.done and _file_backed(model)
    threading.Timer(0.2, gate.set).start()  # lets the copy start only once the merge is waiting for it
    activation._wait_for_weights(model)
    assert model.materialiser.done and _file_backed(model) == []


def test_extensions_reading_shared_sd_model_get_weights_off_the_file(tmp_path, monkeypatch):
    """An extension may write weights through `shared.sd_model` at any time: the facade waits for the copy."""
    import threading
    from types import SimpleNamespace

    import modules.shared as shared

    gate = threading.Event()
    run = Materialiser._run
    monkeypatch.setattr(Materialiser, "_run", lambda self: (gate.wait(), run(self)))
    model = load_checkpoint(fp16_checkpoint(tmp_path / "a.safetensors"), cpu_policy())
    monkeypatch.setattr(shared.context, "services", lambda: SimpleNamespace(models=SimpleNamespace(loaded_model=model)))
    assert not model.materialiser.done
    gate.set()
    assert shared.sd_model is model
    assert model.materialiser.done and _file_backed(model) == []
