"""Memory modes on the tiny models: --medvram/--lowvram placement, low-RAM mode, tiled VAE, switching, OOM.

There is no GPU here, so the execution device is the CPU. To see placement anyway, the offload plan's
four moving methods are replaced by ones that park offloaded weights as empty tensors (keeping the
real ones aside): a component used while not placed on the execution device cannot compute, and
each stage can check which weights are real.
"""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.core.out_of_memory import GpuOutOfMemoryError
from modules.core.pipeline import HiresParams, Txt2ImgParams
from modules.engine import memory, vae_tiling
from modules.models import offload
from modules.models.devices import cpu_policy, select_device_policy, vram_mode
from modules.models.loader import ModelManager, load_checkpoint, make_load_fn
from test_processing import make_services
from tiny_models import fp16_checkpoint, make_checkpoint

PARAMS = dict(prompt="a red cube", negative_prompt="blurry", seed=11, width=64, height=64, steps=3,
              sampler_name="Euler", hires=HiresParams(enabled=True, upscaler="Lanczos", scale=1.5, steps=2,
                                                      denoising_strength=0.5))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def render(tmp_path: Path, *args: str, params: dict | None = None, name: str = "run"):
    services = make_services(tmp_path / name, "sd1", extra_args=args)
    try:
        result = services.generation.txt2img(Txt2ImgParams(**(params or PARAMS)))
        return result.images[0], services.models.loaded_model
    finally:
        services.generation.queue.shutdown()


# ------------------------------------------------------------------ placement, made visible on the CPU


def parked(t: torch.Tensor) -> bool:
    return t.numel() == 0


class EmptyParking:
    """Offloaded tensors become empty tensors; their real data waits here until loaded again."""

    def __init__(self):
        self.saved: dict[torch.Tensor, torch.Tensor] = {}

    def load(self, _plan, module):
        for t in [*module.parameters(), *module.buffers()]:
            if t in self.saved:
                t.data = self.saved.pop(t)

    def offload(self, _plan, module):
        for t in [*module.parameters(), *module.buffers()]:
            if not parked(t):
                self.saved[t] = t.data
                t.data = torch.empty(0, dtype=t.dtype)

    def load_unit(self, plan, unit):
        self.load(plan, unit)
        return {}

    def offload_unit(self, plan, unit, _homes):
        self.offload(plan, unit)

    def install(self, monkeypatch):
        for name in ("load", "offload", "load_unit", "offload_unit"):
            fn = getattr(self, name)
            monkeypatch.setattr(offload.OffloadPlan, name, lambda plan, *a, _fn=fn: _fn(plan, *a))


def real_fraction(module) -> float:
    """The share of the module's parameter tensors that are on the execution device (not parked)."""
    tensors = list(module.parameters())
    return sum(1 for t in tensors if not parked(t)) / len(tensors)


def record_stages(model, log: list):
    """Forward pre-hooks added after the plan's own: they see the placement the plan made for each call."""
    comps = {n: model.components[n] for n in ("text_encoder", "unet", "vae")}

    def snap(stage):
        def hook(*_):
            log.append((stage, {n: round(real_fraction(m), 3) for n, m in comps.items()}))
        return hook
    handles = [comps["text_encoder"].register_forward_pre_hook(snap("text")),
               comps["unet"].register_forward_pre_hook(snap("unet")),
               comps["vae"].decoder.register_forward_pre_hook(snap("vae decode")),
               comps["vae"].encoder.register_forward_pre_hook(snap("vae encode"))]
    return handles


@pytest.fixture(scope="module")
def normal_image(tmp_path_factory):
    image, _ = render(tmp_path_factory.mktemp("normal"))
    return image


