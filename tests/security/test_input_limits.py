"""Every input limit, attacked against a real server (127.0.0.1, a free port): each refusal is a 4xx
naming the field, answered at once; nothing oversized is decoded, expanded or queued.

One server (--api --max-body-mb 1, one tiny checkpoint) shared by the module; the prompt parser's
complexity guard and the token counter's cap run in process.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib

import pytest
import requests
from PIL import Image

from conftest import start_server

TINY = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}
FAST = 60  # seconds: a refusal never waits for a job


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from tiny_models import make_checkpoint

    root = tmp_path_factory.mktemp("limits")
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1")
    server = start_server(root, "--api", "--max-body-mb", "1")
    yield server
    server.stop()


def _url(srv, path: str) -> str:
    assert srv.url.startswith("http://127.0.0.1:")
    return f"{srv.url}/sdapi/v1/{path}"


def _post(srv, path: str, payload=None, **kwargs) -> requests.Response:
    return requests.post(_url(srv, path), json=payload, timeout=kwargs.pop("timeout", FAST), **kwargs)


def _refused(response: requests.Response, *needles: str, status: tuple[int, ...] = (413, 422)) -> str:
    assert response.status_code in status, (response.status_code, response.text[:500])
    text = response.text
    for needle in needles:
        assert needle in text, (needle, text[:500])
    return text


def _png_b64(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "gray").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bomb_png_b64(width: int = 100_000, height: int = 100_000) -> str:
    """A PNG whose header claims width x height (a few hundred bytes): decoding it would take ~30 GB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(body).decode()


# --------------------------------------------------------------------------- output size and counts

@pytest.mark.parametrize("fields, needle", [
    ({"width": 4096, "height": 4096}, "width x height"),
    ({"width": 2048, "height": 4096}, "width x height"),
    ({"steps": 151}, "steps"),
    ({"steps": 100000}, "steps"),
    ({"batch_size": 8, "n_iter": 101}, "n_iter"),
    ({"n_iter": 100000}, "n_iter"),
    ({"seed_resize_from_w": 8192, "seed_resize_from_h": 8192}, "seed_resize_from"),
    ({"enable_hr": True, "hr_scale": 8, "width": 512, "height": 512}, "hires target"),
    ({"enable_hr": True, "hr_resize_x": 4096, "hr_resize_y": 4096}, "hires target"),
    ({"enable_hr": True, "hr_second_pass_steps": 1000}, "hr_second_pass_steps"),
    ({"prompt": "a" * 20_001}, "prompt"),
    ({"negative_prompt": "a" * 20_001}, "negative_prompt"),
    ({"enable_hr": True, "hr_prompt": "a" * 20_001}, "hr_prompt"),
])
def test_oversized_txt2img_is_refused_naming_the_field(srv, fields, needle):
    started = time.perf_counter()
    _refused(_post(srv, "txt2img", {**TINY, **fields}), needle)
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("fields, needle", [
    ({"steps": -1}, "steps"), ({"batch_size": 0}, "batch_size"), ({"width": -64}, "width"),
    ({"cfg_scale": -5}, "cfg_scale"), ({"cfg_scale": 1e300}, "cfg_scale"), ({"denoising_strength": 7}, "denoising"),
    ({"subseed_strength": -1}, "subseed_strength"), ({"seed": -5}, "seed"), ({"hr_scale": -2, "enable_hr": True}, "hr_scale"),
])
def test_negative_and_absurd_numbers_are_422_naming_the_field(srv, fields, needle):
    _refused(_post(srv, "txt2img", {**TINY, **fields}), needle, status=(422,))


@pytest.mark.parametrize("raw, needle", [
    ('"cfg_scale": NaN', "cfg_scale"),
    ('"cfg_scale": Infinity', "cfg_scale"),
    ('"subseed_strength": -Infinity', "subseed_strength"),
    ('"override_settings": {"eta_noise_seed_delta": NaN}', "override_settings.eta_noise_seed_delta"),
    ('"script_args": [1, Infinity]', "script_args.1"),
    ('"alwayson_scripts": {"x": {"args": [NaN]}}', "alwayson_scripts.x.args.0"),
])
def test_non_finite_numbers_anywhere_are_422_naming_the_field(srv, raw, needle):
    body = '{"prompt": "a", "width": 64, "height": 64, "steps": 2, ' + raw + "}"
    response = requests.post(_url(srv, "txt2img"), data=body, timeout=FAST, headers={"Content-Type": "application/json"})
    _refused(response, needle, status=(422,))


