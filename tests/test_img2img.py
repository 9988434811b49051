"""img2img, inpainting, batch, outpainting and the PNG Info round trip, end to end on tiny
real-layout checkpoints through GenerationService (the shared job queue)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_services
from modules.core.img2img_batch import run_batch
from modules.core.infotext import parse_infotext, read_info_from_image
from modules.core.options import Options, default_templates
from outpainting_lib import outpaint, plan_outpaint
from modules.core.pipeline import Img2ImgParams, ProcessingError, Txt2ImgParams

SMALL = dict(width=64, height=64, steps=2, cfg_scale=7.0, prompt="a red fox", negative_prompt="blurry")


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("img2img")
    (data_dir / "styles.csv").write_text(
        "name,prompt,negative_prompt\nPainterly,\"oil painting of {prompt}\",photo\n", encoding="utf-8")
    services = make_services(data_dir, {"tiny-sd1.safetensors": ("sd1", 0),
                                        "tiny-sd1-inpaint.safetensors": ("sd1-inpaint", 0)})
    yield services
    services.generation.queue.shutdown()


def title(svc, stem: str) -> str:
    info = svc.models.registry.get_closest(stem)
    svc.models.registry.calculate_shorthash(info)
    return info.title


def plain(svc) -> dict:
    return {"override_settings": {"sd_model_checkpoint": title(svc, "tiny-sd1")}}


def inpaint_model(svc) -> dict:
    return {"override_settings": {"sd_model_checkpoint": title(svc, "tiny-sd1-inpaint")}}


def picture(w: int = 64, h: int = 64) -> Image.Image:
    """A picture with structure everywhere, so any repaint shows."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.dstack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 8) % 256]).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def square_mask(w: int = 64, h: int = 64, box=(20, 20, 44, 44)) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L")


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("resize_mode", [0, 1, 2, 3])
def test_img2img_runs_in_every_resize_mode_and_saves_into_img2img_images(svc, resize_mode):
    p = Img2ImgParams(**SMALL, init_images=[picture(96, 48)], resize_mode=resize_mode, denoising_strength=0.5,
                      seed=10 + resize_mode)
    result = svc.generation.img2img(p, **plain(svc))
    assert result.images[0].size == (64, 64)
    info = result.infotexts[0]
    assert "Denoising strength: 0.5" in info and f"Seed: {10 + resize_mode}" in info
    assert "Mask blur" not in info  # no mask: no inpainting keys
    saved = Path(result.saved_paths[0])
    assert saved.parent.parent.name == "img2img-images" and saved.exists()
    assert Image.open(saved).info["parameters"] == info


def test_img2img_changes_the_image(svc):
    init = picture()
    changed = svc.generation.img2img(Img2ImgParams(**SMALL, init_images=[init], denoising_strength=0.9, seed=3),
                                     **plain(svc))
    assert not np.array_equal(px(changed.images[0]), px(init))


# --------------------------------------------------------------------------- inpainting


def _inpaint(svc, *, full_res: bool, invert: bool = False, fill: int = 1, model=plain, seed: int = 77, **kw):
    p = Img2ImgParams(**{**SMALL, **kw}, init_images=[picture()], mask=square_mask(), mask_blur=0,
                      inpaint_full_res=full_res, inpaint_full_res_padding=8, inpainting_mask_invert=invert,
                      inpainting_fill=fill, denoising_strength=0.9, seed=seed)
    return svc.generation.img2img(p, **model(svc))


@pytest.mark.parametrize("full_res", [False, True], ids=["whole-picture", "only-masked"])
def test_inpaint_keeps_every_unmasked_pixel_and_its_inverse_is_the_mirror(svc, full_res):
    init = px(picture())
    masked = np.asarray(square_mask()) > 0
    normal = _inpaint(svc, full_res=full_res)
    out = px(normal.images[0])
    assert out.shape == init.shape
    assert np.array_equal(out[~masked], init[~masked]), "an unmasked pixel changed"
    assert (out[masked] != init[masked]).any(), "the masked area was not repainted"

    inverted = px(_inpaint(svc, full_res=full_res, invert=True).images[0])
    assert np.array_equal(inverted[masked], init[masked]), "inverted: a pixel under the mask changed"
    assert (inverted[~masked] != init[~masked]).any(), "inverted: the outside was not repainted"

    info = normal.infotexts[0]
    for key in ("Denoising strength: 0.9", "Mask blur: 0", "Mask mode: Inpaint masked", "Masked content: original",
                f"Inpaint area: {'Only masked' if full_res else 'Whole picture'}"):
        assert key in info, key
    assert ("Masked area padding: 8" in info) == full_res
    assert Path(normal.saved_paths[0]).parent.parent.name == "img2img-images"


