"""A1111-compatible seeds and noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from modules.engine import rng

SHAPE = (4, 8, 8)


def cpu_randn(seed, shape=SHAPE):
    # A1111's CPU noise definition.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("value", [-1, None, -7, "", "-1", "abc"])
def test_resolve_seed_randomises(value):
    seeds = {rng.resolve_seed(value) for _ in range(8)}
    assert all(0 <= s <= 4294967293 for s in seeds)
    assert len(seeds) > 1


def test_resolve_seed_keeps_explicit_seeds():
    assert rng.resolve_seed(0) == 0
    assert rng.resolve_seed(1234567890) == 1234567890
    assert rng.resolve_seed("42") == 42


def test_batch_seeds_consecutive():
    assert rng.batch_seeds(100, n_iter=2, batch_size=3) == [100, 101, 102, 103, 104, 105]
    assert rng.batch_subseeds(7, 1, 3) == [7, 8, 9]
    # with a variation seed A1111 keeps the seed and advances only the subseeds
    assert rng.batch_seeds(100, 2, 2, subseed_strength=0.3) == [100] * 4
    random_run = rng.batch_seeds(-1, 1, 4)
    assert random_run == list(range(random_run[0], random_run[0] + 4))


# ---------------------------------------------------------------- noise


def test_cpu_noise_is_torch_randn_per_seed():
    noise = rng.create_noise(SHAPE, [5, 6, 1234567890])
    assert noise.shape == (3, *SHAPE) and noise.dtype == torch.float32
    for i, seed in enumerate([5, 6, 1234567890]):
        assert torch.equal(noise[i], cpu_randn(seed))


def test_same_seed_same_noise_different_seed_different():
    assert torch.equal(rng.create_noise(SHAPE, [3]), rng.create_noise(SHAPE, [3]))
    assert not torch.equal(rng.create_noise(SHAPE, [3]), rng.create_noise(SHAPE, [4]))


def test_gpu_source_on_cpu_device_equals_cpu_source():
    assert torch.equal(rng.create_noise(SHAPE, [9], source="GPU"), rng.create_noise(SHAPE, [9], source="CPU"))


def test_dtype_and_device():
    noise = rng.create_noise(SHAPE, [1], dtype=torch.float16, device="cpu")
    assert noise.dtype == torch.float16 and noise.device.type == "cpu"


def test_bad_arguments():
    with pytest.raises(ValueError, match="RNG source"):
        rng.create_noise(SHAPE, [1], source="quantum")
    with pytest.raises(ValueError, match="shape"):
        rng.create_noise((1, *SHAPE), [1])


# ---------------------------------------------------------------- variation seeds


def test_subseed_strength_zero_is_no_subseed():
    plain = rng.create_noise(SHAPE, [11, 12])
    assert torch.equal(rng.create_noise(SHAPE, [11, 12], subseeds=[50, 51], subseed_strength=0.0), plain)


def test_subseed_strength_one_is_the_subseed_noise():
    noise = rng.create_noise(SHAPE, [11, 12], subseeds=[50, 51], subseed_strength=1.0)
    torch.testing.assert_close(noise[0], cpu_randn(50), atol=1e-5, rtol=0)
    torch.testing.assert_close(noise[1], cpu_randn(51), atol=1e-5, rtol=0)


def test_subseed_blend_lies_between():
    mid = rng.create_noise(SHAPE, [11], subseeds=[50], subseed_strength=0.5)[0]
    a, b = cpu_randn(11), cpu_randn(50)
    assert not torch.allclose(mid, a) and not torch.allclose(mid, b)
    # slerp keeps the magnitude of unit-variance noise (lerp would shrink it by ~0.7)
    assert 0.85 < mid.std().item() < 1.15
    # and the expected per-column slerp value
    an = a / a.norm(dim=1, keepdim=True)
    bn = b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((an * bn).sum(1))
    w = (torch.sin(0.5 * omega) / torch.sin(omega)).unsqueeze(1)
    torch.testing.assert_close(mid, w * a + w * b)


def test_missing_subseed_defaults_to_zero():
    noise = rng.create_noise(SHAPE, [11, 12], subseeds=[50], subseed_strength=1.0)
    torch.testing.assert_close(noise[1], cpu_randn(0), atol=1e-5, rtol=0)


def test_slerp_endpoints_and_parallel_fallback():
    a, b = cpu_randn(1), cpu_randn(2)
    torch.testing.assert_close(rng.slerp(0.0, a, b), a)
    torch.testing.assert_close(rng.slerp(1.0, a, b), b, atol=1e-5, rtol=0)
    # identical vectors: lerp path, no division by sin(0)
    out = rng.slerp(0.3, a, a.clone())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, a)


# ---------------------------------------------------------------- seed resize


def test_seed_resize_smaller_source_is_pasted_centred():
    # target 64x64 px -> latent 8x8; from 32 wide x 48 high -> latent 6 high x 4 wide
    noise = rng.create_noise(SHAPE, [21], seed_resize_from=(32, 48))[0]
    src = cpu_randn(21, (4, 6, 4))
    full = cpu_randn(21, SHAPE)
    dy, dx = (8 - 6) // 2, (8 - 4) // 2
    assert torch.equal(noise[:, dy:dy + 6, dx:dx + 4], src)
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[:, dy:dy + 6, dx:dx + 4] = False
    assert torch.equal(noise[mask], full[mask])


def test_seed_resize_larger_source_is_cropped_centred():
    noise = rng.create_noise(SHAPE, [21], seed_resize_from=(96, 80))[0]  # latent 10 high x 12 wide
    src = cpu_randn(21, (4, 10, 12))
    assert torch.equal(noise, src[:, 1:9, 2:10])


def test_seed_resize_odd_difference_keeps_one_line_of_target_noise():
    noise = rng.create_noise(SHAPE, [21], seed_resize_from=(88, 88))[0]  # latent 11x11
    src, full = cpu_randn(21, (4, 11, 11)), cpu_randn(21, SHAPE)
    # d = (8 - 11) // 2 = -2 -> a 7x7 crop starting at 2, pasted at 0
    assert torch.equal(noise[:, :7, :7], src[:, 2:9, 2:9])
    assert torch.equal(noise[:, 7, :], full[:, 7, :])
    assert torch.equal(noise[:, :, 7], full[:, :, 7])


def test_seed_resize_same_size_or_unset_is_plain_noise():
    plain = rng.create_noise(SHAPE, [21])
    assert torch.equal(rng.create_noise(SHAPE, [21], seed_resize_from=(64, 64)), plain)
    assert torch.equal(rng.create_noise(SHAPE, [21], seed_resize_from=(0, 48)), plain)


def test_seed_resize_with_subseed_blends_at_source_size():
    noise = rng.create_noise(SHAPE, [21], subseeds=[5], subseed_strength=1.0, seed_resize_from=(32, 32))[0]
    torch.testing.assert_close(noise[:, 2:6, 2:6], cpu_randn(5, (4, 4, 4)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- step noise


def test_step_generators_continue_each_seed_stream():
    r = rng.ImageRNG(SHAPE, seeds=[31, 32])
    r.first()
    # what diffusers draws for step noise with generator=[...]
    step = randn_tensor((2, *SHAPE), generator=r.generators, device=torch.device("cpu"), dtype=torch.float32)
    for i, seed in enumerate([31, 32]):
        g = torch.Generator().manual_seed(seed)
        torch.randn(SHAPE, generator=g)  # the initial latent
        assert torch.equal(step[i], torch.randn(SHAPE, generator=g))


def test_next_matches_generators_and_resize_does_not_shift_stream():
    a = rng.ImageRNG(SHAPE, seeds=[31])
    b = rng.ImageRNG(SHAPE, seeds=[31], seed_resize_from=(32, 32))
    a.first()
    b.first()
    assert torch.equal(a.next(), b.next())


def test_eta_noise_seed_delta_reseeds_step_generators():
    r = rng.ImageRNG(SHAPE, seeds=[31], eta_noise_seed_delta=31337)
    init = r.first()
    assert torch.equal(init[0], cpu_randn(31))
    assert torch.equal(r.next()[0], cpu_randn(31 + 31337))


def test_generators_for():
    gens = rng.generators_for([1, 2], "cpu", offset=10)
    assert torch.equal(torch.randn(3, generator=gens[0]), torch.randn(3, generator=torch.Generator().manual_seed(11)))
    assert len(gens) == 2


# ---------------------------------------------------------------- NV (Philox)


# Random123's published known-answer vectors for Philox4x32-10.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    out = rng.philox4x32_10(np.array(ctr, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32)[:, None])
    assert tuple(int(v) for v in out[:, 0]) == expected


def test_nv_first_value_is_box_muller_of_the_zero_kat():
    # seed 0, first draw, element 0 -> counter (0,0,0,0), key (0,0): first KAT above
    x, y = 0x6627E8D5, 0xE169C58D
    c = 2.3283064e-10
    u, v = x * c + c / 2, y * c * 6.2831855 + c * 6.2831855 / 2
    expected = np.sqrt(-2 * np.log(u)) * np.sin(v)
    assert rng.PhiloxGenerator(0).randn((1,))[0] == pytest.approx(expected, abs=1e-6)


def test_nv_matches_published_nvidia_randn():
    # torch.randn((8, 8), device="cuda") after seeding 0, as printed on an NVIDIA
    # GPU (first two rows, 4 decimals).
    published = [
        [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284],
        [-1.0745, -0.3631, -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820],
    ]
    ours = rng.PhiloxGenerator(0).randn((8, 8))[:2]
    np.testing.assert_allclose(ours, published, atol=6e-5)


def test_nv_noise_deterministic_and_advances():
    g = rng.PhiloxGenerator(123)
    first, second = g.randn(SHAPE), g.randn(SHAPE)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, rng.PhiloxGenerator(123).randn(SHAPE))
    noise = rng.create_noise(SHAPE, [123, 124], source="NV")
    assert torch.equal(noise[0], torch.from_numpy(first))
    assert not torch.equal(noise[0], noise[1])
    big = rng.PhiloxGenerator(7).randn((4, 64, 64))
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


def test_nv_step_noise_falls_back_to_cpu_generators():
    r = rng.ImageRNG(SHAPE, seeds=[5], source="nv")
    r.first()
    assert r.generators[0].device.type == "cpu"
    assert torch.equal(torch.randn(SHAPE, generator=r.generators[0]), cpu_randn(5))
    # next() continues the Philox stream (A1111's NV step noise) for custom loops
    assert torch.equal(r.next()[0], torch.from_numpy(_philox_draw(5, 2)))


def _philox_draw(seed, k):
    g = rng.PhiloxGenerator(seed)
    for _ in range(k - 1):
        g.randn(SHAPE)
    return g.randn(SHAPE)
