"""The refiner end to end on tiny real-layout checkpoints: which UNet runs how often, the SDXL refiner's own
conditioning, compatibility by latent space, model swapping, hires fix order, infotext and paste."""
from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from modules.core.infotext import parse_infotext, read_fields
from modules.core.pipeline import HiresParams, ProcessingError, Txt2ImgParams
from tiny_models import make_checkpoint

SMALL = dict(width=64, height=64, steps=4, cfg_scale=7.0, sampler_name="Euler", scheduler="Automatic", seed=11)


def _services(data_dir):
    from conftest import make_services

    services = make_services(data_dir, {"base.safetensors": ("sd1", 1), "other-sd1.safetensors": ("sd1", 2)})
    ckpt_dir = services.paths.ckpt_dir
    make_checkpoint(ckpt_dir / "xl.safetensors", "sdxl", seed=3)
    # bigG 320 wide + 5 time ids x 448: the refiner's add-embedding input is 2560 wide, as in the real one.
    make_checkpoint(ckpt_dir / "xl-refiner.safetensors", "sdxl-refiner", seed=4, te_width=320,
                    addition_time_embed_dim=448)
    services.models.refresh()
    return services


class UnetCalls:
    """Counts UNet forward calls per checkpoint file and keeps the last call's inputs."""

    def __init__(self, services):
        self.counts: Counter[str] = Counter()
        self.loads: Counter[str] = Counter()
        self.last: dict[str, dict] = {}
        services.models.add_loaded_listener(self.wrap)

    def wrap(self, model):
        name = model.path.stem
        self.loads[name] += 1
        unet = model.pipe.unet
        inner = unet.forward

        def forward(sample, timestep, encoder_hidden_states=None, **kwargs):
            self.counts[name] += 1
            self.last[name] = dict(hidden=encoder_hidden_states.shape, added=kwargs.get("added_cond_kwargs"))
            return inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        unet.forward = forward

    def reset(self):
        self.counts.clear()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    services = _services(tmp_path_factory.mktemp("refiner"))
    services.options.set("sd_checkpoints_limit", 2)
    services.calls = UnetCalls(services)
    yield services
    services.generation.queue.shutdown()


def render(services, checkpoint="base.safetensors", **kw):
    return services.generation.txt2img(Txt2ImgParams(prompt="a red house", negative_prompt="blurry", **{**SMALL, **kw}),
                                       override_settings={"sd_model_checkpoint": checkpoint})


def pixels(result):
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_switch_at_one_is_bit_identical_to_no_refiner(services):
    plain = render(services)
    services.calls.reset()
    refined = render(services, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=1.0)
    assert np.array_equal(pixels(plain), pixels(refined))
    assert services.calls.counts == Counter({"base": 4})
    assert "Refiner" not in parse_infotext(refined.infotexts[0])


def test_switch_at_half_runs_each_model_for_half_the_steps_and_differs(services):
    plain = render(services)
    services.calls.reset()
    refined = render(services, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5)
    # CFG: one batched UNet call (cond + uncond) per step.
    assert services.calls.counts == Counter({"base": 2, "other-sd1": 2})
    assert not np.array_equal(pixels(plain), pixels(refined))
    info = parse_infotext(refined.infotexts[0])
    hashed = services.models.registry.get_closest("other-sd1.safetensors").shorthash
    assert info["Refiner"] == f"other-sd1 [{hashed}]" and info["Refiner switch at"] == "0.5"
    assert info["Model"] == "base"  # the job's checkpoint stays the model of record


def test_the_switch_point_follows_a1111s_rounding(services):
    services.calls.reset()
    render(services, steps=5, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.3)
    assert services.calls.counts == Counter({"base": 2, "other-sd1": 3})  # calls 0, 1 have i/5 < 0.3


