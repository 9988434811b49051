"""Building, parsing and embedding A1111 infotexts."""

import io
import json
import struct

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from modules.core.infotext import (
    INFOTEXT_KEY_ORDER,
    build_infotext,
    decode_user_comment,
    encode_user_comment,
    exif_user_comment_bytes,
    format_generation_params,
    make_pnginfo,
    parse_generation_parameters,
    parse_infotext,
    quote,
    read_info_from_image,
    split_legacy_sampler_name,
    unquote,
)

BASIC = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7,
    "Seed": 1234567890,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Version": "v1.10.1",
}


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------


class TestBuild:
    def test_documented_example_line(self):
        text = build_infotext("a lighthouse", "", BASIC)
        assert text == (
            "a lighthouse\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
            "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
        )

    def test_negative_prompt_line(self):
        text = build_infotext("cat", "blurry, lowres", {"Steps": 4, "Seed": 1, "Size": "64x64"})
        assert text.split("\n") == ["cat", "Negative prompt: blurry, lowres", "Steps: 4, Seed: 1, Size: 64x64"]

    def test_empty_negative_prompt_is_omitted(self):
        assert "Negative prompt" not in build_infotext("cat", "", {"Steps": 4})

    def test_known_keys_are_ordered_and_version_is_last(self):
        params = {"Version": "v1", "Lora hashes": "x: 1", "Tiling": "True", "Seed": 3, "Hires upscale": 2,
                  "Steps": 5, "Clip skip": 2, "RNG": "CPU", "Size": "8x8", "Sampler": "Euler"}
        line = format_generation_params(params)
        keys = [part.split(":")[0] for part in line.split(", ") if ":" in part]
        assert keys == ["Steps", "Sampler", "Seed", "Size", "Clip skip", "RNG", "Tiling", "Lora hashes",
                        "Hires upscale", "Version"]

    def test_full_known_order(self):
        params = {key: "v" for key in reversed(INFOTEXT_KEY_ORDER)}
        line = format_generation_params(params)
        assert [part.split(": ")[0] for part in line.split(", ")] == list(INFOTEXT_KEY_ORDER)

    def test_extra_keys_keep_insertion_order(self):
        line = format_generation_params({"Z extra": 1, "A extra": 2, "Steps": 3})
        assert line == "Steps: 3, Z extra: 1, A extra: 2"

    def test_none_values_are_omitted(self):
        line = format_generation_params({"Steps": 20, "Clip skip": None, "Denoising strength": None, "Seed": 0})
        assert line == "Steps: 20, Seed: 0"

    @pytest.mark.parametrize(
        "value, written",
        [
            ("plain words", "plain words"),
            ("a, b", '"a, b"'),
            ("key: value", '"key: value"'),
            ("two\nlines", '"two\\nlines"'),
            ('say "hi"', '"say \\"hi\\""'),
            ("ünïcode, ✓", '"ünïcode, ✓"'),  # ensure_ascii=False
            (7.5, "7.5"),
            (True, "True"),
        ],
    )
    def test_quoting(self, value, written):
        assert quote(value) == written
        assert unquote(written) == str(value)

    def test_flag_equal_to_its_key_is_written_bare(self):
        assert format_generation_params({"Steps": 1, "ADetailer": "ADetailer"}) == "Steps: 1, ADetailer"

    def test_prompt_is_not_quoted(self):
        assert build_infotext("a, b: c", "", {"Steps": 1}).startswith("a, b: c\n")


# ---------------------------------------------------------------------------
# parse
# ---------------------------------------------------------------------------


