"""Face restoration: what is missing is named with where it goes; a real YuNet-layout detector file is
decoded by OpenCV, the face aligned, restored and pasted back in place; GFPGAN files are recognised."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from face_fixtures import planted_face, write_yunet
from upscaler_fixtures import make_upscaler

from modules.core.extras import ExtrasParams, postprocess
from modules.core.face_restoration import FaceRestoration
from modules.core.pipeline import ProcessingError


class WhiteFace:
    """A stand-in restorer network (GFPGAN's real one is 350 MB): every restored face is white."""
    purpose = "FaceSR"

    def model(self, x, **_kwargs):
        return (torch.ones_like(x),)


@pytest.fixture
def faces(tmp_path):
    return FaceRestoration(tmp_path / "models" / "GFPGAN", tmp_path / "models" / "Codeformer")


def test_without_files_the_options_say_which_file_goes_where(faces, tmp_path):
    missing = faces.missing()
    assert any("GFPGANv1.4.pth" in m and str(tmp_path / "models" / "GFPGAN") in m for m in missing)
    assert any("codeformer-v0.1.0.pth" in m and "Codeformer" in m for m in missing)
    assert any("face_detection_yunet_2023mar.onnx" in m for m in missing)
    assert faces.restorers() == []
    with pytest.raises(ProcessingError, match="GFPGAN face restoration needs files.*GFPGANv1.4.pth"):
        postprocess(Image.new("RGB", (32, 32)), ExtrasParams(gfpgan_visibility=1), lambda i, s, n: i, faces.restore)


def test_a_detected_face_is_restored_in_place_and_blended_by_visibility(faces):
    gfpgan_dir = faces.gfpgan_dir
    gfpgan_dir.mkdir(parents=True)
    write_yunet(gfpgan_dir / "face_detection_yunet_2023mar.onnx", size=160)
    (gfpgan_dir / "GFPGANv1.4.pth").write_bytes(b"replaced by the stand-in below")
    assert faces.missing("GFPGAN") == [] and faces.restorers() == [{"name": "GFPGAN", "cmd_dir": str(gfpgan_dir)}]
    engine = faces._engine_for(faces.files())
    engine._models["GFPGAN"] = WhiteFace()
    image = Image.new("RGB", (160, 160), (40, 60, 80))
    found = engine.faces(image)
    (x, y, w, h), landmarks = planted_face(160)
    assert len(found) == 1 and np.allclose(found[0][:4], [x, y, w, h], atol=0.5)
    assert np.allclose(found[0][4:14].reshape(5, 2), landmarks, atol=0.5)

    out, info = faces.restore(image, ExtrasParams(gfpgan_visibility=1.0))
    pixels = np.asarray(out, dtype=int)
    assert info == {"GFPGAN visibility": 1.0}
    assert (pixels[80, 80] > 240).all()                  # the face centre is the restored (white) face
    assert (pixels[5, 5] == [40, 60, 80]).all()           # far outside the face: untouched
    half, _ = faces.restore(image, ExtrasParams(gfpgan_visibility=0.5))
    assert abs(int(np.asarray(half)[80, 80, 0]) - (40 + 255) // 2) <= 2


def test_a_full_size_gfpgan_file_is_a_face_restorer_and_an_upscaler_is_not(tmp_path):
    from safetensors.torch import save_file

    from modules.engine.face_restore import _load_restorer
    from modules.models.spandrel_support import spandrel_support

    spandrel_support()
    from spandrel.architectures.GFPGAN import GFPGAN

    net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                 num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "GFPGANv1.4.safetensors"))
    del net
    model = _load_restorer(tmp_path / "GFPGANv1.4.safetensors")
    assert (str(model.architecture.id), model.purpose) == ("GFPGAN", "FaceSR")
    with pytest.raises(ValueError, match="not a face restorer"):
        _load_restorer(make_upscaler(tmp_path, "compact", 2))


def test_restore_faces_in_txt2img_uses_the_setting_and_names_it_in_the_infotext(tmp_path):
    from conftest import make_services
    from modules.core.infotext import parse_infotext
    from modules.core.pipeline import Txt2ImgParams

    services = make_services(tmp_path, {"tiny.safetensors": ("sd1", 0)})
    try:
        params = dict(prompt="a face", width=64, height=64, steps=1, sampler_name="Euler", seed=3)
        with pytest.raises(ProcessingError, match="CodeFormer face restoration needs files"):
            services.generation.submit(Txt2ImgParams(**params, restore_faces=True)).result()
        calls = []
        services.generation.restore_faces = lambda image, options: (
            calls.append(options.face_restoration_model), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[1]
        plain = services.generation.submit(Txt2ImgParams(**params)).result()
        restored = services.generation.submit(Txt2ImgParams(**params, restore_faces=True)).result()
        services.options.set("face_restoration", True)   # A1111 1.6+: the Settings' "Restore faces" for the UI
        services.options.set("face_restoration_model", "GFPGAN")
        from_setting = services.generation.submit(Txt2ImgParams(**params)).result()
        assert parse_infotext(from_setting.infotexts[0])["Face restoration"] == "GFPGAN"
        assert calls == ["CodeFormer", "GFPGAN"]
        assert parse_infotext(restored.infotexts[0])["Face restoration"] == "CodeFormer"
        assert "Face restoration" not in parse_infotext(plain.infotexts[0])
        assert np.array_equal(np.asarray(restored.images[0]),
                              np.asarray(plain.images[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    finally:
        services.generation.queue.shutdown()