def test_the_sdxl_refiner_gets_bigg_only_and_aesthetic_time_ids(services):
    services.calls.reset()
    result = render(services, "xl.safetensors", refiner_checkpoint="xl-refiner.safetensors", refiner_switch_at=0.5)
    assert services.calls.counts == Counter({"xl": 2, "xl-refiner": 2})
    ref = services.calls.last["xl-refiner"]
    assert ref["hidden"][-1] == 320                      # the bigG encoder alone (its width)
    ids = ref["added"]["time_ids"]
    assert ids.shape[-1] == 5                             # size, crop, aesthetic score
    assert sorted(set(ids[:, 4].tolist())) == [2.5, 6.0]   # negative rows 2.5, positive 6.0
    assert services.calls.last["xl"]["added"]["time_ids"].shape[-1] == 6
    loaded = {m.path.stem: m for m in services.models.manager.loaded}
    assert loaded["xl-refiner"].pipe.unet.config.projection_class_embeddings_input_dim == 2560
    assert result.images[0].size == (64, 64)


def test_aesthetic_scores_come_from_the_settings(services):
    services.calls.reset()
    render(services, "xl.safetensors", refiner_checkpoint="xl-refiner.safetensors", refiner_switch_at=0.5)
    before = services.calls.last["xl-refiner"]["added"]["time_ids"][:, 4].tolist()
    services.generation.txt2img(
        Txt2ImgParams(prompt="a red house", refiner_checkpoint="xl-refiner.safetensors", refiner_switch_at=0.5,
                      **SMALL),
        override_settings={"sd_model_checkpoint": "xl.safetensors", "sdxl_refiner_high_aesthetic_score": 7.5,
                           "sdxl_refiner_low_aesthetic_score": 1.5})
    after = services.calls.last["xl-refiner"]["added"]["time_ids"][:, 4].tolist()
    assert sorted(set(before)) == [2.5, 6.0] and sorted(set(after)) == [1.5, 7.5]


@pytest.mark.parametrize("base, refiner", [("base.safetensors", "xl-refiner.safetensors"),
                                           ("xl.safetensors", "other-sd1.safetensors")])
def test_a_refiner_of_another_latent_space_is_refused_before_any_work(services, base, refiner):
    services.calls.reset()
    with pytest.raises(ProcessingError, match="latent space"):
        services.generation.submit(Txt2ImgParams(prompt="x", refiner_checkpoint=refiner, **SMALL),
                                   override_settings={"sd_model_checkpoint": base})
    assert not services.calls.counts


def test_an_unknown_refiner_or_a_bad_switch_point_is_refused(services):
    with pytest.raises(ProcessingError, match="not found"):
        services.generation.submit(Txt2ImgParams(prompt="x", refiner_checkpoint="nope.safetensors", **SMALL))
    with pytest.raises(ProcessingError, match="refiner_switch_at"):
        services.generation.submit(Txt2ImgParams(prompt="x", refiner_checkpoint="other-sd1.safetensors",
                                                 refiner_switch_at=0.0, **SMALL))


def test_with_hires_fix_the_refiner_takes_over_in_the_second_pass_by_default(services):
    services.calls.reset()
    hires = HiresParams(enabled=True, upscaler="Latent", scale=1.5, steps=4, denoising_strength=0.5)
    result = render(services, hires=hires, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5)
    # first pass: 4 base calls; hires pass: 4 calls, the last 2 on the refiner
    assert services.calls.counts == Counter({"base": 6, "other-sd1": 2})
    assert result.images[0].size == (96, 96)


def test_with_hires_fix_and_both_passes_the_refiner_finishes_the_first_pass_and_runs_the_second(services):
    services.calls.reset()
    hires = HiresParams(enabled=True, upscaler="Latent", scale=1.5, steps=4, denoising_strength=0.5)
    services.generation.txt2img(
        Txt2ImgParams(prompt="a red house", hires=hires, refiner_checkpoint="other-sd1.safetensors",
                      refiner_switch_at=0.5, **SMALL),
        override_settings={"sd_model_checkpoint": "base.safetensors", "hires_fix_refiner_pass": "both passes"})
    assert services.calls.counts == Counter({"base": 2, "other-sd1": 6})


def test_both_models_stay_loaded_with_a_limit_of_two(services):
    render(services, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5)
    loads = dict(services.calls.loads)
    render(services, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5, n_iter=2)
    assert dict(services.calls.loads) == loads


