"""Tests of diffattr.projection: the hash against independent references, every projector against
a brute-force reference, determinism, block-size independence, and JL-type norm preservation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffattr import rng as keyed
from diffattr.gradients import projection as proj
from diffattr.gradients.projection import (
    PROJECTION_KINDS,
    DenseProjector,
    IdentityProjector,
    SparseSketchProjector,
    make_projector,
    projector_from_settings,
)
from diffattr.rng import Tag

RANDOM_KINDS = ("sparse", "gaussian", "rademacher")

# --------------------------------------------------------------------------------------------
# Independent references of the hash: pure Python ints and numpy uint64 (wrapping multiply).

M32 = 0xFFFFFFFF


def py_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    x ^= x >> 15
    return x


def np_mix32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    mask = np.uint64(M32)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x21F0AAAD)) & mask  # uint64 products wrap mod 2^64; mask keeps mod 2^32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x735A2D97)) & mask
    return x ^ (x >> np.uint64(15))


def np_hash(seed: int, tag: int, index: np.ndarray) -> np.ndarray:
    """Hash of the words (seed_lo, seed_hi, tag, index): h <- mix32(h ^ word), h0 = 0x243F6A88."""
    h = 0x243F6A88
    for word in (seed % 2**32, seed // 2**32, tag):
        h = py_mix32(h ^ word)
    return np_mix32(np.uint64(h) ^ np.asarray(index, dtype=np.uint64))


def reference_sparse(g: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Count sketch by an explicit loop over coordinates. g: [B, D] -> [B, k] (float64)."""
    out = np.zeros((g.shape[0], k))
    for i in range(g.shape[1]):
        bucket = (int(np_hash(seed, Tag.SPARSE_BUCKET, np.array([i]))[0]) * k) >> 32
        sign = 1 - 2 * (int(np_hash(seed, Tag.SPARSE_SIGN, np.array([i]))[0]) >> 31)
        out[:, bucket] += sign * g[:, i]
    return out


def reference_dense(kind: str, d: int, k: int, seed: int) -> np.ndarray:
    """The whole [d, k] matrix, built entry by entry from the reference hash (tiny d only)."""
    p = np.zeros((d, k))
    if kind == "rademacher":
        for i in range(d):
            a = np_hash(seed, Tag.RADEMACHER_ROW, np.array([i]))[0]
            for j in range(k):
                b = np_hash(seed, Tag.RADEMACHER_COL, np.array([j]))[0]
                p[i, j] = 1.0 - 2.0 * float(np_mix32(a ^ b) >> np.uint64(31))
    else:
        for i in range(d):
            a = np_hash(seed, Tag.GAUSSIAN_ROW, np.array([i]))[0]
            for j in range(k):
                pair = np.array([j // 2])
                h1, h2 = (
                    np_hash(seed, Tag.GAUSSIAN_COL_U1, pair)[0],
                    np_hash(seed, Tag.GAUSSIAN_COL_U2, pair)[0],
                )
                u1 = (float(np_mix32(a ^ h1)) + 0.5) / 2**32
                u2 = (float(np_mix32(a ^ h2)) + 0.5) / 2**32
                trig = math.cos if j % 2 == 0 else math.sin
                p[i, j] = math.sqrt(-2.0 * math.log(u1)) * trig(2.0 * math.pi * u2)
    return p / math.sqrt(k)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Tests draw their gradients from torch's global generator: make them repeatable."""
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# The hash


def test_mix32_matches_python_and_numpy_references(rng):
    x = np.concatenate([[0, 1, 2**31 - 1, 2**31, 2**32 - 1], rng.integers(0, 2**32, 2000)])
    got = keyed.mix32(torch.from_numpy(x.astype(np.int64))).numpy()
    assert got.dtype == np.int64 and got.min() >= 0 and got.max() < 2**32
    np.testing.assert_array_equal(got.astype(np.uint64), np_mix32(x))
    for value in x[:50]:
        assert keyed.mix32_int(int(value)) == py_mix32(int(value))


def test_mix32_output_bits_are_balanced():
    h = keyed.mix32(torch.arange(2**16))
    bits = torch.stack([(h >> b) & 1 for b in range(32)]).double().mean(dim=1)
    assert torch.all((bits - 0.5).abs() < 0.01), bits
    assert h.unique().numel() == 2**16  # a bijection


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**64 - 1])
@pytest.mark.parametrize("tag", [1, 6])
def test_hash_index_matches_reference(seed, tag, rng):
    index = np.concatenate([[0, 2**32 - 1], rng.integers(0, 2**32, 500)])
    got = keyed.hash_index(seed, tag, torch.from_numpy(index.astype(np.int64))).numpy()
    np.testing.assert_array_equal(got.astype(np.uint64), np_hash(seed, tag, index))