@pytest.mark.parametrize("fill", [0, 2, 3], ids=["fill", "latent-noise", "latent-nothing"])
def test_inpainting_model_with_9_channel_unet(svc, fill):
    init = px(picture())
    masked = np.asarray(square_mask()) > 0
    result = _inpaint(svc, full_res=False, fill=fill, model=inpaint_model)
    assert result.is_using_inpainting_conditioning
    assert "Model: tiny-sd1-inpaint" in result.infotexts[0]
    out = px(result.images[0])
    assert np.array_equal(out[~masked], init[~masked])
    assert (out[masked] != init[masked]).any()


def test_ui_modes_build_the_right_image_and_mask(svc):
    """The sub-tabs' editor values -> (init, mask), then a real job for each inpaint mode."""
    from modules.ui.img2img_tab import images_for_mode

    base = picture()
    strokes = np.zeros((64, 64, 4), dtype=np.uint8)
    strokes[20:44, 20:44] = (255, 0, 0, 255)          # a red square drawn on the brush layer
    strokes[30, 50] = (0, 0, 255, 1)                   # one almost transparent pixel: still masked
    layer = Image.fromarray(strokes, "RGBA")
    composite = base.copy()
    composite.paste(Image.new("RGB", (24, 24), (255, 0, 0)), (20, 20))
    editor = {"background": base.convert("RGBA"), "layers": [layer], "composite": composite.convert("RGBA")}

    init, mask = images_for_mode(2, inpaint=editor)
    assert np.array_equal(px(init), px(base))
    m = np.asarray(mask) > 0
    assert m[20:44, 20:44].all() and m[30, 50] and m.sum() == 24 * 24 + 1

    init, mask = images_for_mode(3, inpaint_sketch=editor)      # inpaint sketch: the composite is the image
    assert np.array_equal(px(init), px(composite)) and (np.asarray(mask) > 0).sum() == 24 * 24 + 1
    init, mask = images_for_mode(1, sketch=editor)              # sketch: composite, no mask
    assert mask is None and np.array_equal(px(init), px(composite))
    init, mask = images_for_mode(4, upload_img=base, upload_mask=square_mask().convert("RGB"))
    assert mask is not None
    with pytest.raises(ProcessingError):
        images_for_mode(4, upload_img=base)
    with pytest.raises(ProcessingError):
        images_for_mode(0)

    for mode, value in ((3, {"inpaint_sketch": editor}), (4, {"upload_img": base, "upload_mask": square_mask()})):
        init, mask = images_for_mode(mode, **value)
        masked = np.asarray(mask.convert("L")) > 0
        p = Img2ImgParams(**SMALL, init_images=[init], mask=mask, mask_blur=0, denoising_strength=0.8, seed=5)
        out = px(svc.generation.img2img(p, **plain(svc)).images[0])
        assert np.array_equal(out[~masked], px(init)[~masked]), mode


def test_resize_by_rounds_to_multiples_of_8():
    from modules.ui.img2img_tab import scaled_size

    assert scaled_size(picture(100, 60), 1.5) == (152, 88)
    assert scaled_size(picture(64, 64), 0.5) == (64, 64)


# --------------------------------------------------------------------------- batch


def test_batch_processes_every_image_and_skips_other_files(svc, tmp_path):
    src, out, masks = tmp_path / "in", tmp_path / "out", tmp_path / "masks"
    for d in (src, out, masks):
        d.mkdir()
    picture().save(src / "b.png")
    picture(80, 64).convert("L").save(src / "a.jpg")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    base = Img2ImgParams(**SMALL, init_images=[], denoising_strength=0.5, seed=11)
    result = run_batch(svc.generation, base, src, out, submit_kwargs=plain(svc))
    assert result.processed == ["a.jpg", "b.png"]
    assert result.skipped == ["broken.png", "notes.txt"] and not result.errors
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert "notes.txt" in result.summary() and "Processed 2 of 2" in result.summary()
    text, _ = read_info_from_image(Image.open(out / "a.png"))
    assert "Denoising strength: 0.5" in text and "Seed: 11" in text

    # Inpaint batch: a folder with one mask uses it for every image; mask keys reach the infotext.
    square_mask().save(masks / "only.png")
    result = run_batch(svc.generation, base, src, out, masks, submit_kwargs=plain(svc))
    assert result.processed == ["a.jpg", "b.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a-1.png", "a.png", "b-1.png", "b.png"]  # never overwritten
    assert "Mask blur: 4" in Image.open(out / "b-1.png").info["parameters"]

    with pytest.raises(ProcessingError):
        run_batch(svc.generation, base, tmp_path / "missing", out)