class TestParse:
    def test_basic_fields_stay_strings(self):
        res = parse_infotext(build_infotext("a lighthouse", "fog", BASIC))
        assert res["Prompt"] == "a lighthouse"
        assert res["Negative prompt"] == "fog"
        assert res["Steps"] == "20"
        assert res["CFG scale"] == "7"
        assert res["Seed"] == "1234567890"
        assert res["Sampler"] == "DPM++ 2M"
        assert res["Schedule type"] == "Karras"
        assert res["Version"] == "v1.10.1"

    def test_size_is_split(self):
        res = parse_infotext(build_infotext("x", "", BASIC))
        assert (res["Size-1"], res["Size-2"]) == ("512", "768")
        assert res["Size"] == "512x768"  # kept too, unlike A1111

    def test_other_sizes_are_split(self):
        res = parse_infotext("x\nSteps: 1, Seed resize from: 640x480, Hires resize: 1024x768, Seed: 2")
        assert (res["Seed resize from-1"], res["Seed resize from-2"]) == ("640", "480")
        assert (res["Hires resize-1"], res["Hires resize-2"]) == ("1024", "768")

    def test_round_trip_of_awkward_values(self):
        params = {
            **BASIC,
            "Lora hashes": "armor: 0123abcd, cape: 4567ef01",
            "Hires prompt": 'a "quoted", multi\nline: prompt',
            "Wildcard": "ünïcode ✓ 日本語",
            "Script": "X/Y/Z plot",
            "Denoising strength": 0.45,
        }
        prompt = "castle on a hill, (masterpiece:1.2)\nsecond line: with colon"
        negative = "blurry, ünïcode\nlowres"
        res = parse_infotext(build_infotext(prompt, negative, params))
        assert res["Prompt"] == prompt
        assert res["Negative prompt"] == negative
        for key, value in params.items():
            assert res[key] == str(value), key

    def test_last_line_needs_three_pairs_to_be_parameters(self):
        res = parse_infotext("a cat\nstyle: watercolor, mood: calm")
        assert res["Prompt"] == "a cat\nstyle: watercolor, mood: calm"
        assert "style" not in res

    def test_prompt_only(self):
        res = parse_infotext("just words\n")
        assert res["Prompt"] == "just words" and res["Negative prompt"] == ""

    def test_negative_prompt_spans_lines(self):
        res = parse_infotext("p1\np2\nNegative prompt: n1\nn2\nSteps: 1, Seed: 2, Size: 8x8")
        assert res["Prompt"] == "p1\np2"
        assert res["Negative prompt"] == "n1\nn2"

    def test_empty_prompt_with_negative(self):
        text = build_infotext("", "bad", {"Steps": 1, "Seed": 2, "Size": "8x8"})
        res = parse_infotext(text)
        assert res["Prompt"] == "" and res["Negative prompt"] == "bad"

    def test_defaults_for_old_infotexts(self):
        res = parse_infotext("x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
        assert res["Clip skip"] == "1"
        assert res["Hires resize-1"] == 0 and res["Hires resize-2"] == 0
        assert res["Hires sampler"] == "Use same sampler"
        assert res["Hires checkpoint"] == "Use same checkpoint"
        assert res["Hires prompt"] == "" and res["Hires negative prompt"] == ""
        assert res["RNG"] == "GPU"
        assert res["Schedule type"] == "Automatic"
        assert res["Schedule max sigma"] == 0 and res["Schedule min sigma"] == 0 and res["Schedule rho"] == 0
        assert res["Mask mode"] == "Inpaint masked"
        assert res["Masked content"] == "original"
        assert res["Inpaint area"] == "Whole picture"
        assert res["Masked area padding"] == 32
        assert res["VAE Encoder"] == "Full" and res["VAE Decoder"] == "Full"
        assert res["FP8 weight"] == "Disable"
        assert "Cache FP16 weight for LoRA" not in res

    def test_present_values_are_not_overridden(self):
        res = parse_infotext("x\nSteps: 2, Clip skip: 2, RNG: CPU, Schedule type: Exponential")
        assert (res["Clip skip"], res["RNG"], res["Schedule type"]) == ("2", "CPU", "Exponential")

    def test_fp8_adds_cache_flag(self):
        res = parse_infotext("x\nSteps: 2, Seed: 1, FP8 weight: Enable for SDXL")
        assert res["Cache FP16 weight for LoRA"] is False

    @pytest.mark.parametrize(
        "written, sampler, schedule",
        [
            ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
            ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
            ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
            ("DPM2 a Karras", "DPM2 a", "Karras"),
            ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
            ("Euler SGM Uniform", "Euler", "SGM Uniform"),
            ("Euler a", "Euler a", "Automatic"),
            ("DDIM", "DDIM", "Automatic"),
            ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", "Automatic"),
        ],
    )
    def test_legacy_sampler_names(self, written, sampler, schedule):
        res = parse_infotext(f"x\nSteps: 20, Sampler: {written}, CFG scale: 7, Seed: 1")
        assert (res["Sampler"], res["Schedule type"]) == (sampler, schedule)

    def test_legacy_hires_sampler_name(self):
        res = parse_infotext("x\nSteps: 20, Sampler: Euler, Hires sampler: DPM++ 2M Karras, Seed: 1")
        assert res["Hires sampler"] == "DPM++ 2M"
        assert res["Hires schedule type"] == "Karras"

    def test_split_helper(self):
        assert split_legacy_sampler_name("LMS Karras") == ("LMS", "Karras")
        assert split_legacy_sampler_name("Karras") == ("Karras", None)
        assert split_legacy_sampler_name("UniPC") == ("UniPC", None)

    def test_hypernet_goes_back_into_prompt(self):
        res = parse_infotext("a cat\nSteps: 20, Hypernet: anime, Hypernet strength: 0.5, Seed: 1")
        assert res["Prompt"] == "a cat<hypernet:anime:0.5>"

    def test_old_hires_fix_first_pass(self):
        res = parse_infotext("x\nSteps: 20, Seed: 1, Size: 1024x1024, First pass size: 512x512")
        assert (res["Size-1"], res["Size-2"]) == (512, 512)
        assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 1024)
        res = parse_infotext("x\nSteps: 20, Seed: 1, Size: 1024x768, First pass size: 0x0")
        # automatic first pass: about 512*512 pixels, rounded up to multiples of 64
        assert (res["Size-1"], res["Size-2"]) == (640, 448)

    def test_version_backcompat_flags(self):
        old = parse_infotext("[a:b:3]\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.5.1")
        assert old["Old prompt editing timelines"] is True
        assert old["Pad conds v0"] is True
        assert old["Downcast alphas_cumprod"] is True
        dev = parse_infotext("x\nSteps: 20, Seed: 1, Version: v1.7.0-225-g1234abc")
        assert "Downcast alphas_cumprod" not in dev
        new = parse_infotext("[a:b:3]\nSteps: 20, Sampler: DDIM, Seed: 1, Version: v1.10.1")
        assert not {"Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"} & set(new)
        off = parse_infotext("x\nSteps: 20, Seed: 1, Version: v1.5.1", backcompat=False)
        assert "Downcast alphas_cumprod" not in off

    def test_skip_removes_keys(self):
        res = parse_infotext(build_infotext("x", "", BASIC), skip=["Seed", "Version"])
        assert "Seed" not in res and "Version" not in res and res["Steps"] == "20"

    def test_a1111_name_alias(self):
        assert parse_generation_parameters is parse_infotext

    def test_malformed_quote_is_kept(self):
        res = parse_infotext('x\nSteps: 1, Seed: 2, Note: "unterminated')
        assert res["Note"] == '"unterminated'


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