def test_non_finite_setting_is_refused(srv):
    response = requests.post(_url(srv, "options"), data='{"eta_ancestral": NaN}', timeout=FAST,
                             headers={"Content-Type": "application/json"})
    _refused(response, "eta_ancestral", status=(422,))


def test_xyz_cells_are_counted_before_any_cell_is_built(srv):
    args = ["Steps", "1-1000000000", None, "CFG Scale", "1-100000", None, "Nothing", "", None,
            True, False, False, False, False, False, False, 0, False]
    started = time.perf_counter()
    _refused(_post(srv, "txt2img", {**TINY, "script_name": "X/Y/Z plot", "script_args": args}, timeout=120),
             "--max-xyz-cells", status=(422,))
    assert time.perf_counter() - started < 60
    args = ["Steps", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17", None, "CFG Scale", "1-16", None,
            "Nothing", "", None, True, False, False, False, False, False, False, 0, False]
    _refused(_post(srv, "txt2img", {**TINY, "script_name": "X/Y/Z plot", "script_args": args}, timeout=120),
             "--max-xyz-cells", status=(422,))


# --------------------------------------------------------------------------- images in requests

def test_too_many_init_images_are_refused_before_decoding(srv):
    _refused(_post(srv, "img2img", {**TINY, "init_images": [_png_b64()] * 17}), "init_images", "16")


def test_image_bomb_is_refused_from_its_header(srv):
    bomb = _bomb_png_b64()
    started = time.perf_counter()
    _refused(_post(srv, "img2img", {**TINY, "init_images": [bomb]}), "init_images[0]", "pixels")
    _refused(_post(srv, "img2img", {**TINY, "init_images": [_png_b64()], "mask": bomb}), "mask")
    _refused(_post(srv, "extra-single-image", {"image": bomb}), "image")
    _refused(_post(srv, "extra-batch-images", {"imageList": [{"data": bomb, "name": "x.png"}]}), "imageList[0].data")
    _refused(_post(srv, "png-info", {"image": bomb}), "image")
    assert time.perf_counter() - started < 30


def test_extras_upscale_target_is_limited(srv):
    _refused(_post(srv, "extra-single-image", {"image": _png_b64((300, 300)), "upscaler_1": "Lanczos",
                                               "upscaling_resize": 8}), "upscale target")
    _refused(_post(srv, "extra-single-image", {"image": _png_b64(), "upscaler_1": "Lanczos", "resize_mode": 1,
                                               "upscaling_resize_w": 8192, "upscaling_resize_h": 8192}),
             "upscale target")
    ok = _post(srv, "extra-single-image", {"image": _png_b64((16, 16)), "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert ok.status_code == 200, ok.text[:300]


def test_too_many_extras_batch_images(srv):
    images = [{"data": _png_b64(), "name": f"{i}.png"} for i in range(17)]
    _refused(_post(srv, "extra-batch-images", {"imageList": images}), "imageList", "16")


# --------------------------------------------------------------------------- request bodies

def test_request_body_over_the_limit_is_413_at_once(srv):
    big = json.dumps({**TINY, "prompt": "a" * (2 * 1024 * 1024)})
    started = time.perf_counter()
    response = requests.post(_url(srv, "txt2img"), data=big, timeout=FAST, headers={"Content-Type": "application/json"})
    _refused(response, "request body", status=(413,))
    assert time.perf_counter() - started < 30


def test_chunked_body_over_the_limit_is_413(srv):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB, no Content-Length
            yield b"a" * 65536
        yield b'"}'
    try:
        response = requests.post(_url(srv, "txt2img"), data=chunks(), timeout=FAST,
                                 headers={"Content-Type": "application/json"})
    except requests.ConnectionError:
        return  # the server answered 413 and closed before the client finished sending: also refused
    _refused(response, status=(413,))


def test_server_keeps_working_after_the_attacks(srv):
    response = _post(srv, "txt2img", TINY, timeout=300)
    assert response.status_code == 200, response.text[:300]


# --------------------------------------------------------------------------- in process: parser, counter, flags

HOSTILE_PROMPTS = {
    "round": "(" * 50_000, "square": "[" * 50_000, "mixed": "([{" * 16_667, "escaped": "\\(" * 25_000,
    "colons": "a:" * 25_000, "editing": "[a:b:" * 10_000, "weights": "(a:1.1" * 8_000, "alternation": "[a|" * 12_500,
    "editing-empty": "[a::" * 12_500, "closers": ")]" * 25_000, "nested-text": "(a" * 25_000 + ")" * 25_000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PROMPTS))
def test_prompt_parser_is_linear_on_hostile_input(name):
    from modules.engine import prompt_parser as pp

    text = HOSTILE_PROMPTS[name]
    for parse in (pp.parse_prompt_attention, lambda t: pp.get_learned_conditioning_prompt_schedules([t], 20),
                  lambda t: pp.get_multicond_prompt_list([t])):
        started = time.thread_time()  # CPU time of this thread: other load on the machine does not count
        parse(text)
        elapsed = time.thread_time() - started
        assert elapsed < 2.0, (name, elapsed)   # a complexity guard: done in well under 0.5 s


def test_deferred_weights_match_exact_ones():
    from modules.engine import prompt_parser as pp

    text = "(a [b (c:1.3) d" * 400
    original = pp._EXACT_BUDGET
    exact = pp.parse_prompt_attention(text)
    try:
        pp._EXACT_BUDGET = 0
        fast = pp.parse_prompt_attention(text)
    finally:
        pp._EXACT_BUDGET = original
    assert [t for t, _ in fast] == [t for t, _ in exact]
    assert all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for (_, a), (_, b) in zip(fast, exact))