def test_batch_png_info_and_per_file_errors_and_no_output_dir(svc, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text("parameters", "a castle\nNegative prompt: fog\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 1234, "
                                 "Size: 64x64")
    picture().save(src / "1.png", pnginfo=chunk)
    picture().save(src / "2.png")
    base = Img2ImgParams(**SMALL, init_images=[], denoising_strength=0.5, seed=9)
    result = run_batch(svc.generation, base, src, None, use_png_info=True, submit_kwargs=plain(svc))
    assert result.processed == ["1.png", "2.png"]
    first = Image.open(result.outputs[0]).info["parameters"]
    assert first.startswith("a red fox a castle\nNegative prompt: blurry fog\n")
    assert "Steps: 3" in first and "Sampler: Euler," in first and "Seed: 1234" in first and "CFG scale: 5" in first
    assert "Seed: 9" in Image.open(result.outputs[1]).info["parameters"]   # no PNG info: the UI's values
    assert all(Path(p).parent.parent.name == "img2img-images" for p in result.outputs)

    # One failing file does not stop the others.
    real = svc.generation.img2img
    calls = []

    def flaky(p, **kw):
        calls.append(p)
        if len(calls) == 1:
            raise ProcessingError("boom")
        return real(p, **kw)
    monkeypatch.setattr(svc.generation, "img2img", flaky)
    result = run_batch(svc.generation, base, src, tmp_path / "out", submit_kwargs=plain(svc))
    assert result.errors == {"1.png": "boom"} and result.processed == ["2.png"]
    assert "Error in 1.png: boom" in result.summary()


def test_batch_stops_when_interrupted(svc, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        picture().save(src / f"{i}.png")
    base = Img2ImgParams(**SMALL, init_images=[], denoising_strength=0.5, seed=1)
    seen = []
    result = run_batch(svc.generation, base, src, tmp_path / "out", submit_kwargs=plain(svc),
                       on_file=lambda i, n, name: seen.append(name), should_stop=lambda: len(seen) >= 1)
    assert result.interrupted and result.processed == ["0.png"]


# --------------------------------------------------------------------------- outpainting


def test_outpainting_grows_the_picture_and_keeps_the_original(svc):
    init = picture()
    base = Img2ImgParams(**SMALL, init_images=[init], denoising_strength=0.9, seed=21)
    result = outpaint(svc.generation, base, pixels=16, directions=["left", "up"], mask_blur=0, inpainting_fill=0,
                      **plain(svc))
    out = px(result.images[0])
    assert result.images[0].size == (80, 80)
    assert np.array_equal(out[16:, 16:], px(init)), "the original area changed"
    assert (out[:16, :] != out[16, :][None]).any(), "the new rows were not painted"
    assert "Seed: 21" in result.infotexts[0] and "Size: 80x80" in result.infotexts[0]

    plan = plan_outpaint(picture(60, 64), pixels=10, directions=["right"], mask_blur=4)
    assert plan.size == (72, 64) and plan.right == 12   # rounded up to a multiple of 8 on the grown side
    assert np.asarray(plan.mask)[:, :52].max() == 0 and np.asarray(plan.mask)[:, 52:].min() == 255  # 2*blur overlap
    with pytest.raises(ProcessingError):
        plan_outpaint(init, pixels=8, directions=[])


# --------------------------------------------------------------------------- PNG Info round trip


def test_png_info_round_trip_to_the_img2img_fields(svc):
    from modules.ui import paste
    from modules.ui.img2img_tab import Img2ImgControls

    p = Img2ImgParams(**{**SMALL, "prompt": "a (castle:1.2), at night", "negative_prompt": "fog, rain"},
                      init_images=[picture()], mask=square_mask(), mask_blur=2, inpaint_full_res=True,
                      inpaint_full_res_padding=12, inpainting_mask_invert=True, inpainting_fill=0,
                      denoising_strength=0.66, seed=4242, subseed=99, subseed_strength=0.25,
                      sampler_name="Euler a", scheduler="Karras")
    result = svc.generation.img2img(p, **plain(svc))
    text, _ = read_info_from_image(Image.open(result.saved_paths[0]))
    assert text == result.infotexts[0]
    parsed = paste.parse_for_paste(text, styles=svc.styles)
    values = paste.values_from_infotext(parsed, "img2img")
    ui_defaults = dict(prompt="", negative_prompt="", sampler_name="DPM++ 2M", scheduler="Automatic", steps=20,
                       resize_mode="Just resize", width=512, height=512, scale_by=1, batch_count=1, batch_size=1,
                       cfg_scale=7, denoising_strength=0.75, seed=-1, subseed=-1, subseed_strength=0,
                       seed_resize_from_w=0, seed_resize_from_h=0, tiling=False, mask_blur=4,
                       mask_mode="Inpaint masked", inpainting_fill="original", inpaint_full_res="Whole picture",
                       inpaint_full_res_padding=32)
    pasted = Img2ImgControls.to_params({**ui_defaults, **values})
    for name in ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width",
                 "height", "subseed", "subseed_strength", "denoising_strength", "mask_blur",
                 "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding"):
        assert getattr(pasted, name) == getattr(p, name), name
    assert paste.checkpoint_for(parsed, svc.models.registry) == title(svc, "tiny-sd1")


def test_png_info_round_trip_to_the_txt2img_fields_with_styles(svc):
    from modules.core.styles import apply_styles_to_params
    from modules.ui import paste

    p = Txt2ImgParams(**SMALL, seed=5, subseed=6, subseed_strength=0.5, seed_resize_from_w=128,
                      seed_resize_from_h=96)
    apply_styles_to_params(p, svc.styles, ["Painterly"])
    result = svc.generation.txt2img(p, **plain(svc))
    text, _ = read_info_from_image(Image.open(result.saved_paths[0]))
    assert text.startswith("oil painting of a red fox\nNegative prompt: blurry, photo\n")
    parsed = paste.parse_for_paste(text, styles=svc.styles)
    values = paste.values_from_infotext(parsed, "txt2img")
    assert values["styles"] == ["Painterly"]
    assert values["prompt"] == "a red fox" and values["negative_prompt"] == "blurry"
    expected = dict(steps=2, seed=5, subseed=6, subseed_strength=0.5, seed_resize_from_w=128, seed_resize_from_h=96,
                    width=64, height=64, cfg_scale=7.0, hires_enabled=False, tiling=False)
    assert {k: values[k] for k in expected} == expected
    assert "denoising_strength" not in values  # an img2img-only field


def test_paste_table_maps_hires_and_clip_skip():
    from modules.ui import paste

    text = ("a cat\nSteps: 12, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 7, Size: 512x768, Model hash: 0123456789, "
            "Denoising strength: 0.4, Clip skip: 2, Hires upscale: 1.5, Hires steps: 5, Hires upscaler: Latent, "
            "Version: v1.10.1")
    parsed = paste.parse_for_paste(text)
    values = paste.values_from_infotext(parsed, "txt2img")
    assert values["sampler_name"] == "DPM++ 2M" and values["scheduler"] == "Karras"
    assert (values["width"], values["height"]) == (512, 768)
    assert values["hires_enabled"] is True and values["hires_scale"] == 1.5 and values["hires_steps"] == 5
    assert values["hires_denoising"] == 0.4 and values["hires_upscaler"] == "Latent"
    options = Options(None, default_templates())
    assert paste.override_choices(parsed, options) == ["Clip skip: 2"]
    assert paste.overrides_from_choices(["Clip skip: 2"], options) == {"CLIP_stop_at_last_layers": 2}
    # An img2img paste of the same text: the denoising strength is the img2img one.
    assert paste.values_from_infotext(parsed, "img2img")["denoising_strength"] == 0.4
    assert "hires_enabled" not in paste.values_from_infotext(parsed, "img2img")
    assert parse_infotext(text)["Prompt"] == "a cat"
