"""LoRA / LyCORIS / hypernetworks on the tiny checkpoints, with files in the real on-disk layouts.

Where diffusers can load the same file (kohya, PEFT, LoCon, PEFT DoRA), the merged weights must equal
diffusers' fused ones: that proves the key mapping and the maths. The rest goes through the real job
path (GenerationService -> pipeline -> engine) and compares images bit for bit.
"""
from __future__ import annotations

import copy
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

from lora_fixtures import (hypernetwork, kohya_lora, kohya_targets, lycoris, peft_dora, peft_lora, save)
from modules.core.infotext import parse_infotext, read_fields
from modules.core.pipeline import Txt2ImgParams
from test_processing import make_services

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=77)
SD1_META = {"ss_output_name": "styleAlias", "ss_base_model_version": "sd_v1", "ss_network_dim": "4"}


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


class Marker:
    """A pickle that would create a file if it were ever unpickled without restrictions."""
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-sd1")
    services = make_services(root, "sd1")
    model = services.models.current()
    pipe = model.pipe
    lora_dir = services.paths.lora_dir
    services.fresh = {"unet": state(pipe.unet), "text_encoder": state(pipe.text_encoder)}
    services.pristine_pipe = copy.deepcopy(pipe)
    services.files = {
        "style": kohya_lora(lora_dir / "style.safetensors", pipe, metadata=SD1_META),
        "peft": peft_lora(lora_dir / "peft.safetensors", pipe, seed=1),
        "locon": kohya_lora(lora_dir / "locon.safetensors", pipe, conv=True, seed=2),
        "dora": kohya_lora(lora_dir / "dora.safetensors", pipe, dora=True, seed=3),
        "peftdora": peft_dora(lora_dir / "peftdora.safetensors", pipe, seed=4),
        "loha": lycoris(lora_dir / "sub" / "loha.safetensors", pipe, "loha", seed=5),
        "lokr": lycoris(services.paths.models_dir / "LyCORIS" / "lokr.safetensors", pipe, "lokr", seed=6),
        "legacy": kohya_lora(lora_dir / "legacy.pt", pipe, seed=7),
        "xlmeta": kohya_lora(lora_dir / "xlmeta.safetensors", pipe, seed=8,
                             metadata={"ss_base_model_version": "sdxl_base_v1-0"}),
    }
    # no metadata, SDXL-sized layers: only the shapes tell it is for another family
    wrong = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("lora_down.weight") and v.dim() == 2 else v
             for k, v in services.files["style"].items()}
    save(lora_dir / "wrongshape.safetensors", wrong)
    save(lora_dir / "otherfamily.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                                torch.zeros(4, 1280),
                                                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                                                torch.zeros(5120, 4)})
    good = (lora_dir / "style.safetensors").read_bytes()
    (lora_dir / "broken.safetensors").write_bytes(good[: len(good) // 2])
    services.marker = root / "pwned"
    with open(lora_dir / "evil.pt", "wb") as fh:
        pickle.dump({"lora_unet_x.lora_down.weight": Marker(str(services.marker))}, fh, protocol=2)
    hypernetwork(services.paths.models_dir / "hypernetworks" / "hn.pt", (32, 64))
    yield services
    services.generation.queue.shutdown()


def run(services, prompt: str, **kwargs):
    return services.generation.txt2img(Txt2ImgParams(prompt=prompt, **{**SMALL, **kwargs}))


# --------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("name", ["style", "peft", "locon", "peftdora"])
def test_merged_weights_equal_diffusers_fused_weights(sd1, name):
    """kohya, PEFT, LoCon (3x3 convs) and PEFT DoRA: our merge == diffusers load_lora_weights + fuse_lora."""
    engine = sd1.networks.engine
    model = sd1.models.current()
    entry = engine.loras.find(name)
    reference = copy.deepcopy(sd1.pristine_pipe)
    reference.load_lora_weights(str(entry.path))
    reference.fuse_lora()
    reference.unload_lora_weights()
    from modules.engine.networks.merge import NetworkUse

    merger = engine.merger(model)
    report = merger.apply([NetworkUse(engine.weights_of(entry))])
    try:
        assert report.outcomes[0].layers > 0 and not report.outcomes[0].unmatched and not report.outcomes[0].error
        for component in ("unet", "text_encoder"):
            ours, theirs = getattr(model.pipe, component).state_dict(), getattr(reference, component).state_dict()
            changed = [k for k in ours if not torch.equal(ours[k], sd1.fresh[component][k])]
            assert changed or (component == "text_encoder" and name == "peftdora")
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    finally:
        merger.apply([])
    assert same_state(model.pipe.unet, sd1.fresh["unet"]) and same_state(model.pipe.text_encoder,
                                                                          sd1.fresh["text_encoder"])


def test_loha_lokr_and_kohya_dora_follow_their_formulas(sd1):
    engine, model = sd1.networks.engine, sd1.models.current()
    from modules.engine.networks.merge import NetworkUse

    prefix, module = next(iter(kohya_targets(model.pipe, sdxl=False, te=False).items()))
    name = next(n for n, m in model.pipe.unet.named_modules() if m is module)
    w0 = sd1.fresh["unet"][name + ".weight"]
    f = sd1.files
    expected = {
        "loha": (f["loha"][prefix + ".hada_w1_a"] @ f["loha"][prefix + ".hada_w1_b"])
        * (f["loha"][prefix + ".hada_w2_a"] @ f["loha"][prefix + ".hada_w2_b"]) * (2.0 / 4),
        "lokr": torch.kron(f["lokr"][prefix + ".lokr_w1"], f["lokr"][prefix + ".lokr_w2_a"]
                           @ f["lokr"][prefix + ".lokr_w2_b"]) * (2.0 / 4),
    }
    merged = w0 + f["dora"][prefix + ".lora_up.weight"] @ f["dora"][prefix + ".lora_down.weight"] * (2.0 / 4)
    expected["dora"] = merged * (f["dora"][prefix + ".dora_scale"] / merged.norm(dim=1, keepdim=True)) - w0
    merger = engine.merger(model)
    try:
        for kind, delta in expected.items():
            merger.apply([NetworkUse(engine.weights_of(engine.loras.find(kind)), te=1.0, unet=0.5)])
            torch.testing.assert_close(module.weight.detach() - w0, delta * 0.5, rtol=1e-4, atol=1e-6)
    finally:
        merger.apply([])


# --------------------------------------------------------------------------- through jobs


def test_lora_changes_the_image_weight_zero_and_restore_are_bit_exact(sd1):
    base = run(sd1, "a cat")
    with_lora = run(sd1, "a cat <lora:style:1>")
    zero = run(sd1, "a cat <lora:style:0>")
    after = run(sd1, "a cat")
    assert not np.array_equal(pixels(base), pixels(with_lora))
    assert np.array_equal(pixels(base), pixels(zero))
    assert np.array_equal(pixels(base), pixels(after))
    pipe = sd1.models.current().pipe
    assert same_state(pipe.unet, sd1.fresh["unet"]) and same_state(pipe.text_encoder, sd1.fresh["text_encoder"])
    assert "<lora:style:1>" in with_lora.infotexts[0]  # the tag stays in the prompt


def test_te_and_unet_multipliers_act_on_their_part_only(sd1):
    base = run(sd1, "a dog")   # its encoding is now cached: a text-encoder LoRA must not reuse it
    pipe = sd1.models.current().pipe
    te_only = run(sd1, "a dog <lora:style:1:0>")
    assert same_state(pipe.unet, sd1.fresh["unet"]) and not same_state(pipe.text_encoder, sd1.fresh["text_encoder"])
    assert not np.array_equal(pixels(base), pixels(te_only))
    unet_only = run(sd1, "a dog <lora:style:te=0:unet=1>")
    assert same_state(pipe.text_encoder, sd1.fresh["text_encoder"]) and not same_state(pipe.unet, sd1.fresh["unet"])
    assert not np.array_equal(pixels(base), pixels(unet_only))
    both = run(sd1, "a dog <lora:style:1>")
    assert not np.array_equal(pixels(both), pixels(te_only)) and not np.array_equal(pixels(both), pixels(unet_only))
    assert np.array_equal(pixels(run(sd1, "a dog")), pixels(base))


def test_alias_lyco_tag_and_pickled_lora_and_subfolders(sd1):
    by_name = run(sd1, "a cat <lora:style:0.7>")
    by_alias = run(sd1, "a cat <lyco:styleAlias:0.7>")
    assert np.array_equal(pixels(by_name), pixels(by_alias))
    assert not by_alias.comments
    base = run(sd1, "a cat")
    for tag in ("<lora:legacy:1>", "<lora:loha:1>", "<lora:lokr:1>", "<lora:dora:1>", "<lora:style:1:1:2>"):
        result = run(sd1, f"a cat {tag}")
        assert not result.comments, result.comments
        assert not np.array_equal(pixels(result), pixels(base)), tag
    names = {e.name for e in sd1.networks.loras.list()}
    assert {"style", "loha", "lokr", "legacy", "evil"} <= names
    kohya_lora(sd1.paths.lora_dir / "added later.safetensors", sd1.models.current().pipe, seed=9)
    late = run(sd1, "a cat <lora:added later:1>")   # found without a refresh, as in A1111
    assert not late.comments and not np.array_equal(pixels(late), pixels(base))


def test_switching_sets_never_reloads_and_the_same_set_costs_nothing(sd1):
    model = sd1.models.current()
    merger = sd1.networks.engine.merger(model)
    run(sd1, "a cat <lora:style:1> <lora:loha:0.5>")
    backups = dict(merger.backups)
    report = sd1.networks.activate(model, None, ["a cat <lora:style:1> <lora:loha:0.5>"])
    assert report.report.changed is False
    assert all(merger.backups[k] is v for k, v in backups.items())   # nothing copied again
    run(sd1, "a cat <lora:peft:1>")
    assert sd1.models.current() is model and model.pipe is sd1.models.current().pipe
    touched = set(merger.backups)
    assert touched and all(r.component in ("unet", "text_encoder") for r in touched)
    n_layers = sum(1 for _ in model.pipe.unet.modules()) + sum(1 for _ in model.pipe.text_encoder.modules())
    assert len(touched) < n_layers   # only the layers it touches are backed up
    run(sd1, "a cat")
    assert not merger.backups


def test_lora_hashes_in_infotext_are_autov3_and_paste_ignores_them(sd1):
    result = run(sd1, "a cat <lora:style:1> <lora:styleAlias:0.5>")
    data = (sd1.paths.lora_dir / "style.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    autov3 = hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Lora hashes"] == f"style: {autov3}, styleAlias: {autov3}"
    assert 'Lora hashes: "style: ' in result.infotexts[0]
    assert parsed["Prompt"] == "a cat <lora:style:1> <lora:styleAlias:0.5>"
    for column in ("param", "api", "ui"):
        assert not [f for f, _, _ in read_fields(parsed, "txt2img", column) if f.key == "Lora hashes"]


@pytest.mark.parametrize("tag, expected", [
    ("<lora:nosuch:1>", "LoRA not found: nosuch"),
    ("<lora:../../etc/passwd:1>", "LoRA not found: ../../etc/passwd"),
    ("<lora:xlmeta:1>", "was made for SDXL"),
    ("<lora:wrongshape:1>", "does not fit this model"),
    ("<lora:otherfamily:1>", "none of its 1 layers exist in this model"),
    ("<lora:broken:1>", "truncated"),
    ("<lora:evil:1>", "refused"),
    ("<lora:style:abc>", "bad arguments"),
])
def test_bad_loras_warn_and_the_image_is_still_made(sd1, tag, expected):
    base = run(sd1, "a cat")
    result = run(sd1, f"a cat {tag}")
    assert expected in result.comments and expected in result.js()["comments"]
    assert result.images and np.array_equal(pixels(result), pixels(base))
    assert not sd1.marker.exists()


def test_disable_extra_networks_strips_but_does_not_apply(sd1):
    base = run(sd1, "a cat")
    disabled = run(sd1, "a cat <lora:style:1>", disable_extra_networks=True)
    assert np.array_equal(pixels(base), pixels(disabled)) and "Lora hashes" not in disabled.infotexts[0]


def test_hypernetwork_changes_the_image_and_comes_off_again(sd1):
    assert [f.name for f in sd1.networks.hypernetworks.list()] == ["hn"]
    base = run(sd1, "a cat")
    with_hn = run(sd1, "a cat <hypernet:hn:1>")
    zero = run(sd1, "a cat <hypernet:hn:0>")
    after = run(sd1, "a cat")
    assert not with_hn.comments
    assert not np.array_equal(pixels(base), pixels(with_hn))
    assert np.array_equal(pixels(base), pixels(zero)) and np.array_equal(pixels(base), pixels(after))
    missing = run(sd1, "a cat <hypernet:nope:1>")
    assert "Hypernetwork not found: nope" in missing.comments


# --------------------------------------------------------------------------- X/Y/Z


def test_xyz_lora_axis_adds_each_lora_to_the_prompt(sd1):
    from modules.extensions import scripts
    from test_xyz_grid import xyz, xyz_args

    sd1.scripts = scripts.ScriptRegistry.from_modules({xyz.__name__: xyz})
    try:
        runner = sd1.script_runner(False)
        runner.ensure_defaults()
        args = runner.args_from_api("X/Y/Z plot", xyz_args("Lora", "None, style, styleAlias:0.5",
                                                           include_lone_images=True), None)
        processed = sd1.generation.submit(Txt2ImgParams(prompt="a cat", **SMALL),
                                          script=runner.job_script(args)).result()
        prompts = [parse_infotext(t)["Prompt"] for t in processed.infotexts[1:]]
        assert prompts == ["a cat", "a cat <lora:style:1>", "a cat <lora:styleAlias:0.5>"]
        cells = [np.asarray(i.convert("RGB"), dtype=np.int16) for i in processed.images[1:]]
        assert np.array_equal(cells[0], pixels(run(sd1, "a cat")))
        assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])
        from modules.core.pipeline import ProcessingError

        bad = runner.args_from_api("X/Y/Z plot", xyz_args("Lora", "nosuch"), None)
        with pytest.raises(ProcessingError, match="unknown Lora 'nosuch'"):
            sd1.generation.submit(Txt2ImgParams(prompt="a cat", **SMALL), script=runner.job_script(bad)).result()
    finally:
        sd1.scripts = None


def test_ui_shows_the_warnings_under_the_image(sd1):
    from modules.ui.common import poll_job

    job = sd1.generation.submit(Txt2ImgParams(prompt="a cat <lora:nosuch:1>", **SMALL))
    gallery, _, progress, info = list(poll_job(sd1.generation, job))[-1]
    assert gallery and "LoRA not found: nosuch" in progress and "warning" in progress
    assert "LoRA not found: nosuch" in info["comments"]


def test_a_hires_prompt_brings_its_own_loras(sd1):
    from modules.core.pipeline import HiresParams

    def hires(prompt: str):
        return run(sd1, "a cat <lora:style:1>", hires=HiresParams(enabled=True, scale=1.5, steps=2, prompt=prompt))
    same = hires("")
    other = hires("a cat <lora:peft:1>")
    assert not np.array_equal(pixels(same), pixels(other))
    hashes = parse_infotext(other.infotexts[0])["Lora hashes"]
    assert hashes.startswith("style: ") and ", peft: " in hashes
    assert "Lora hashes" in parse_infotext(same.infotexts[0]) and "peft" not in parse_infotext(same.infotexts[0])["Lora hashes"]
    assert np.array_equal(pixels(hires("")), pixels(same))   # the next job's first pass is the style set again