def test_token_counter_caps_what_it_tokenizes(tmp_path):
    from conftest import make_services

    services = make_services(tmp_path, {})
    try:
        class Tok:  # records what it was asked to tokenize
            seen = 0
        counted = []

        def fake(text, tokenizer, **_):
            counted.append(len(text))
            return type("C", (), {"count": len(text), "max_length": 75})()
        from modules.engine import conditioning
        original = conditioning.count_prompt_tokens
        conditioning.count_prompt_tokens = fake
        services.generation._counting_tokenizer = Tok()
        try:
            started = time.perf_counter()
            services.generation.count_tokens("a " * 1_000_000)
            assert time.perf_counter() - started < 2
        finally:
            conditioning.count_prompt_tokens = original
        assert counted == [services.limits.max_prompt_length]
    finally:
        services.generation.queue.shutdown()


def test_flags_raise_the_limits():
    from modules.core.flags import parse_args
    from modules.core.limits import Limits

    default = Limits.from_opts(parse_args([], env={}).opts)
    assert (default.max_pixels, default.max_steps, default.max_images, default.max_xyz_cells) == (2048 * 2048, 150, 800, 256)
    assert (default.max_prompt_length, default.max_input_images, default.max_body_bytes) == (20_000, 16, 50 * 1024 * 1024)
    raised = Limits.from_opts(parse_args(["--max-pixels", "16777216", "--max-steps", "300", "--max-images", "100",
                                          "--max-xyz-cells", "1000", "--max-prompt-length", "50000",
                                          "--max-input-images", "32", "--max-input-pixels", "67108864",
                                          "--max-body-mb", "200", "--max-upload-mb", "100"], env={}).opts)
    assert (raised.max_pixels, raised.max_side, raised.max_steps, raised.max_images) == (16777216, 4096, 300, 100)
    assert (raised.max_xyz_cells, raised.max_prompt_length, raised.max_input_images) == (1000, 50000, 32)
    assert raised.max_body_bytes == 200 * 1024 * 1024 and raised.max_upload_bytes == 100 * 1024 * 1024


def test_validate_uses_the_limits_it_is_given():
    from modules.core.limits import Limits
    from modules.core.pipeline import ProcessingError, Txt2ImgParams

    p = Txt2ImgParams(prompt="x", steps=200, sampler_name="Euler", width=64, height=64)
    with pytest.raises(ProcessingError, match="steps"):
        p.validate(Limits())
    p.validate(Limits(max_steps=300))
    with pytest.raises(ProcessingError, match="finite"):
        Txt2ImgParams(prompt="x", cfg_scale=float("nan"), sampler_name="Euler", width=64, height=64).validate()