def test_medvram_moves_one_component_at_a_time_and_gives_the_same_image(tmp_path, monkeypatch, normal_image):
    EmptyParking().install(monkeypatch)
    services = make_services(tmp_path, "sd1", extra_args=("--medvram",))
    try:
        model = services.models.current()
        assert isinstance(model.offload, offload.OffloadPlan) and model.offload.streamed == frozenset()
        # after load nothing is on the execution device
        assert all(real_fraction(model.components[n]) == 0 for n in ("text_encoder", "unet", "vae"))
        log: list = []
        record_stages(model, log)
        image = services.generation.txt2img(Txt2ImgParams(**PARAMS)).images[0]
    finally:
        services.generation.queue.shutdown()
    stages = {stage for stage, _ in log}
    assert stages == {"text", "unet", "vae decode", "vae encode"}  # hires: decode, upscale, encode, UNet again
    for stage, placed in log:
        owner = {"text": "text_encoder", "unet": "unet"}.get(stage, "vae")
        assert placed == {n: (1.0 if n == owner else 0.0) for n in placed}, (stage, placed)
    assert [s for s, _ in log].index("vae decode") < len(log) - 1  # the UNet ran again after a VAE call
    assert np.abs(pixels(image) - pixels(normal_image)).max() <= 1


def test_lowvram_streams_the_unet_block_by_block_and_gives_the_same_image(tmp_path, monkeypatch, normal_image):
    EmptyParking().install(monkeypatch)
    monkeypatch.setattr(offload.OffloadPlan, "stream_unit_params", 20_000)  # the tiny UNet in several units
    services = make_services(tmp_path, "sd1", extra_args=("--lowvram",))
    try:
        model = services.models.current()
        unet = model.components["unet"]
        units = model.offload.units["unet"]
        assert model.offload.streamed == frozenset({"unet"})
        log: list = []
        record_stages(model, log)
        unit = units[len(units) // 2]
        unit_share = len(list(unit.parameters())) / len(list(unet.parameters()))
        inside: list[float] = []
        unit.register_forward_pre_hook(lambda *_: inside.append(real_fraction(unet)))
        image = services.generation.txt2img(Txt2ImgParams(**PARAMS)).images[0]
    finally:
        services.generation.queue.shutdown()
    assert len(units) > 3
    for stage, placed in log:
        assert placed["unet"] == 0.0, (stage, placed)  # never resident as a whole
        owner = {"text": "text_encoder", "unet": None}.get(stage, "vae")
        for name in ("text_encoder", "vae"):
            assert placed[name] == (1.0 if name == owner else 0.0), (stage, placed)
    # while one block runs, exactly that block's weights are on the execution device
    assert inside and all(abs(share - unit_share) < 1e-6 for share in inside)
    assert np.abs(pixels(image) - pixels(normal_image)).max() <= 1


def test_stream_units_cover_the_unet_without_overlap(tmp_path):
    ckpt = make_checkpoint(tmp_path / "a.safetensors", "sd1")
    unet = load_checkpoint(ckpt.path, cpu_policy()).components["unet"]
    units = offload.stream_units(unet, max_params=20_000)
    ids = [id(p) for u in units for p in u.parameters()]
    assert len(ids) == len(set(ids)) == len(list(unet.parameters()))
    assert not any(isinstance(u, torch.nn.ModuleList) for u in units)


def test_lowvram_pins_the_streamed_blocks_only_when_cuda_can_use_them(tmp_path, monkeypatch):
    assert offload.pins_host_copies("cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert offload.pins_host_copies("cuda:0") is False  # a CUDA device named but none there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert offload.pins_host_copies(torch.device("cuda", 0)) is True
    assert offload.pins_host_copies("cpu") is False
    # with pinning on, every tensor of the streamed UNet is replaced by its pinned copy (stood in for
    # here: pinning needs a CUDA build) and the blocks still point back at those copies after a call
    pinned: set[int] = set()

    def fake_pin(t):
        copy = t.clone()
        pinned.add(copy.data_ptr())
        return copy
    monkeypatch.setattr(offload, "_pinned", fake_pin)
    model = load_checkpoint(make_checkpoint(tmp_path / "a.safetensors", "sd1").path, cpu_policy())
    unet = model.components["unet"]
    plan = offload.OffloadPlan({"unet": unet, "vae": model.components["vae"]},
                               execution_device=torch.device("cpu"), streamed=("unet",), pin_memory=True).install()
    tensors = [*unet.parameters(), *unet.buffers()]
    assert tensors and all(t.data_ptr() in pinned for t in tensors)
    homes = {t: t.data.data_ptr() for t in tensors}
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(x, 10, emb)
    assert {t: t.data.data_ptr() for t in tensors} == homes  # the pinned copies stay the home copies
    assert len(pinned) == len(tensors)
    vae_params = list(model.components["vae"].parameters())
    assert vae_params and not any(p.data_ptr() in pinned for p in vae_params)  # medvram-style components are not pinned
    plan.remove()
    normal = offload.OffloadPlan({"unet": unet}, execution_device=torch.device("cpu"), streamed=("unet",))
    assert normal.pin_memory is False


def test_medvram_sdxl_offloads_sdxl_only_and_lowram_follows_total_ram(monkeypatch):
    from modules.core.flags import parse_args
    from modules.models import devices

    opts = parse_args(["--medvram-sdxl"], env={}).opts
    policy = cpu_policy(vram=vram_mode(medvram=opts.medvram, lowvram=opts.lowvram, medvram_sdxl=opts.medvram_sdxl))
    assert (policy.offload_for(True), policy.offload_for(False)) == ("medvram", "none")
    assert cpu_policy(vram="lowvram").offload_for(False) == "lowvram"
    assert parse_args(["--no-lowram"], env={}).opts.lowram is False
    assert parse_args([], env={}).opts.lowram is None
    kwargs = dict(use_cpu=["all"], device_id=None, no_half=False, no_half_vae=False)
    monkeypatch.setattr(devices, "total_ram", lambda: 8 * 2**30)
    assert select_device_policy(**kwargs).lowram is True
    assert select_device_policy(**kwargs, lowram=False).lowram is False
    monkeypatch.setattr(devices, "total_ram", lambda: 64 * 2**30)
    assert select_device_policy(**kwargs).lowram is False


def test_medvram_sdxl_hooks_both_text_encoders_of_an_sdxl_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    model = load_checkpoint(ckpt.path, cpu_policy(vram="medvram-sdxl"))
    assert set(model.offload.components) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    model.unload()
    sd1 = load_checkpoint(make_checkpoint(tmp_path / "a.safetensors", "sd1").path, cpu_policy(vram="medvram-sdxl"))
    assert sd1.offload is None


# ------------------------------------------------------------------ low-RAM mode


def test_lowram_keeps_fp16_weights_and_gives_the_same_image(tmp_path):
    fp16_checkpoint(tmp_path / "normal" / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    fp16_checkpoint(tmp_path / "low" / "models" / "Stable-diffusion" / "tiny-sd1.safetensors")
    images, models = {}, {}
    for name, args in (("normal", ("--no-lowram",)), ("low", ("--lowram",))):
        services = make_services(tmp_path / name, extra_args=args)
        try:
            images[name] = services.generation.txt2img(Txt2ImgParams(**PARAMS)).images[0]
            models[name] = services.models.current()
        finally:
            services.generation.queue.shutdown()
    low = models["low"]
    assert low.policy.lowram and not models["normal"].policy.lowram
    for comp in ("unet", "text_encoder", "vae"):
        module = low.components[comp]
        convs = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert convs and all(m.weight.dtype == torch.float16 for m in convs), comp
    assert low.components["unet"].dtype == torch.float32  # computes in fp32
    assert np.abs(pixels(images["low"]) - pixels(images["normal"])).max() <= 2


def test_lowram_weights_stay_writable_parameters_for_lora_merging(tmp_path):
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    loaded = [load_checkpoint(path, cpu_policy()), load_checkpoint(path, cpu_policy(lowram=True))]
    for model in loaded:  # writes outside a forward wait for the copy off the mapped file, as LoRA merging does
        model.wait_materialised()
    normal, low = (model.components["unet"] for model in loaded)
    delta = torch.full_like(normal.conv_in.weight, 0.01)
    with torch.no_grad():  # what an in-place LoRA merge does
        normal.conv_in.weight.add_(delta)
        low.conv_in.weight.add_(delta.half())
        x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, normal.config.cross_attention_dim)
        a, b = normal(x, 10, emb).sample, low(x, 10, emb).sample
    assert isinstance(low.conv_in.weight, torch.nn.Parameter) and low.conv_in.weight.dtype == torch.float16
    assert torch.allclose(a, b, atol=2e-3)


def test_lowram_upcasts_into_a_workspace_that_no_idle_model_holds(tmp_path):
    path = fp16_checkpoint(tmp_path / "a.safetensors")
    low = load_checkpoint(path, cpu_policy(lowram=True))
    low.wait_materialised()  # the weights' home copies off the mapped file (loader.py), as LoRA merging waits
    unet, te = low.components["unet"], low.components["text_encoder"]
    hook = unet.conv_in._diffusers_hook.get_hook("layerwise_casting")
    seen: list[int] = []
    stored = unet.conv_out.weight.data_ptr()
    conv = unet.conv_out._conv_forward  # what Conv2d.forward calls with the weight it computes with
    unet.conv_out._conv_forward = lambda x, w, bias: (seen.append(w.data_ptr()), conv(x, w, bias))[1]
    with torch.no_grad():
        x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
        unet(x, 10, emb)
        ids = torch.tensor([[49406, 320, 49407]])
        hidden = te(ids)[0]
    # the layer ran on an fp32 copy (a view of the workspace), which was freed after the UNet's call
    assert seen and seen[0] != stored and hook.workspace.buffer.numel() == 0
    assert unet.conv_out(torch.randn(1, unet.config.block_out_channels[0], 4, 4)).dtype == torch.float32
    assert unet.conv_out.weight.dtype == torch.float16 and unet.conv_out.weight.data_ptr() == stored
    table = te.get_input_embeddings()
    assert table.weight.dtype == torch.float16 and hidden.dtype == torch.float32
    with torch.no_grad():  # the lookup's rows converted: exactly the fp32 table's rows
        assert torch.equal(table(ids), table.weight.float()[ids])
    vae = low.components["vae"]
    assert all(m.inplace for m in vae.decoder.modules() if isinstance(m, torch.nn.SiLU))


# ------------------------------------------------------------------ tiled VAE


def test_tiling_policy_decides_by_pixels_mode_and_memory():
    auto = vae_tiling.TilingPolicy()
    assert auto.tile_px(1024, 1024, 512) is None and auto.tile_px(2048, 2048, 512) == 512
    assert auto.tile_px(2048, 2048, 1024) == 512  # SDXL's VAE: still 512 px tiles
    assert vae_tiling.TilingPolicy(short_memory=True).tile_px(768, 768, 512) == 256
    assert vae_tiling.TilingPolicy(mode="Never").tile_px(4096, 4096, 512) is None
    assert vae_tiling.TilingPolicy(mode="Always").tile_px(768, 768, 512) == 512
    assert vae_tiling.TilingPolicy(mode="Always").tile_px(512, 512, 512) is None  # one tile is untiled


def test_tiled_vae_agrees_with_untiled_on_an_image_of_several_tiles(tmp_path):
    """diffusers' tiling normalises each tile by its own statistics (GroupNorm, the mid-block attention),
    so tiles agree only approximately; the random tiny weights exaggerate that, hence the loose bounds
    (measured here: decode mean |diff| 0.14 for mean |pixel| 0.31, correlation 0.88)."""
    model = load_checkpoint(make_checkpoint(tmp_path / "a.safetensors", "sd1").path, cpu_policy())
    vae = model.components["vae"]
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 32, 32)  # 256 px in 128 px tiles: 3x3 of them with the overlap
    calls: list = []
    vae.decoder.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[-1]))
    with torch.no_grad():
        whole = vae_tiling.decode(vae, latents, vae_tiling.TilingPolicy(mode="Never"))
        n_whole = len(calls)
        tiled = vae_tiling.decode(vae, latents, vae_tiling.TilingPolicy(mode="Always", tile=128))
        enc_whole = vae_tiling.encode(vae, whole, vae_tiling.TilingPolicy(mode="Never")).mode()
        enc_tiled = vae_tiling.encode(vae, whole, vae_tiling.TilingPolicy(mode="Always", tile=128)).mode()
    assert n_whole == 1 and len(calls) - n_whole == 9 and max(calls[1:]) == 16
    assert tiled.shape == whole.shape == (1, 3, 256, 256)
    assert enc_tiled.shape == enc_whole.shape == (1, 4, 32, 32)
    for a, b in ((tiled, whole), (enc_tiled, enc_whole)):
        assert (a - b).abs().mean() < 0.6 * b.abs().mean()
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.8
    assert vae.use_tiling is False  # switched off again after the call