def test_with_a_limit_of_one_the_models_are_swapped_and_it_says_so(tmp_path, caplog):
    services = _services(tmp_path)
    calls = UnetCalls(services)
    try:
        with caplog.at_level(logging.INFO, logger="modules.core.refiner"):
            result = services.generation.txt2img(
                Txt2ImgParams(prompt="a red house", refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5,
                              n_iter=2, **SMALL), override_settings={"sd_model_checkpoint": "base.safetensors"})
        assert len(result.images) == 3  # grid + 2
        assert calls.counts == Counter({"base": 4, "other-sd1": 4})
        # base, refiner, base again for the second batch, refiner again
        assert calls.loads == Counter({"base": 2, "other-sd1": 2})
        assert len(services.models.manager.loaded) == 1
        swaps = [r.getMessage() for r in caplog.records if "sd_checkpoints_limit is 1" in r.getMessage()]
        assert len(swaps) == 3 and "refiner other-sd1" in swaps[0]
    finally:
        services.generation.queue.shutdown()


def test_the_infotext_fields_paste_back_into_params_and_the_api(services):
    text = render(services, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5).infotexts[0]
    parsed = parse_infotext(text)
    params = {t.param: f.parse(raw) for f, t, raw in read_fields(parsed, "txt2img", "param")}
    api = {t.api: f.parse(raw) for f, t, raw in read_fields(parsed, "txt2img", "api")}
    assert params["refiner_switch_at"] == 0.5 and api["refiner_switch_at"] == 0.5
    title = params["refiner_checkpoint"]
    assert services.models.registry.get_closest(title).name == "other-sd1.safetensors"
    assert api["refiner_checkpoint"] == title


# -- through a real server: the API fields, the Refiner script's args, and the 4xx -------------------------
@pytest.fixture(scope="module")
def refiner_server(tmp_path_factory):
    from conftest import start_server

    data_dir = tmp_path_factory.mktemp("refiner-server")
    ckpt_dir = data_dir / "models" / "Stable-diffusion"
    make_checkpoint(ckpt_dir / "base.safetensors", "sd1", seed=1)
    make_checkpoint(ckpt_dir / "other-sd1.safetensors", "sd1", seed=2)
    make_checkpoint(ckpt_dir / "xl-refiner.safetensors", "sdxl-refiner", seed=4)
    srv = start_server(data_dir, "--api")
    yield srv
    srv.stop()


def _txt2img(server, **body):
    import requests

    payload = {"prompt": "a red house", "steps": 4, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
               "override_settings": {"sd_model_checkpoint": "base.safetensors"}, **body}
    return requests.post(server.url + "/sdapi/v1/txt2img", json=payload, timeout=300)


def test_the_api_fields_and_the_refiner_script_args_run_the_refiner(refiner_server):
    direct = _txt2img(refiner_server, refiner_checkpoint="other-sd1", refiner_switch_at=0.5)
    assert direct.status_code == 200, direct.text
    info = json.loads(direct.json()["info"])["infotexts"][0]
    assert "Refiner: other-sd1" in info and "Refiner switch at: 0.5" in info
    scripted = _txt2img(refiner_server, alwayson_scripts={"Refiner": {"args": [True, "other-sd1.safetensors", 0.5]}})
    assert scripted.status_code == 200, scripted.text
    assert json.loads(scripted.json()["info"])["infotexts"][0] == info
    assert scripted.json()["images"][0] == direct.json()["images"][0]


def test_the_api_refuses_an_incompatible_refiner_with_422(refiner_server):
    bad = _txt2img(refiner_server, refiner_checkpoint="xl-refiner.safetensors", refiner_switch_at=0.5)
    assert bad.status_code == 422 and "latent space" in bad.json()["detail"]


def test_img2img_switches_over_the_steps_it_runs(services):
    from PIL import Image

    from modules.core.pipeline import Img2ImgParams

    services.calls.reset()
    params = Img2ImgParams(prompt="a red house", init_images=[Image.new("RGB", (64, 64), (200, 40, 40))],
                           denoising_strength=0.5, refiner_checkpoint="other-sd1.safetensors", refiner_switch_at=0.5,
                           **{**SMALL, "steps": 8})
    result = services.generation.img2img(params, override_settings={"sd_model_checkpoint": "base.safetensors"})
    assert services.calls.counts == Counter({"base": 2, "other-sd1": 2})  # 4 of 8 steps run, half on each
    assert "Refiner: other-sd1" in result.infotexts[0]