SAMPLE = build_infotext(
    "a fox in snow, (detailed:1.2)",
    "blurry",
    {**BASIC, "Lora hashes": "fox: abcdef123456"},
)
UNICODE_SAMPLE = build_infotext("日本の狐, ünïcode ✓", "ぼやけた", BASIC)


def png_bytes(pnginfo=None, mode="RGB", **save):
    buf = io.BytesIO()
    Image.new(mode, (8, 8), "white").save(buf, "PNG", pnginfo=pnginfo, **save)
    return buf.getvalue()


def reopen(data):
    return Image.open(io.BytesIO(data))


class TestImages:
    def test_png_text_chunk_latin1(self):
        info = PngInfo()
        info.add_text("parameters", SAMPLE)
        info.add_text("postprocessing", "Postprocess upscaler: R-ESRGAN")
        data = png_bytes(info, dpi=(72, 72))
        assert b"tEXtparameters" in data
        text, items = read_info_from_image(reopen(data))
        assert text == SAMPLE
        assert items == {"postprocessing": "Postprocess upscaler: R-ESRGAN"}  # dpi dropped

    def test_png_itxt_chunk_unicode(self):
        info = PngInfo()
        info.add_itxt("parameters", UNICODE_SAMPLE)
        data = png_bytes(info)
        assert b"iTXtparameters" in data
        text, _ = read_info_from_image(reopen(data))
        assert text == UNICODE_SAMPLE
        assert parse_infotext(text)["Prompt"] == "日本の狐, ünïcode ✓"

    def test_make_pnginfo_picks_chunk_type(self):
        assert b"tEXtparameters" in png_bytes(make_pnginfo(SAMPLE))
        data = png_bytes(make_pnginfo(UNICODE_SAMPLE, {"extras": "x"}))
        assert b"iTXtparameters" in data and b"tEXtextras" in data
        text, items = read_info_from_image(reopen(data))
        assert text == UNICODE_SAMPLE and items == {"extras": "x"}

    def test_png_without_metadata(self):
        assert read_info_from_image(reopen(png_bytes())) == (None, {})

    @pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
    @pytest.mark.parametrize("text", [SAMPLE, UNICODE_SAMPLE])
    def test_exif_user_comment_round_trip(self, fmt, text):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "white").save(buf, fmt, exif=exif_user_comment_bytes(text), quality=90)
        got, items = read_info_from_image(reopen(buf.getvalue()))
        assert got == text
        assert "exif" not in items and "jfif" not in items
        assert items.get("exif comment") == text

    def test_exif_block_layout_matches_piexif_style(self):
        blob = exif_user_comment_bytes("hi")
        assert blob.startswith(b"Exif\x00\x00MM\x00\x2a")
        # UserComment entry: tag 0x9286, type 7 (UNDEFINED), count = 8 + 2*len
        assert struct.pack(">HHI", 0x9286, 7, 12) in blob
        assert blob.endswith(b"UNICODE\x00\x00h\x00i")

    def test_exif_written_by_pil_is_read_too(self):
        exif = Image.Exif()
        exif[0x8769] = {0x9286: encode_user_comment(SAMPLE)}
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG", exif=exif.tobytes())
        assert read_info_from_image(reopen(buf.getvalue()))[0] == SAMPLE

    def test_png_with_params_and_empty_exif_keeps_params(self):
        data = png_bytes(make_pnginfo(SAMPLE), exif=Image.Exif().tobytes())
        assert read_info_from_image(reopen(data))[0] == SAMPLE

    @pytest.mark.parametrize(
        "raw, text",
        [
            (b"UNICODE\x00" + "Größe".encode("utf-16-be"), "Größe"),
            (b"UNICODE\x00" + "Steps: 20".encode("utf-16-le"), "Steps: 20"),
            (b"UNICODE\x00" + "\ufeffbom".encode("utf-16-le"), "bom"),
            (b"ASCII\x00\x00\x00Steps: 20", "Steps: 20"),
            (b"\x00" * 8 + b"undefined", "undefined"),
            (b"no prefix at all", "no prefix at all"),
            (b"ASCII\x00\x00\x00padded\x00\x00", "padded"),
        ],
    )
    def test_user_comment_decoding(self, raw, text):
        assert decode_user_comment(raw) == text

    def test_gif_comment(self):
        buf = io.BytesIO()
        Image.new("P", (8, 8)).save(buf, "GIF", comment=SAMPLE.encode())
        text, items = read_info_from_image(reopen(buf.getvalue()))
        assert text == SAMPLE
        assert "background" not in items

    def test_novelai_metadata(self):
        info = PngInfo()
        info.add_text("Software", "NovelAI")
        info.add_text("Description", "a fox")
        info.add_text("Comment", json.dumps({"uc": "lowres", "steps": 28, "sampler": "k_euler_ancestral",
                                             "scale": 11, "seed": 42}))
        text, _ = read_info_from_image(reopen(png_bytes(info)))
        res = parse_infotext(text)
        assert res["Prompt"] == "a fox" and res["Negative prompt"] == "lowres"
        assert (res["Steps"], res["Sampler"], res["CFG scale"], res["Seed"]) == ("28", "Euler a", "11", "42")
        assert (res["Size-1"], res["Clip skip"], res["ENSD"]) == ("8", "2", "31337")
