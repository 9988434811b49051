"""Low-RAM mode keeps only the running component's weights resident (models/residency.py): idle
components' mapped pages are dropped and fault back in unchanged, and written weights (a LoRA merged
in place) are never dropped but copied into memory the model owns."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_fixtures import kohya_lora
from modules.core.pipeline import Txt2ImgParams
from modules.models import residency
from modules.models.devices import cpu_policy
from modules.models.loader import load_checkpoint
from modules.models.materialise import CAN_MAP
from test_processing import make_services
from tiny_models import fp16_checkpoint

pytestmark = pytest.mark.skipif(not CAN_MAP, reason="memory-mapped loading needs /proc/self/maps (Linux)")


def _resident(model, name: str) -> int:
    return residency.resident_bytes(model.residency.mapped_tensors(name))


def _run_stages(model) -> list[torch.Tensor]:
    """Text encoder, UNet, VAE decode: the order of a txt2img job."""
    unet, te, vae = (model.components[k] for k in ("unet", "text_encoder", "vae"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = te(ids)[0]
        out = [emb, unet(x, 10, emb).sample]
        out.append(vae.decode(out[1]).sample)
    return out


def test_idle_components_are_dropped_and_fault_back_bit_identical(tmp_path, monkeypatch):
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    reference_file = tmp_path / "b.safetensors"
    reference_file.write_bytes(path.read_bytes())
    monkeypatch.setattr("modules.models.loader.CAN_MAP", False)  # read into memory: nothing mapped, nothing dropped
    reference = load_checkpoint(reference_file, cpu_policy(lowram=True))
    assert reference.residency is None
    expected = _run_stages(reference)
    monkeypatch.undo()

    model = load_checkpoint(path, cpu_policy(lowram=True))
    assert set(model.residency.components) == {"unet", "text_encoder", "vae"}
    assert all(_resident(model, name) == 0 for name in model.residency.components)  # ready, nothing resident yet
    seen = {}
    hooks = [model.components["unet"].register_forward_hook(
                 lambda *_: seen.update(unet=_resident(model, "unet"), te_in_unet=_resident(model, "text_encoder"))),
             model.components["vae"].decoder.register_forward_hook(
                 lambda *_: seen.update(vae=_resident(model, "vae"), unet_in_vae=_resident(model, "unet")))]
    for _ in range(2):  # the second round runs on weights that were dropped and faulted back in
        got = _run_stages(model)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert seen["unet"] > 0 and seen["te_in_unet"] == 0   # the text encoder is out while the UNet runs
        assert seen["vae"] > 0 and seen["unet_in_vae"] == 0   # the UNet is out while the VAE decodes
    assert model.residency.released >= 8 and not model.residency.owned
    for h in hooks:
        h.remove()


def test_a_weight_written_in_place_is_kept_when_its_component_is_dropped(tmp_path):
    model = load_checkpoint(fp16_checkpoint(tmp_path / "a.safetensors"), cpu_policy(lowram=True))
    te = model.components["text_encoder"]
    linears = [m for m in te.modules() if isinstance(m, torch.nn.Linear)]
    written, untouched = linears[0].weight, linears[-1].weight
    assert model.residency.span.holds(written.data) and model.residency.span.holds(untouched.data)
    original = written.detach().clone()
    with torch.no_grad():
        written.add_(0.5)  # what an in-place LoRA merge does (copy-on-write pages of the mapping)
    merged = written.detach().clone()
    _run_stages(model)  # the UNet's start drops the text encoder's pages
    assert torch.equal(written, merged)  # not silently reverted to the file's bytes
    assert not model.residency.span.holds(written.data)  # owns its memory now, for good
    assert model.residency.span.holds(untouched.data) and _resident(model, "text_encoder") == 0
    assert model.residency.owned
    with torch.no_grad():
        written.copy_(original)  # unmerging writes into the owned copy
    _run_stages(model)
    assert torch.equal(written, original)


def _images(root, lora_names):
    fp16_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    services = make_services(root, extra_args=("--lowram",))
    try:
        model = services.models.current()
        kohya_lora(services.paths.lora_dir / "style.safetensors", model.pipe)
        params = dict(steps=2, width=64, height=64, seed=7, sampler_name="Euler", cfg_scale=7.0)
        images = [np.asarray(services.generation.txt2img(Txt2ImgParams(prompt=p, **params)).images[0])
                  for p in lora_names]
        return images, model
    finally:
        services.generation.queue.shutdown()


def test_a_merged_lora_survives_every_drop_on_the_real_path(tmp_path, monkeypatch):
    prompts = ["a cat", "a cat <lora:style:1>", "a dog <lora:style:1>", "a cat"]
    images, model = _images(tmp_path / "mapped", prompts)
    assert model.residency is not None and model.residency.released and model.residency.owned
    monkeypatch.setattr(residency, "available", lambda span: False)  # the weights copied off the file, never dropped
    kept, kept_model = _images(tmp_path / "copied", prompts)
    assert kept_model.residency is None
    assert not np.array_equal(images[0], images[1])
    assert np.array_equal(images[0], images[3])  # the LoRA came off again
    for a, b in zip(images, kept):
        assert np.array_equal(a, b)


def test_a_checkpoint_truncated_in_place_fails_the_job_instead_of_crashing(tmp_path):
    """A mapped file truncated under a low-RAM model would SIGBUS on the next fault: the component
    that is about to run checks the file first and fails with a clear error."""
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    model = load_checkpoint(path, cpu_policy(lowram=True))
    _run_stages(model)
    with open(path, "r+b") as fh:  # in place, as `cp` over it or a download tool would
        fh.truncate(0)
    with pytest.raises(residency.CheckpointChangedError, match="changed on disk"):
        _run_stages(model)
    model.unload()


def test_a_checkpoint_replaced_by_rename_is_harmless(tmp_path):
    """Our own writers (and most tools) replace a file by renaming a new one over it: the mapping keeps
    the old file's pages, so the model runs on unchanged."""
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    model = load_checkpoint(path, cpu_policy(lowram=True))
    before = _run_stages(model)
    (tmp_path / "new.safetensors").write_bytes(b"not weights")
    (tmp_path / "new.safetensors").replace(path)
    assert all(torch.equal(a, b) for a, b in zip(before, _run_stages(model)))


