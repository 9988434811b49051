"""A layer that still holds its checkpoint bytes keeps no backup copy: its original is read back from the
file (modules/models/file_origin.py, engine/networks/backups.py FileBackup). Loaded through the real
loader from tiny single-file checkpoints (fp32 and fp16 files), as users load them."""
from __future__ import annotations

import gc
import os

import pytest
import torch

from conftest import make_services
from lora_fixtures import kohya_lora
from modules.engine.networks import backups
from modules.models import file_origin


def _services(tmp_path, dtype=None):
    from tiny_models import make_checkpoint

    services = make_services(tmp_path, {})
    path = services.paths.ckpt_dir / "tiny.safetensors"
    make_checkpoint(path, "sd1", seed=3, dtype=dtype)
    services.models.refresh()
    model = services.models.current()
    kohya_lora(services.paths.lora_dir / "a.safetensors", model.pipe, seed=1)
    kohya_lora(services.paths.lora_dir / "b.safetensors", model.pipe, seed=2)
    return services, model, path


@pytest.fixture(params=[None, torch.float16], ids=["fp32-file", "fp16-file"])
def loaded(tmp_path, request):
    services, model, path = _services(tmp_path, request.param)
    yield services, model, path
    services.generation.queue.shutdown()


def weights(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(model.pipe, c).state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def activate(services, model, prompt: str):
    return services.networks.engine.activate(model, None, [prompt])


def test_merged_layers_keep_no_copy_and_restore_exactly(loaded):
    services, model, _ = loaded
    before = weights(model)
    activate(services, model, "a cat <lora:a:1>")
    merger = services.networks.engine.merger(model)
    kinds = [type(w) for w, _ in merger.backups.values()]
    assert kinds and all(k is backups.FileBackup for k in kinds)
    assert merger.backup_bytes == sum(b.numel() * b.element_size() for _, b in merger.backups.values()
                                      if b is not None)   # only the (small) biases are copied
    assert not same(weights(model), before)
    activate(services, model, "a cat <lora:b:0.7>")   # switch: A's layers are read back, then B merged
    activate(services, model, "a cat")
    assert same(weights(model), before)


def test_switch_gives_the_same_weights_as_merging_into_a_fresh_load(tmp_path):
    first, model, _ = _services(tmp_path / "one")
    activate(first, model, "a cat <lora:a:1>")
    activate(first, model, "a cat <lora:b:0.7> <lora:a:0.3>")
    second, fresh, _ = _services(tmp_path / "two")
    second.networks.engine.merger(fresh).file_backups = False   # the reference: copies, as before
    activate(second, fresh, "a cat <lora:b:0.7> <lora:a:0.3>")
    assert same(weights(model), weights(fresh))
    for services in (first, second):
        services.generation.queue.shutdown()


def test_a_weight_edited_after_the_load_is_copied_and_its_edit_survives(loaded):
    services, model, _ = loaded
    layer = model.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.weight.data.mul_(1.5)   # .data: invisible to torch's version counter, seen by the comparison
    before = weights(model)
    activate(services, model, "a cat <lora:a:1>")
    merger = services.networks.engine.merger(model)
    edited = [w for ref, (w, _) in merger.backups.items() if merger.index.modules[ref] is layer]
    assert len(edited) == 1 and isinstance(edited[0], torch.Tensor)
    assert sum(isinstance(w, backups.FileBackup) for w, _ in merger.backups.values()) == len(merger.backups) - 1
    activate(services, model, "a cat")
    assert same(weights(model), before)


def test_a_checkpoint_replaced_by_rename_still_restores_exactly(loaded):
    services, model, path = loaded
    before = weights(model)
    activate(services, model, "a cat <lora:a:1>")
    other = path.with_name("new.tmp")
    other.write_bytes(os.urandom(path.stat().st_size))
    os.replace(other, path)   # as download tools and our own writers do
    activate(services, model, "a cat")
    assert same(weights(model), before)


def test_a_checkpoint_rewritten_in_place_fails_the_job_clearly(loaded):
    services, model, path = loaded
    activate(services, model, "a cat <lora:a:1>")
    size = path.stat().st_size
    with open(path, "r+b") as fh:   # same inode, other bytes (cp over an existing file does this)
        fh.seek(size // 2)
        fh.write(os.urandom(4096))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(file_origin.CheckpointChangedError, match="load the checkpoint again"):
        activate(services, model, "a cat")


def test_a_checkpoint_changed_before_the_first_merge_gives_copies(loaded):
    services, model, path = loaded
    before = weights(model)
    other = path.with_name("new.tmp")
    other.write_bytes(path.read_bytes())
    os.replace(other, path)   # same bytes, another file: not the one the model was loaded from
    activate(services, model, "a cat <lora:a:1>")
    merger = services.networks.engine.merger(model)
    assert merger.backups and all(isinstance(w, torch.Tensor) for w, _ in merger.backups.values())
    activate(services, model, "a cat")
    assert same(weights(model), before)


def test_the_file_is_closed_once_nothing_is_owed(loaded):
    services, model, path = loaded

    def open_on_checkpoint() -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(1 for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path))
    activate(services, model, "a cat <lora:a:1>")
    assert open_on_checkpoint() == 1
    activate(services, model, "a cat")
    gc.collect()
    assert open_on_checkpoint() == 0


def test_a_job_through_the_queue_reports_the_changed_file(loaded):
    from modules.core.pipeline import Txt2ImgParams

    services, model, path = loaded
    params = dict(width=64, height=64, steps=1, seed=1, sampler_name="Euler")
    services.generation.txt2img(Txt2ImgParams(prompt="a cat <lora:a:1>", **params))
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(os.urandom(4096))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(Exception, match="load the checkpoint again"):
        services.generation.txt2img(Txt2ImgParams(prompt="a cat", **params))


def test_low_ram_mapped_layers_are_read_back_too(tmp_path):
    """--lowram: the weights stay views of the file's mapping (models/residency.py); a merge writes
    copy-on-write pages, and the originals are read back from the file instead of kept in memory."""
    from test_processing import make_services as services_with

    from tiny_models import make_checkpoint

    root = tmp_path / "lowram"
    services = services_with(root, extra_args=("--lowram",))
    make_checkpoint(services.paths.ckpt_dir / "tiny.safetensors", "sd1", seed=3, dtype=torch.float16)
    services.models.refresh()
    try:
        model = services.models.current()
        assert model.residency is not None
        kohya_lora(services.paths.lora_dir / "a.safetensors", model.pipe, seed=1)
        before = weights(model)
        activate(services, model, "a cat <lora:a:1>")
        merger = services.networks.engine.merger(model)
        mapped = [w for ref, (w, _) in merger.backups.items()
                  if model.residency.span.holds(merger.index.modules[ref].weight.data)]
        assert mapped and all(isinstance(w, backups.FileBackup) for w in mapped)
        assert not same(weights(model), before)
        activate(services, model, "a cat")
        assert same(weights(model), before)
    finally:
        services.generation.queue.shutdown()