# --------------------------------------------------------------------------------------------
# Each projector against its reference


@pytest.mark.parametrize("method", ["index_add", "segment"])
@pytest.mark.parametrize("block_size", [None, 8])
def test_sparse_matches_bruteforce_loop(method, block_size, rng):
    d, k, seed = 60, 7, 3
    g = rng.standard_normal((4, d))
    p = SparseSketchProjector(d, k, seed, block_size=block_size)
    got = p.project(torch.from_numpy(g).float(), method=method)
    np.testing.assert_allclose(got.numpy(), reference_sparse(g, k, seed), rtol=1e-5, atol=1e-5)


def test_sparse_tables_are_buckets_in_range_and_unit_signs():
    bucket, sign = SparseSketchProjector(5000, 37, 0).buckets_and_signs()
    assert bucket.dtype == torch.int64 and sign.dtype == torch.int8
    assert bucket.min() >= 0 and bucket.max() < 37
    assert set(sign.unique().tolist()) == {-1, 1}
    counts = torch.bincount(bucket, minlength=37).double()
    assert counts.min() > 0.6 * 5000 / 37  # every bucket used, roughly evenly


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k", [9, 10])
def test_dense_matches_reference_matrix(kind, k, rng):
    d, seed = 13, 5
    p = DenseProjector(d, k, seed, kind=kind, block_size=4)
    ref = reference_dense(kind, d, k, seed)
    np.testing.assert_allclose(p.matrix_block(0, d).numpy(), ref, rtol=1e-6, atol=1e-7)
    g = rng.standard_normal((3, d))
    got = p.project(torch.from_numpy(g).float())
    np.testing.assert_allclose(got.numpy(), g @ ref, rtol=1e-5, atol=1e-5)


def test_rademacher_entries_are_exactly_plus_minus_one_over_sqrt_k():
    block = DenseProjector(50, 64, 0, kind="rademacher").matrix_block(0, 50)
    assert set(block.unique().tolist()) == {-0.125, 0.125}


def test_gaussian_entries_have_standard_normal_moments():
    k = 512
    z = DenseProjector(400, k, 0).matrix_block(0, 400).double().flatten() * math.sqrt(k)
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1.0) < 0.02
    assert abs((z**4).mean() / z.var() ** 2 - 3.0) < 0.1


def test_identity_returns_input():
    g = torch.randn(3, 11)
    p = make_projector("none", 11, None, seed=0)
    assert isinstance(p, IdentityProjector) and p.dim_out == 11
    assert p.project(g) is g
    assert p.project(g.half()).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Determinism and block sizes


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_same_output_across_calls_and_objects(kind):
    g = torch.randn(5, 300)
    first = make_projector(kind, 300, 32, seed=7)
    out = first.project(g)
    assert torch.equal(out, first.project(g))
    assert torch.equal(out, make_projector(kind, 300, 32, seed=7).project(g))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_different_seed_gives_different_output(kind):
    g = torch.randn(5, 300)
    a = make_projector(kind, 300, 32, seed=7).project(g)
    b = make_projector(kind, 300, 32, seed=8).project(g)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_block_size_does_not_change_result(kind, monkeypatch):
    g = torch.randn(6, 500)
    small = DenseProjector(500, 48, 1, kind=kind, block_size=7)
    large = DenseProjector(500, 48, 1, kind=kind, block_size=1000)
    torch.testing.assert_close(small.project(g), large.project(g), rtol=1e-5, atol=1e-5)
    # Entries themselves are exact, whatever the block and the generation chunk.
    whole = large.matrix_block(0, 500)
    monkeypatch.setattr(proj, "_GEN_ENTRIES_CPU", 480)  # 10 rows a chunk
    pieces = torch.cat([small.matrix_block(s, min(500, s + 7)) for s in range(0, 500, 7)])
    assert torch.equal(whole, pieces)