def test_pages_read_outside_a_forward_are_dropped_at_the_next_switch(tmp_path):
    """An extension summing the UNet's weights while the text encoder is the running component: those
    pages go again when the next component starts (they are clean: the same bytes fault back)."""
    model = load_checkpoint(fp16_checkpoint(tmp_path / "a.safetensors"), cpu_policy(lowram=True))
    before = _run_stages(model)  # ends with the VAE running
    unet = model.components["unet"]
    total = sum(float(p.float().sum()) for p in unet.parameters())  # faults the UNet's pages in
    assert _resident(model, "unet") > 0 and model.residency.active == "vae"
    with torch.no_grad():
        model.components["text_encoder"](torch.zeros(1, 77, dtype=torch.long))
    assert _resident(model, "unet") == 0 and not model.residency.owned  # read, not written: nothing owned
    assert sum(float(p.float().sum()) for p in unet.parameters()) == total
    assert all(torch.equal(a, b) for a, b in zip(before, _run_stages(model)))


def test_the_checkpoints_own_vae_idles_out_of_memory_beside_a_separate_vae(tmp_path):
    import tiny_models as tm
    from modules.models import detection
    from modules.models.loader import load_model, replace_vae

    path = fp16_checkpoint(tmp_path / "a.safetensors")
    separate = tm.make_vae_file(tmp_path / "vae.safetensors", prefixed=False, seed=5)
    model = load_model(path, detection.identify(path, None), cpu_policy(lowram=True), vae_file=separate.path)
    assert "baked_vae" in model.residency.components and model.baked_vae is not None
    assert not any(model.residency.span.holds(p.data) for p in model.components["vae"].parameters())
    _run_stages(model)  # the separate VAE decodes; the checkpoint's own stays out
    # (but for the kernel's fault-around: a fault maps up to 64 KB of cached neighbours, and in the file
    # the VAE's last tensors sit next to the UNet's first ones)
    own = sum(t.numel() * t.element_size() for t in model.residency.mapped_tensors("baked_vae"))
    assert _resident(model, "baked_vae") < own // 4
    replace_vae(model, None)  # back to the checkpoint's own: it faults in when it runs, and decodes as loaded
    expected = _run_stages(load_checkpoint(path, cpu_policy(lowram=True)))
    assert all(torch.equal(a, b) for a, b in zip(_run_stages(model), expected))
    assert _resident(model, "baked_vae") > 0 and _resident(model, "unet") == 0
