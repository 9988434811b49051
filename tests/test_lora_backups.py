"""Backups of merged layers live in anonymous mappings of their own (modules/engine/networks/backups.py):
same values as the original, independent of it, released on restore, and switching / restoring stays
exact when every backup takes that path. Tiny SD1 components, kohya files in the real on-disk layout."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from lora_fixtures import components, network_weights as network, snapshot, two_kohya_loras
from modules.engine.networks import backups
from modules.engine.networks.merge import NetworkMerger, NetworkUse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return two_kohya_loras(tmp_path_factory.mktemp("lora-backups"))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 700), (64, 32, 3, 3), (70000,)])
def test_large_copy_is_an_own_mapping_with_the_same_bits(dtype, shape):
    source = torch.randn(shape).to(dtype)
    copied = backups.cpu_copy(source)
    assert backups.lives_in_own_mapping(copied) == (source.numel() * source.element_size()
                                                    >= backups.OWN_MAPPING_MIN_BYTES)
    assert copied.dtype == dtype and copied.shape == source.shape and torch.equal(copied, source)
    source.add_(1)   # a copy, not a view
    assert not torch.equal(copied, source)


def test_small_and_empty_tensors_use_the_ordinary_allocator(monkeypatch):
    small = torch.randn(4, 4)
    assert not backups.lives_in_own_mapping(backups.cpu_copy(small))
    monkeypatch.setattr(backups, "OWN_MAPPING_MIN_BYTES", 0)
    assert backups.cpu_copy(torch.empty(0, 3)).shape == (0, 3)


def test_mapped_backup_is_freed_with_its_tensor():
    copied = backups.cpu_copy(torch.randn(512, 512))
    storage = weakref.ref(copied.untyped_storage())
    assert backups.lives_in_own_mapping(copied)
    del copied
    gc.collect()
    assert storage() is None


def test_switch_and_restore_stay_exact_with_every_backup_mapped(tiny, monkeypatch):
    monkeypatch.setattr(backups, "OWN_MAPPING_MIN_BYTES", 1)   # every non-empty backup takes the mapped path
    pipe = copy.deepcopy(tiny.pipe)
    before = snapshot(pipe)
    merger = NetworkMerger(components(pipe), pipe.unet.config)
    merger.apply([NetworkUse(network(tiny.root, "a"), te=1.0, unet=0.7)])
    assert merger.backups and all(backups.lives_in_own_mapping(w) for w, _ in merger.backups.values())
    assert all(b is None or backups.lives_in_own_mapping(b) for _, b in merger.backups.values())
    merger.apply([NetworkUse(network(tiny.root, "b"))])

    fresh_pipe = copy.deepcopy(tiny.pipe)
    monkeypatch.setattr(backups, "OWN_MAPPING_MIN_BYTES", 1 << 40)   # the reference: ordinary allocations
    NetworkMerger(components(fresh_pipe), fresh_pipe.unet.config).apply([NetworkUse(network(tiny.root, "b"))])
    fresh = snapshot(fresh_pipe)
    assert all(torch.equal(v, fresh[k]) for k, v in snapshot(pipe).items())   # no trace of A

    merger.restore()
    assert not merger.backups
    assert all(torch.equal(v, before[k]) for k, v in snapshot(pipe).items())