def test_sparse_block_size_does_not_change_result_on_cpu():
    g = torch.randn(6, 1000)
    a = SparseSketchProjector(1000, 32, 1, block_size=7).project(g)
    b = SparseSketchProjector(1000, 32, 1).project(g)
    assert torch.equal(a, b)
    torch.testing.assert_close(
        SparseSketchProjector(1000, 32, 1, block_size=7).project(g, method="segment"), b
    )


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_sample_projection_does_not_depend_on_batch(kind):
    g = torch.randn(8, 400)
    p = make_projector(kind, 400, 24, seed=2)
    # Equal up to rounding: BLAS may sum in another order for another batch size.
    torch.testing.assert_close(p.project(g)[3:4], p.project(g[3:4]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_projector_rebuilt_from_settings_gives_same_output(kind):
    g = torch.randn(4, 200)
    p = make_projector(kind, 200, 200 if kind == "none" else 16, seed=11)
    settings = json.loads(json.dumps(p.settings()))
    assert {"kind", "dim_in", "dim_out", "seed"} <= settings.keys()
    assert settings["kind"] == kind
    rebuilt = projector_from_settings(settings)
    assert rebuilt.settings() == p.settings()
    assert torch.equal(p.project(g), rebuilt.project(g))


def test_settings_of_another_hash_scheme_are_refused():
    settings = make_projector("sparse", 20, 4, seed=0).settings()
    with pytest.raises(ValueError, match="hash scheme 0"):
        projector_from_settings({**settings, "hash_scheme": 0})


# --------------------------------------------------------------------------------------------
# Johnson–Lindenstrauss behaviour


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_norms_and_inner_products_are_preserved(kind):
    d, k, n = 20_000, 2048, 48
    gen = torch.Generator().manual_seed(0)
    # Correlated rows with unequal scales, so inner products are far from zero.
    base = torch.randn(n, d, generator=gen)
    g = (base + 0.8 * base[:1]) * torch.linspace(0.5, 3.0, n)[:, None]
    y = make_projector(kind, d, k, seed=3).project(g).double()
    g = g.double()
    rel = y.square().sum(1) / g.square().sum(1) - 1.0
    tol = math.sqrt(2.0 / k)
    assert abs(rel.mean()) < 4 * tol / math.sqrt(n)
    assert rel.abs().max() < 5 * tol
    gram, gram_proj = g @ g.T, y @ y.T
    norms = g.norm(dim=1)
    cos_err = (gram_proj - gram) / (norms[:, None] * norms[None, :])
    assert cos_err.abs().max() < 5 * tol
    assert torch.linalg.norm(gram_proj - gram) / torch.linalg.norm(gram) < 2 * tol


# --------------------------------------------------------------------------------------------
# Dtypes, devices, errors


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_output_dtype_is_float32_or_float64(kind):
    p = make_projector(kind, 50, 8, seed=0)
    assert p.project(torch.randn(2, 50).half()).dtype == torch.float32
    assert p.project(torch.randn(2, 50).bfloat16()).dtype == torch.float32
    g64 = torch.randn(2, 50, dtype=torch.float64)
    out64 = p.project(g64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), p.project(g64.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_cuda_matches_cpu(kind):
    g = torch.randn(4, 3000)
    p = make_projector(kind, 3000, 64, seed=9)
    if kind == "sparse":
        for cpu, cuda in zip(p.buckets_and_signs("cpu"), p.buckets_and_signs("cuda"), strict=True):
            assert torch.equal(cpu, cuda.cpu())
    else:
        cpu, cuda = p.matrix_block(0, 3000), p.matrix_block(0, 3000, device="cuda").cpu()
        if kind == "rademacher":
            assert torch.equal(cpu, cuda)
        else:
            assert (cpu != cuda).sum() <= 2
            torch.testing.assert_close(cpu, cuda, rtol=1e-6, atol=1e-7)
    out = p.project(g.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), p.project(g), rtol=1e-4, atol=1e-4)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="sparse.*gaussian.*rademacher.*none"):
        make_projector("fjlt", 10, 4, seed=0)


@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_wrong_input_shape_says_expected_and_got(kind):
    p = make_projector(kind, 10, 10 if kind == "none" else 4, seed=0)
    with pytest.raises(ValueError, match=r"expected .*\[B, 10\].*got \[3, 9\]"):
        p.project(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"got \[10\]"):
        p.project(torch.randn(10))
    with pytest.raises(ValueError, match="floating-point"):
        p.project(torch.ones(2, 10, dtype=torch.int64))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_bad_dimensions_and_seeds_are_refused(kind):
    with pytest.raises(ValueError, match="dim_out"):
        make_projector(kind, 10, 0, seed=0)
    with pytest.raises(ValueError, match="dim_in"):
        make_projector(kind, 0, 4, seed=0)
    with pytest.raises(ValueError, match="seed"):
        make_projector(kind, 10, 4, seed=-1)
    with pytest.raises(ValueError, match="needs dim_out"):
        make_projector(kind, 10, None, seed=0)


def test_none_kind_refuses_a_different_dim_out():
    with pytest.raises(ValueError, match="keeps all 10 coordinates"):
        make_projector("none", 10, 4, seed=0)
