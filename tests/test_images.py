"""Saving images: A1111 naming, metadata, atomicity, folders and grids."""
from __future__ import annotations

import argparse
import datetime as dt
import threading
from pathlib import Path

import pytest
from PIL import Image

from modules.core import saving as images
from modules.core.saving import OMIT, apply_filename_pattern, image_grid, next_sequence_number, save_image

NOW = dt.datetime(2026, 11, 22, 13, 45, 7)


def img(w: int = 16, h: int = 16, color=(200, 30, 40), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), color if mode == "RGB" else color + (128,))


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------- numbering

def test_first_image_starts_at_zero_and_has_seed(tmp_path):
    saved = save_image(img(), tmp_path, seed=1234)
    assert saved.path == tmp_path / "00000-1234.png"
    assert saved.txt_path is None


def test_numbering_continues_after_highest_and_ignores_other_names(tmp_path):
    for name in ("00003-1.png", "00041-99.jpg", "notes.txt", "abc-00077.png", "12abc.png",
                 "grid-0100.png", ".00500-1.png.tmp"):
        (tmp_path / name).write_bytes(b"x")
    saved = save_image(img(), tmp_path, seed=7)
    assert saved.path.name == "00042-7.png"
    assert next_sequence_number(tmp_path) == 43
    assert next_sequence_number(tmp_path / "missing") == 0


def test_grid_naming_uses_its_own_sequence(tmp_path):
    (tmp_path / "00009-5.png").write_bytes(b"x")
    first = save_image(img(), tmp_path, seed=5, grid=True)
    second = save_image(img(), tmp_path, seed=5, grid=True)
    assert (first.path.name, second.path.name) == ("grid-0000.png", "grid-0001.png")


def test_no_seed_gives_number_only(tmp_path):
    assert save_image(img(), tmp_path, seed=None).path.name == "00000.png"
    assert save_image(img(), tmp_path, seed=None, basename="upscaled").path.name == "upscaled-0000.png"


def test_add_number_false_never_overwrites(tmp_path):
    a = save_image(img(), tmp_path, seed=3, pattern="[seed]-x", add_number=False)
    b = save_image(img(), tmp_path, seed=3, pattern="[seed]-x", add_number=False)
    assert a.path.name == "3-x.png"
    assert b.path.name == "3-x-1.png"
    assert a.path.read_bytes() and b.path.read_bytes()


def test_concurrent_saves_get_distinct_files_and_leave_no_temp(tmp_path):
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results.append(save_image(img(color=(i * 20, 0, 0)), tmp_path, seed=100 + i, info=f"seed {i}").path)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 8
    numbers = sorted(int(p.name.split("-")[0]) for p in results)
    assert numbers == list(range(8))
    assert names(tmp_path) == sorted(p.name for p in results)  # nothing else: no temp files
    for p in results:
        with Image.open(p) as im:
            im.load()
            assert im.text["parameters"].startswith("seed ")


def test_failed_encode_leaves_nothing(tmp_path):
    def boom(params):
        raise RuntimeError("extension failed")

    with pytest.raises(RuntimeError):
        save_image(img(), tmp_path, seed=1, before_save=boom)
    assert names(tmp_path) == []


# ----------------------------------------------------------------- metadata

def _read_png_chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    pos, kinds = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return kinds


def test_png_latin1_info_is_text_chunk(tmp_path):
    info = "a café, (red:1.2)\nNegative prompt: blur\nSteps: 20, Seed: 1"
    saved = save_image(img(), tmp_path, seed=1, info=info)
    with Image.open(saved.path) as im:
        im.load()
        assert im.text["parameters"] == info
    assert b"tEXt" in _read_png_chunks(saved.path)
    assert b"iTXt" not in _read_png_chunks(saved.path)


def test_png_non_latin1_info_is_itxt(tmp_path):
    info = "猫と犬 ✓ émoji 🙂\nSteps: 20, Seed: 2"
    saved = save_image(img(), tmp_path, seed=2, info=info)
    with Image.open(saved.path) as im:
        im.load()
        assert im.text["parameters"] == info
    assert b"iTXt" in _read_png_chunks(saved.path)


def test_png_without_info_or_embedding_has_no_chunk(tmp_path):
    a = save_image(img(), tmp_path, seed=1, info=None)
    b = save_image(img(), tmp_path, seed=1, info="x", embed_info=False)
    for p in (a.path, b.path):
        with Image.open(p) as im:
            im.load()
            assert "parameters" not in im.text


