"""A job reads a snapshot of the settings taken when it starts, with its own overrides applied to
that snapshot only: no other client sees them, and they never reach config.json."""
from __future__ import annotations

import json
import threading

import pytest

from conftest import make_services
from modules.core.options import Options, OptionError, OptionsSnapshot, default_templates
from modules.core.pipeline import Txt2ImgParams
from modules.extensions.context import JobAwareOptions


def _options(tmp_path, *, frozen=False) -> Options:
    return Options(tmp_path / "config.json", default_templates(), frozen=frozen)


def test_a_snapshot_applies_overrides_to_itself_only(tmp_path):
    options = _options(tmp_path)
    snap = options.snapshot({"CLIP_stop_at_last_layers": "2", "samples_format": "jpg"})
    assert (snap.CLIP_stop_at_last_layers, snap.samples_format) == (2, "jpg")   # coerced like a real setting
    assert (options.CLIP_stop_at_last_layers, options.samples_format) == (1, "png")
    assert not (tmp_path / "config.json").exists()


def test_a_snapshot_does_not_follow_later_changes_and_cannot_be_written(tmp_path):
    options = _options(tmp_path)
    snap = options.snapshot()
    options.set("CLIP_stop_at_last_layers", 4)
    assert snap.CLIP_stop_at_last_layers == 1 and options.snapshot().CLIP_stop_at_last_layers == 4
    with pytest.raises(OptionError, match="read-only"):
        snap.CLIP_stop_at_last_layers = 3
    with pytest.raises(OptionError, match="unknown setting 'nope'"):
        snap.with_overrides({"nope": 1})
    with pytest.raises(OptionError, match="CLIP_stop_at_last_layers"):
        options.snapshot({"CLIP_stop_at_last_layers": "two"})


def test_frozen_settings_still_honour_overrides(tmp_path):
    options = _options(tmp_path, frozen=True)
    with pytest.raises(OptionError, match="frozen"):
        options.set("CLIP_stop_at_last_layers", 2)
    assert options.snapshot({"CLIP_stop_at_last_layers": 2}).CLIP_stop_at_last_layers == 2


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    svc = make_services(tmp_path_factory.mktemp("per_job"), {"tiny-sd1.safetensors": ("sd1", 0)})
    yield svc
    svc.generation.queue.shutdown()


def _params(**kw) -> Txt2ImgParams:
    return Txt2ImgParams(prompt="a cat", steps=1, width=64, height=64, seed=5, save_images=False, **kw)


def test_overrides_are_invisible_to_the_next_job_and_to_config_json(services):
    config = services.paths.config_file
    before = config.read_text() if config.exists() else None
    seen = services.generation.txt2img(_params(), override_settings={"CLIP_stop_at_last_layers": 2})
    assert "Clip skip: 2" in seen.infotexts[0]
    assert services.options.CLIP_stop_at_last_layers == 1
    plain = services.generation.txt2img(_params())
    assert "Clip skip" not in plain.infotexts[0]
    assert (config.read_text() if config.exists() else None) == before


def test_a_change_made_while_a_job_runs_applies_to_the_next_job(services):
    def script(params, run, job):
        services.options.set("CLIP_stop_at_last_layers", 3)   # another client saves settings mid-job
        return run(params)
    try:
        during = services.generation.submit(_params(), script=script).result()
        after = services.generation.txt2img(_params())
    finally:
        services.options.set("CLIP_stop_at_last_layers", 1)
    assert "Clip skip" not in during.infotexts[0]
    assert "Clip skip: 3" in after.infotexts[0]


def test_concurrent_clients_each_see_their_own_overrides(services):
    results: dict[str, str] = {}

    def client(name: str, overrides: dict) -> None:
        results[name] = services.generation.txt2img(_params(), override_settings=overrides).infotexts[0]
    threads = [threading.Thread(target=client, args=(f"c{i}", {"CLIP_stop_at_last_layers": i}))
               for i in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert "Clip skip" not in results["c1"]
    assert "Clip skip: 2" in results["c2"] and "Clip skip: 3" in results["c3"]
    assert services.options.CLIP_stop_at_last_layers == 1


def test_extensions_reading_shared_opts_in_a_job_see_that_jobs_overrides(services):
    opts = JobAwareOptions(services.options, services.generation.current_options)
    seen = []

    def script(params, run, job):
        seen.append(opts.samples_format)
        run(params, override_settings={"samples_format": "webp"})   # X/Y/Z-style per-call override
        seen.append(opts.samples_format)
        return run(params)
    services.generation.submit(_params(), override_settings={"samples_format": "jpg"}, script=script).result()
    assert seen == ["jpg", "jpg"] and opts.samples_format == "png"
    assert isinstance(services.generation.current_options(), Options)   # outside a job: the live settings


def test_restore_afterwards_false_keeps_the_overrides_as_settings(services):
    try:
        services.generation.submit(_params(), override_settings={"eta_noise_seed_delta": 31337},
                                   restore_settings=False).result()
        assert services.options.eta_noise_seed_delta == 31337
        assert json.loads(services.paths.config_file.read_text())["eta_noise_seed_delta"] == 31337
    finally:
        services.options.set("eta_noise_seed_delta", 0)
        services.options.save()


def test_a_jobs_snapshot_type(services):
    seen = []
    services.generation.submit(_params(), script=lambda params, run, job: (
        seen.append(services.generation.current_options()), run(params))[1]).result()
    assert isinstance(seen[0], OptionsSnapshot)
