"""A1111's extension API for extra networks and embeddings, used the way extensions use it:
``modules.extra_networks`` (ExtraNetwork, register_extra_network, parse_prompt(s), activate/deactivate),
``modules.sd_hijack.model_hijack.embedding_db`` and ``modules.textual_inversion.textual_inversion.Embedding``,
against the tiny SD1 checkpoint through the real job path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedding_files import vectors, write_sdxl_safetensors, write_string_to_param_pt
from modules.core.infotext import parse_infotext
from modules.core.pipeline import Txt2ImgParams
from test_processing import make_services

SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0, seed=5)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from modules import shared

    services = make_services(tmp_path_factory.mktemp("ext-networks"), "sd1")
    emb_dir = services.paths.embeddings_dir
    write_string_to_param_pt(emb_dir / "fluffy.pt", vectors(2, 64, 1), step=300)
    write_sdxl_safetensors(emb_dir / "xlonly.safetensors", vectors(1, 64, 2), vectors(1, 128, 3))
    shared.bind(services)   # what webui.py does before extension scripts are imported
    yield services
    shared.bind(None)
    services.generation.queue.shutdown()


def run(services, prompt: str, script=None, **kwargs):
    return services.generation.txt2img(Txt2ImgParams(prompt=prompt, **{**SMALL, **kwargs}), script=script)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_parse_prompt_and_params_have_a1111_shapes():
    from modules.extra_networks import ExtraNetworkParams, parse_prompt, parse_prompts

    text, found = parse_prompt("a cat <mynet:foo:0.5:x=1> <lora:a:1>")
    assert text == "a cat  " and set(found) == {"mynet", "lora"}
    params = found["mynet"][0]
    assert params.items == ["foo", "0.5", "x=1"] and params.positional == ["foo", "0.5"] and params.named == {"x": "1"}
    assert params == ExtraNetworkParams(["foo", "0.5", "x=1"])
    assert found["nothing"] == []   # a defaultdict, as A1111's
    cleaned, first = parse_prompts(["a <mynet:one>", "b <mynet:two>"])
    assert cleaned == ["a ", "b "] and first["mynet"] == [ExtraNetworkParams(["one"])]


def test_a_registered_extra_network_is_activated_by_its_tag_and_deactivated_after(app):
    from modules import extra_networks

    calls, data_seen = [], []

    class StyleNet(extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__("stylenet")

        def activate(self, p, params_list):
            calls.append(("activate", [x.items for x in params_list], list(p.prompts)))
            data_seen.append(p.extra_network_data.get("stylenet", []) == params_list)   # A1111's p.extra_network_data
            if params_list:
                p.extra_generation_params["StyleNet"] = params_list[0].positional[0]

        def deactivate(self, p):
            calls.append(("deactivate",))

    class Broken(extra_networks.ExtraNetwork):
        def activate(self, p, params_list):
            raise RuntimeError("extension bug")

        def deactivate(self, p):
            raise RuntimeError("extension bug")

    base = run(app, "a cat")
    net = StyleNet()
    extra_networks.register_extra_network(net)
    extra_networks.register_extra_network(Broken("broken"))
    try:
        assert extra_networks.extra_network_registry["stylenet"] is net
        tagged = run(app, "a cat <stylenet:warm:2>")
        assert calls == [("activate", [["warm", "2"]], ["a cat <stylenet:warm:2>"]), ("deactivate",)]
        assert data_seen == [True]
        assert np.array_equal(pixels(base), pixels(tagged))   # its tag is taken out of the prompt text
        assert not tagged.comments   # no "unknown extra network" for a registered one
        fields = parse_infotext(tagged.infotexts[0])
        assert fields["StyleNet"] == "warm" and fields["Prompt"] == "a cat <stylenet:warm:2>"
        calls.clear()
        plain = run(app, "a dog")
        assert calls == [("activate", [], ["a dog"])]   # A1111: activate(p, []), no deactivate without tags
        assert "StyleNet" not in parse_infotext(plain.infotexts[0])
        calls.clear()
        run(app, "a dog <stylenet:cold>", disable_extra_networks=True)
        assert calls == []
        seen = []
        net.activate = lambda p, params_list: seen.append((p, [x.items for x in params_list]))
        script = app.script_runner(False).job_script([])   # the UI/API path: extension scripts' own `p`
        run(app, "a dog <stylenet:cold>", script=script)
        assert seen and seen[0][1] == [["cold"]] and seen[0][0].scripts is app.script_runner(False)
    finally:
        app.networks.handlers.registry.clear()


def test_embedding_db_lists_loaded_and_skipped_embeddings_with_a1111_fields(app):
    from modules.sd_hijack import model_hijack

    db = model_hijack.embedding_db
    run(app, "a cat")   # the model is loaded: its width decides what is skipped
    db.load_textual_inversion_embeddings()
    fluffy = db.word_embeddings["fluffy"]
    assert fluffy.name == "fluffy" and fluffy.shape == 64 and fluffy.vectors == 2 and fluffy.step == 300
    assert tuple(fluffy.vec.shape) == (2, 64) and torch.equal(fluffy.vec, vectors(2, 64, 1))
    assert fluffy.filename.endswith("fluffy.pt") and fluffy.sd_checkpoint_name == "tiny-sd1"
    assert len(fluffy.hash) == 64 and fluffy.shorthash == fluffy.hash[:12]
    assert set(db.skipped_embeddings) == {"xlonly"}
    xl = db.skipped_embeddings["xlonly"]
    assert set(xl.vec) == {"clip_l", "clip_g"} and xl.shape == 192 and xl.vectors == 1
    assert db.word_embeddings["fluffy"] is fluffy   # the same objects until something changes
    assert str(app.paths.embeddings_dir) in {str(k) for k in db.embedding_dirs}


def test_an_embedding_saved_by_an_extension_is_found_on_force_reload_and_used(app, tmp_path):
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    base = run(app, "a cat")
    made = Embedding(vectors(1, 64, 9) * 3, "madebyext", step=7)
    assert made.shape == 64 and made.vectors == 1 and made.hash is None
    made.save(str(app.paths.embeddings_dir / "madebyext.pt"))
    model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    loaded = model_hijack.embedding_db.word_embeddings["madebyext"]
    assert torch.equal(loaded.vec, made.vec) and loaded.step == 7
    used = run(app, "a cat madebyext")
    assert not np.array_equal(pixels(base), pixels(used))
    assert "madebyext" in parse_infotext(used.infotexts[0]).get("TI hashes", "")
    other = tmp_path / "more"
    other.mkdir()
    write_string_to_param_pt(other / "extradir.pt", vectors(1, 64, 4))
    model_hijack.embedding_db.add_embedding_dir(str(other))
    assert "extradir" in model_hijack.embedding_db.word_embeddings


EXTENSION_SCRIPT = '''
from modules import extra_networks, script_callbacks
from modules.sd_hijack import model_hijack
from modules.textual_inversion.textual_inversion import Embedding


class TestNet(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("testnet")

    def activate(self, p, params_list):
        if params_list:
            p.extra_generation_params["Testnet"] = "-".join(params_list[0].items)
            db = model_hijack.embedding_db
            p.extra_generation_params["Seen embeddings"] = "-".join(
                f"{name}/{e.vectors}/{e.shape}/{isinstance(e, Embedding)}" for name, e in sorted(db.word_embeddings.items()))

    def deactivate(self, p):
        pass


script_callbacks.on_before_ui(lambda: extra_networks.register_extra_network(TestNet()))
'''


def test_an_extension_folder_registers_a_network_that_api_jobs_activate(tmp_path):
    """A real server (--nowebui, as A1111's API-only mode also runs on_before_ui) with an extension written as
    for A1111: its network's tag in an API prompt reaches its activate(), which reads model_hijack.embedding_db."""
    import requests

    from conftest import start_server
    from tiny_models import make_checkpoint

    script = tmp_path / "extensions" / "sd-webui-testnet" / "scripts" / "testnet.py"
    script.parent.mkdir(parents=True)
    script.write_text(EXTENSION_SCRIPT, encoding="utf-8")
    make_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1")
    (tmp_path / "embeddings").mkdir()
    write_string_to_param_pt(tmp_path / "embeddings" / "fluffy.pt", vectors(2, 64, 1))
    srv = start_server(tmp_path, "--nowebui", ready_path="/sdapi/v1/samplers")
    try:
        reply = requests.post(srv.url + "/sdapi/v1/txt2img", json={"prompt": "a cat <testnet:x:y>", **SMALL},
                              timeout=120)
        assert reply.status_code == 200, reply.text
        fields = parse_infotext(json.loads(reply.json()["info"])["infotexts"][0])
        assert fields["Testnet"] == "x-y"
        assert fields["Seen embeddings"] == "fluffy/2/64/True"
        assert "unknown extra network" not in srv.output
    finally:
        srv.stop()