def _user_comment(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.getexif().get_ifd(0x8769).get(0x9286)


@pytest.mark.parametrize("ext,fmt", [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_webp_carry_exif_user_comment(tmp_path, ext, fmt):
    from modules.core.infotext import encode_user_comment, read_info_from_image

    info = "a cat 猫\nSteps: 20, Seed: 9"
    saved = save_image(img(mode="RGBA"), tmp_path, seed=9, info=info, extension=ext, jpeg_quality=90)
    assert saved.path.name == f"00000-9.{ext}"
    assert _user_comment(saved.path) == encode_user_comment(info)
    with Image.open(saved.path) as im:
        assert im.format == fmt
        assert im.mode == "RGB"  # alpha dropped, as A1111 does
        text, _items = read_info_from_image(im)
    assert text == info


def test_jpeg_without_info_has_no_comment(tmp_path):
    saved = save_image(img(), tmp_path, seed=9, info=None, extension="jpg")
    assert _user_comment(saved.path) is None


def test_webp_lossless_round_trips_pixels(tmp_path):
    src = img(color=(1, 2, 3))
    saved = save_image(src, tmp_path, seed=1, extension="webp", webp_lossless=True)
    with Image.open(saved.path) as im:
        assert im.convert("RGB").getpixel((3, 3)) == (1, 2, 3)


def test_save_txt_writes_sidecar(tmp_path):
    info = "prompt ✓\nSteps: 5"
    saved = save_image(img(), tmp_path, seed=4, info=info, save_txt=True)
    assert saved.txt_path == tmp_path / "00000-4.txt"
    assert saved.txt_path.read_text(encoding="utf-8") == info + "\n"
    # No info: no sidecar, even when asked.
    assert save_image(img(), tmp_path, seed=4, save_txt=True).txt_path is None


def test_before_and_after_save_callbacks(tmp_path):
    seen = {}

    def before(params):
        params.image = img(color=(0, 255, 0))
        params.pnginfo["parameters"] = params.pnginfo["parameters"] + ", Extra: 1"
        params.pnginfo["custom"] = "yes"

    def after(params):
        seen["filename"] = params.filename

    saved = save_image(img(), tmp_path, seed=1, info="p", before_save=before, after_save=after)
    assert seen["filename"] == str(saved.path)
    with Image.open(saved.path) as im:
        im.load()
        assert im.text == {"parameters": "p, Extra: 1", "custom": "yes"}
        assert im.convert("RGB").getpixel((0, 0)) == (0, 255, 0)


# ----------------------------------------------------------------- patterns

def test_pattern_tags():
    image = img(24, 40)
    values = {"steps": 20, "cfg": 7.5, "sampler": "DPM++ 2M", "model_name": "sub/dir:model",
              "model_hash": "6ce0161689", "job_timestamp": "20261122134507"}
    out = apply_filename_pattern(
        "[seed]-[steps]-[cfg]-[width]x[height]-[sampler]-[model_name]-[model_hash]-[date]-[datetime]-[job_timestamp]",
        seed=42, prompt="a cat", image=image, values=values, now=NOW)
    assert out == "42-20-7.5-24x40-DPM++ 2M-sub_dir_model-6ce0161689-2026-11-22-20261122134507-20261122134507"


def test_prompt_tags_and_unknown_tags():
    prompt = 'a (cat:1.2), "sitting" on/a mat?  by <artist> ' + "word " * 40
    assert apply_filename_pattern("[prompt_words]", prompt=prompt) == "a cat 1 2 sitting on a mat"
    assert apply_filename_pattern("[prompt_words]", prompt="") == "empty"
    spaces = apply_filename_pattern("[prompt_spaces]", prompt=prompt)
    under = apply_filename_pattern("[prompt]", prompt=prompt)
    assert len(spaces) <= 128 and len(under) <= 128
    assert not any(c in spaces for c in '/\\:*?"<>|')
    assert " " not in under and under.startswith("a_(cat_1.2),__sitting_")
    assert apply_filename_pattern("x-[unknown_tag]-[steps]", seed=1) == "x-[unknown_tag]-[steps]"
    assert apply_filename_pattern("[SEED]", seed=5) == "5"
    assert apply_filename_pattern("[datetime<%Y_%m>]", now=NOW) == "2026_11"
    assert apply_filename_pattern("[prompt_hash<4>]", prompt="a") == "ca97"


def test_omit_drops_tag_and_preceding_text():
    assert apply_filename_pattern("[seed]-[batch_number]", seed=3, values={"batch_number": OMIT}) == "3"
    assert apply_filename_pattern("[seed]-[batch_number]", seed=3, values={"batch_number": 2}) == "3-2"


def test_pattern_in_save_is_sanitised(tmp_path):
    saved = save_image(img(), tmp_path, seed=11, prompt="a/b\\c: d*e?\x01", pattern="[seed]-[prompt_spaces]-lit/eral")
    assert saved.path.parent == tmp_path
    assert saved.path.name == "00000-11-a_b_c_ d_e__-lit_eral.png"


def test_very_long_name_fits_filesystem(tmp_path):
    prompt = "ü" * 400
    values = {"steps": "x" * 300}
    saved = save_image(img(), tmp_path, seed=1, prompt=prompt, pattern="[prompt]-[prompt_spaces]-[steps]",
                       pattern_values=values)
    assert len(saved.path.name.encode("utf-8")) <= images.MAX_NAME_BYTES
    assert saved.path.exists()


# ----------------------------------------------------------------- folders

def _paths(tmp_path: Path):
    from modules.core.paths import AppPaths

    ns = argparse.Namespace(data_dir=str(tmp_path), models_dir=None, ckpt_dir=None, vae_dir=None, lora_dir=None,
                            embeddings_dir=None, hypernetwork_dir=None, ui_settings_file=None, styles_file=None)
    return AppPaths.from_opts(ns, install_dir=tmp_path)


def test_output_dirs_defaults_and_overrides(tmp_path):
    from modules.core.options import Options, default_templates

    paths = _paths(tmp_path)
    opts = Options(None, default_templates())
    out = paths.outputs_dir
    assert images.output_dirs(paths, opts, "txt2img", now=NOW) == (
        out / "txt2img-images" / "2026-11-22", out / "txt2img-grids" / "2026-11-22")
    assert images.output_dirs(paths, opts, "img2img", dated=False) == (out / "img2img-images", out / "img2img-grids")
    assert images.output_dirs(paths, opts, "extras", now=NOW) == (out / "extras-images", None)

    opts.set("outdir_txt2img_samples", "mine")
    opts.set("outdir_txt2img_grids", str(tmp_path / "abs-grids"))
    assert images.output_dirs(paths, opts, "txt2img", dated=False) == (tmp_path / "mine", tmp_path / "abs-grids")
    opts.set("outdir_samples", "all")
    for kind in ("txt2img", "img2img", "extras"):
        assert images.output_dirs(paths, opts, kind, dated=False)[0] == tmp_path / "all"
    with pytest.raises(ValueError):
        images.output_dirs(paths, opts, "video")  # type: ignore[arg-type]


def test_a1111_layout_end_to_end(tmp_path):
    from modules.core.options import Options, default_templates

    paths = _paths(tmp_path)
    opts = Options(None, default_templates())
    img_dir, grid_dir = images.output_dirs(paths, opts, "txt2img", now=NOW)
    a = save_image(img(), img_dir, seed=1234)
    g = save_image(image_grid([img(), img()]), grid_dir, seed=1234, grid=True)
    e = save_image(img(), images.output_dirs(paths, opts, "extras")[0], seed=None)
    rel = lambda p: p.relative_to(tmp_path).as_posix()  # noqa: E731
    assert rel(a.path) == "outputs/txt2img-images/2026-11-22/00000-1234.png"
    assert rel(g.path) == "outputs/txt2img-grids/2026-11-22/grid-0000.png"
    assert rel(e.path) == "outputs/extras-images/00000.png"


def test_date_dir(tmp_path):
    assert images.date_dir(tmp_path, NOW) == tmp_path / "2026-11-22"


# ----------------------------------------------------------------- grids

@pytest.mark.parametrize("n,rows,cols", [(1, 1, 1), (2, 1, 2), (3, 2, 2), (4, 2, 2), (6, 2, 3), (9, 3, 3)])
def test_grid_auto_layout(n, rows, cols):
    grid = image_grid([img(10, 20) for _ in range(n)])
    assert grid.size == (cols * 10, rows * 20)


@pytest.mark.parametrize("n,rows,expect", [(1, 3, (1, 1)), (2, 2, (2, 1)), (3, 1, (1, 3)), (4, 1, (1, 4)),
                                          (6, 3, (3, 2)), (9, 2, (2, 5)), (6, -1, (2, 3))])
def test_grid_explicit_rows(n, rows, expect):
    r, c = expect
    assert image_grid([img(10, 20) for _ in range(n)], rows=rows).size == (c * 10, r * 20)


def test_grid_rows_zero_uses_batch_size_and_prevent_empty_spots():
    assert image_grid([img(8, 8)] * 6, rows=0, batch_size=3).size == (16, 24)
    # default rows ignore batch_size (A1111's n_rows=-1)
    assert image_grid([img(8, 8)] * 6, batch_size=3).size == (24, 16)
    # 8 images: round(sqrt 8)=3 rows leaves a hole; prevent_empty_spots picks 2 rows
    assert image_grid([img(8, 8)] * 8, prevent_empty_spots=True).size == (32, 16)


def test_grid_pixels_and_background():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = image_grid([img(4, 4, c) for c in colors], background="black")
    assert grid.getpixel((1, 1)) == colors[0]
    assert grid.getpixel((5, 1)) == colors[1]
    assert grid.getpixel((1, 5)) == colors[2]
    assert grid.getpixel((5, 5)) == (0, 0, 0)  # empty spot
    assert image_grid([img(4, 4)] * 3).getpixel((5, 5)) == (255, 255, 255)  # A1111 default colour
    with pytest.raises(ValueError):
        image_grid([])


def test_grid_mixed_sizes_are_centred():
    grid = image_grid([img(8, 8, (255, 0, 0)), img(4, 4, (0, 255, 0))], background="black")
    assert grid.size == (16, 8)
    assert grid.getpixel((8 + 2, 2)) == (0, 255, 0)
    assert grid.getpixel((8, 0)) == (0, 0, 0)