def test_the_tiled_vae_setting_reaches_the_decode(tmp_path):
    services = make_services(tmp_path, "sd1")
    try:
        model = services.models.current()
        calls: list = []
        model.components["vae"].decoder.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[-1]))
        params = dict(prompt="x", seed=1, width=640, height=64, steps=1)  # wider than one 512 px tile
        services.generation.txt2img(Txt2ImgParams(**params), override_settings={"vae_tiling": "Never"})
        assert calls == [80]
        calls.clear()
        services.generation.txt2img(Txt2ImgParams(**params), override_settings={"vae_tiling": "Always"})
        assert calls == [64, 32]  # 512 px tiles, 25% overlap
        calls.clear()
        services.generation.txt2img(Txt2ImgParams(**params))  # Automatic: 40960 px is under the budget
        assert calls == [80]
        calls.clear()  # A1111's Tiling (seamless image) wraps around: never tiled
        services.generation.txt2img(Txt2ImgParams(**params, tiling=True), override_settings={"vae_tiling": "Always"})
        assert calls == [80]
    finally:
        services.generation.queue.shutdown()


def test_a_nan_fp16_vae_decode_falls_back_to_fp32(tmp_path):
    model = load_checkpoint(make_checkpoint(tmp_path / "a.safetensors", "sd1").path, cpu_policy())
    vae = model.components["vae"].to(torch.float16)
    vae.decoder.register_forward_hook(lambda _m, _a, out: out * float("nan") if out.dtype == torch.float16 else out)
    with torch.no_grad():
        out = memory.vae_decode(vae, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert vae.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------ switching and out-of-memory


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("vram", ["normal", "medvram"])
def test_repeated_switches_do_not_grow_the_number_of_live_tensors(tmp_path, vram):
    paths = [make_checkpoint(tmp_path / f"m{i}.safetensors", "sd1", seed=i).path for i in range(3)]
    manager = ModelManager(make_load_fn(cpu_policy(vram=vram)), limit=1)
    manager.switch(paths[0])
    first = live_tensors()
    for i in range(1, 10):
        manager.switch(paths[i % 3])
    assert live_tensors() <= first
    manager.unload_all()


def test_cuda_out_of_memory_fails_the_job_with_advice_and_the_next_job_runs(tmp_path, monkeypatch):
    emptied: list = []
    monkeypatch.setattr(memory, "torch_gc", lambda device=None: emptied.append(device))
    services = make_services(tmp_path, "sd1")
    try:
        unet = services.models.current().components["unet"]
        state = {"raise": True}

        def oom(*_):
            if state.pop("raise", False):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        handle = unet.register_forward_pre_hook(oom)
        job = services.generation.submit(Txt2ImgParams(prompt="x", seed=1, width=64, height=64, steps=2))
        with pytest.raises(GpuOutOfMemoryError) as err:
            job.result()
        assert "--medvram" in str(err.value) and "--lowvram" in str(err.value)
        assert emptied  # the cache was emptied
        handle.remove()
        again = services.generation.txt2img(Txt2ImgParams(prompt="x", seed=1, width=64, height=64, steps=2))
        assert again.images[0].size == (64, 64)
    finally:
        services.generation.queue.shutdown()


def test_fp32_cpu_mode_converts_a_fp16_file_layer_by_layer_on_first_use(tmp_path, monkeypatch):
    """Fast loading: ready without a full fp32 copy; each layer becomes fp32 when it first runs, and the
    result is exactly that of converting everything at load (an fp32 copy of the same file)."""
    import safetensors.torch

    from modules.models.materialise import Materialiser

    monkeypatch.setattr(Materialiser, "start", lambda self: None)  # no background copy: first use only

    path = fp16_checkpoint(tmp_path / "half.safetensors")
    state = safetensors.torch.load_file(str(path))
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, str(full))
    lazy = load_checkpoint(path, cpu_policy()).components
    eager = load_checkpoint(full, cpu_policy()).components
    unet = lazy["unet"]
    assert unet.dtype == torch.float32  # what the sampler reads
    assert unet.down_blocks[0].resnets[0].conv1.weight.dtype == torch.float16  # not converted yet
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    ids = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        assert torch.equal(unet(x, 10, emb).sample, eager["unet"](x, 10, emb).sample)
        assert torch.equal(lazy["text_encoder"](ids)[0], eager["text_encoder"](ids)[0])
        assert torch.equal(lazy["vae"].decode(x).sample, eager["vae"].decode(x).sample)
    assert {p.dtype for p in unet.parameters()} == {torch.float32}  # every layer ran: all converted
