"""Seeded random projections of per-sample gradients, generated block by block in pure PyTorch.

A projector maps gradients ``g: [B, D]`` to features ``g @ P: [B, k]`` with a random
``P: [D, k]`` that is a pure function of ``(seed, D, k)``. The entries never come from a
``torch.Generator`` (whose CPU and CUDA streams differ): each one is a counter-based integer hash
of ``(seed, row, col)`` computed with int64 tensor ops that never overflow, so the same matrix
comes out on any device. ``P`` is never held whole; it is generated a block of rows at a time on
the gradients' device.

Kinds (``PROJECTION_KINDS``):

- ``"sparse"`` (:class:`SparseSketchProjector`, prefer on CPU): a count sketch. Coordinate ``i``
  is added, with a random sign, to one random output bucket. O(D) work per sample and no matrix
  to generate; the bucket and sign of every coordinate are cached on the device (9 bytes each).
- ``"gaussian"`` / ``"rademacher"`` (:class:`DenseProjector`, prefer on GPU, as TRAK does):
  entries N(0, 1)/√k or ±1/√k, generated per block of rows and multiplied in. O(D·k) work per
  batch to generate ``P`` plus an O(B·D·k) matmul; on a GPU both are fast, on a CPU generating
  ``P`` dominates unless batches are large, so use ``"sparse"`` there.
- ``"none"`` (:class:`IdentityProjector`): no projection, for small models (k = D).

All three random kinds preserve squared norms in expectation, ``E‖Pᵀg‖² = ‖g‖²``, with relative
standard deviation about √(2/k) (Johnson–Lindenstrauss), and hence inner products as well.

Reproducibility: sparse and Rademacher entries are bit-identical on every device; Gaussian
entries are computed in float64 (Box–Muller) and rounded to float32, so they agree unless a
device's ``log``/``cos`` differs in the last float64 bit right at a float32 rounding boundary.
Outputs then agree up to the summation order of the device's matmul / reduction kernels.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from diffattr.rng import Tag, hash_index, mix32_, uniform_open01

PROJECTION_KINDS = ("sparse", "gaussian", "rademacher", "none")

# Version of the hash and of how entries are derived from it; recorded in `settings()` so that a
# store made with another scheme is refused rather than silently mixed.
HASH_SCHEME = 2  # 2: tags from diffattr.rng.Tag

# Default size of one float32 block of P in the dense projector ([block_size, k], 64 MB).
_BLOCK_BYTES = 64 * 2**20
# Dense entries generated at once (about 32 bytes of temporaries each): moderate on CPU, where
# smaller chunks fit the cache but pay one thread-pool round per elementwise op (ruinous when
# other processes share the cores), larger on accelerators (fewer kernel launches). A block and
# its temporaries stay under about 256 MB.
_GEN_ENTRIES_CPU = 2**21
_GEN_ENTRIES_ACCEL = 2**22
_SPARSE_DEFAULT_BLOCK = 2**20
_TABLE_BLOCK = 2**22


# --------------------------------------------------------------------------------------------
# Projectors


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed


def _check_dim(name: str, value: int, upper: int = 2**32) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not 1 <= value < upper:
        raise ValueError(f"{name} must be in [1, {upper}), got {value}")
    return value


def _accumulate_dtype(g: torch.Tensor) -> torch.dtype:
    """float64 gradients stay float64; every other float dtype accumulates in float32."""
    return torch.float64 if g.dtype == torch.float64 else torch.float32


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


class Projector(ABC):
    """Maps per-sample gradients ``[B, dim_in]`` to features ``[B, dim_out]``.

    The map is a pure function of ``settings()``; ``project`` returns float32 features (float64
    if the gradients are float64) on the gradients' device.
    """

    kind: str
    dim_in: int
    dim_out: int
    seed: int

    def _check_input(self, g: torch.Tensor) -> None:
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor of shape [B, {self.dim_in}], got {type(g)}")
        if g.ndim != 2 or g.shape[1] != self.dim_in:
            raise ValueError(
                f"expected gradients of shape [B, {self.dim_in}] (batch, parameters), "
                f"got {list(g.shape)}"
            )
        if not g.is_floating_point():
            raise ValueError(f"expected floating-point gradients, got {g.dtype}")

    @abstractmethod
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Project gradients ``g: [B, dim_in]`` to ``[B, dim_out]`` on ``g.device``."""

    def settings(self) -> dict:
        """JSON-able settings that determine the projection (store them beside the features)."""
        return {
            "kind": self.kind,
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "seed": self.seed,
            "hash_scheme": HASH_SCHEME,
        }

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        return self.project(g)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class IdentityProjector(Projector):
    """No projection (``kind="none"``): features are the gradients themselves, k = D.

    Half-precision gradients are returned as float32; float32/float64 ones unchanged (same
    tensor).
    """

    kind = "none"

    def __init__(self, dim_in: int, seed: int = 0):
        self.dim_in = _check_dim("dim_in", dim_in, upper=2**63)
        self.dim_out = self.dim_in
        self.seed = _check_seed(seed)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        self._check_input(g)
        return g if g.dtype in (torch.float32, torch.float64) else g.float()


class SparseSketchProjector(Projector):
    """Count sketch / sparse JL (``kind="sparse"``), the CPU default.

    Coordinate ``i`` of ``g`` goes to bucket ``h(i) ∈ [0, k)`` with sign ``s(i) ∈ {±1}``:
    ``out[:, h(i)] += s(i) · g[:, i]``. ``E‖out‖² = ‖g‖²`` without scaling. With
    ``u = hash_index(seed, tag, i)``: ``h(i) = (u_bucket · k) >> 32`` and
    ``s(i) = 1 − 2·(u_sign >> 31)``.

    block_size: input coordinates handled at once (bounds temporaries to ``B × block_size``).
    On CPU the sums run in coordinate order whatever the block size; on CUDA a sort-based
    segment sum per block replaces atomics so repeated runs give the same bits (its rounding
    depends on the block size).
    """

    kind = "sparse"

    def __init__(self, dim_in: int, dim_out: int, seed: int, block_size: int | None = None):
        self.dim_in = _check_dim("dim_in", dim_in)
        self.dim_out = _check_dim("dim_out", dim_out, upper=2**31)
        self.seed = _check_seed(seed)
        self.block_size = _check_dim(
            "block_size", _SPARSE_DEFAULT_BLOCK if block_size is None else block_size, 2**63
        )
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sorted: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def settings(self) -> dict:
        return {**super().settings(), "block_size": self.block_size}

    def buckets_and_signs(
        self, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket ``[dim_in]`` int64 in [0, dim_out) and sign ``[dim_in]`` int8 in {±1}.

        Computed block by block on ``device`` and cached there.
        """
        device = torch.device(device)
        if device not in self._tables:
            bucket = torch.empty(self.dim_in, dtype=torch.int64, device=device)
            sign = torch.empty(self.dim_in, dtype=torch.int8, device=device)
            for start, stop in _blocks(self.dim_in, _TABLE_BLOCK):
                idx = torch.arange(start, stop, dtype=torch.int64, device=device)
                u = hash_index(self.seed, Tag.SPARSE_BUCKET, idx)
                bucket[start:stop] = (u * self.dim_out) >> 32
                u = hash_index(self.seed, Tag.SPARSE_SIGN, idx)
                sign[start:stop] = (1 - 2 * (u >> 31)).to(torch.int8)
            self._tables[device] = (bucket, sign)
        return self._tables[device]

    def _sorted_blocks(
        self, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per input block: (coordinates sorted by bucket, their signs, bucket counts [k])."""
        if device not in self._sorted:
            bucket, sign = self.buckets_and_signs(device)
            blocks = []
            for start, stop in _blocks(self.dim_in, self.block_size):
                order = torch.argsort(bucket[start:stop], stable=True)
                counts = torch.bincount(bucket[start:stop], minlength=self.dim_out)
                blocks.append((order + start, sign[start:stop][order], counts))
            self._sorted[device] = blocks
        return self._sorted[device]

    def project(self, g: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """Sketch ``g: [B, dim_in]`` into ``[B, dim_out]``.

        method: ``"segment"`` (default on CUDA: sort-based, free of atomics, so repeated runs
        give the same bits) or ``"index_add"`` (default elsewhere; sums in coordinate order on
        CPU). Both give the same values up to rounding.
        """
        self._check_input(g)
        method = method or ("segment" if g.device.type == "cuda" else "index_add")
        dtype = _accumulate_dtype(g)
        out = torch.zeros(g.shape[0], self.dim_out, dtype=dtype, device=g.device)
        if method == "index_add":
            bucket, sign = self.buckets_and_signs(g.device)
            for start, stop in _blocks(self.dim_in, self.block_size):
                signed = g[:, start:stop].to(dtype) * sign[start:stop]
                out.index_add_(1, bucket[start:stop], signed)
        elif method == "segment":
            for order, sign, counts in self._sorted_blocks(g.device):
                signed = g.index_select(1, order).to(dtype) * sign
                lengths = counts.expand(g.shape[0], -1)
                out += torch.segment_reduce(signed, "sum", lengths=lengths, axis=1)
        else:
            raise ValueError(f"unknown method {method!r}; expected 'index_add' or 'segment'")
        return out


class DenseProjector(Projector):
    """Dense Gaussian or Rademacher projection (``kind="gaussian"|"rademacher"``), GPU default.

    Entry ``P[i, j]`` (input coordinate i, output j) from the row key ``a_i`` and column keys
    ``b_j`` (``hash_index`` with the kind's tags) as ``mix32(a_i ^ b_j)``:

    - rademacher: ``(1 − 2·(mix32(a_i ^ b_j) >> 31)) / √k``;
    - gaussian: Box–Muller in float64 on the uniforms ``u1 = U(mix32(a_i ^ b1_p))``,
      ``u2 = U(mix32(a_i ^ b2_p))`` of column pair ``p = j // 2``, with ``U(h) = (h + ½)/2^32``:
      ``P[i, 2p] = √(−2 ln u1)·cos(2π u2)/√k`` and ``P[i, 2p+1] = √(−2 ln u1)·sin(2π u2)/√k``.

    block_size: rows of ``P`` per matmul, ``out += g[:, block] @ P[block]`` (default: a 64 MB
    float32 block, 4096 rows for k = 4096). It only changes rounding (the summation order);
    within a block, rows are generated in device-sized chunks that change nothing.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        seed: int,
        kind: str = "gaussian",
        block_size: int | None = None,
    ):
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(
                f"DenseProjector kind must be 'gaussian' or 'rademacher', got {kind!r}"
            )
        self.kind = kind
        self.dim_in = _check_dim("dim_in", dim_in)
        self.dim_out = _check_dim("dim_out", dim_out)
        self.seed = _check_seed(seed)
        if block_size is None:
            block_size = max(1, _BLOCK_BYTES // (4 * self.dim_out))
        self.block_size = _check_dim("block_size", block_size, 2**63)
        self._col_keys: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def settings(self) -> dict:
        return {**super().settings(), "block_size": self.block_size}

    def _columns(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Column keys: rademacher ``(b [k],)``; gaussian ``(b1 [⌈k/2⌉], b2 [⌈k/2⌉])``."""
        if device not in self._col_keys:
            if self.kind == "rademacher":
                cols = torch.arange(self.dim_out, dtype=torch.int64, device=device)
                keys = (hash_index(self.seed, Tag.RADEMACHER_COL, cols),)
            else:
                pairs = torch.arange((self.dim_out + 1) // 2, dtype=torch.int64, device=device)
                keys = (
                    hash_index(self.seed, Tag.GAUSSIAN_COL_U1, pairs),
                    hash_index(self.seed, Tag.GAUSSIAN_COL_U2, pairs),
                )
            self._col_keys[device] = keys
        return self._col_keys[device]

    def matrix_block(
        self,
        start: int,
        stop: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``P``, scaled by 1/√k: ``[stop − start, dim_out]``.

        Generated on ``device`` in chunks of rows sized for it; every entry is a function of
        its (row, col) alone, so the chunking never changes a value.
        """
        if not 0 <= start <= stop <= self.dim_in:
            raise ValueError(f"rows [{start}, {stop}) outside [0, {self.dim_in})")
        device = torch.device(device)
        out = torch.empty(stop - start, self.dim_out, dtype=dtype, device=device)
        entries = _GEN_ENTRIES_CPU if device.type == "cpu" else _GEN_ENTRIES_ACCEL
        for s, e in _blocks(stop - start, max(1, entries // self.dim_out)):
            self._generate_(out[s:e], start + s)
        return out

    def _generate_(self, out: torch.Tensor, start: int) -> None:
        """Fill ``out: [n, dim_out]`` with rows ``[start, start + n)`` of ``P``."""
        n, device = out.shape[0], out.device
        rows = torch.arange(start, start + n, dtype=torch.int64, device=device)
        scale = 1.0 / math.sqrt(self.dim_out)
        if self.kind == "rademacher":
            (b,) = self._columns(device)
            h = hash_index(self.seed, Tag.RADEMACHER_ROW, rows)[:, None] ^ b[None, :]
            mix32_(h)
            h >>= 31
            out.copy_(h)
            out.mul_(-2.0 * scale).add_(scale)  # bit 0 -> +1/√k, bit 1 -> -1/√k
            return
        b1, b2 = self._columns(device)
        a = hash_index(self.seed, Tag.GAUSSIAN_ROW, rows)[:, None]
        radius = uniform_open01(mix32_(a ^ b1[None, :])).log_().mul_(-2.0).sqrt_()
        angle = uniform_open01(mix32_(a ^ b2[None, :])).mul_(2.0 * math.pi)
        z = torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
        del angle
        z.mul_(radius[..., None].mul_(scale))
        out.copy_(z.reshape(n, -1)[:, : self.dim_out])

    def project(self, g: torch.Tensor) -> torch.Tensor:
        self._check_input(g)
        dtype = _accumulate_dtype(g)
        out = torch.zeros(g.shape[0], self.dim_out, dtype=dtype, device=g.device)
        for start, stop in _blocks(self.dim_in, self.block_size):
            block = self.matrix_block(start, stop, device=g.device, dtype=dtype)
            out.addmm_(g[:, start:stop].to(dtype), block)
        return out


def make_projector(kind: str, dim_in: int, dim_out: int | None, seed: int, **kw) -> Projector:
    """Build a projector by kind name (one of ``PROJECTION_KINDS``).

    kind "none" keeps all ``dim_in`` coordinates: ``dim_out`` must be None or ``dim_in``.
    Extra keywords (``block_size``) go to the projector's constructor.
    """
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; valid kinds: {PROJECTION_KINDS}")
    if kind == "none":
        if dim_out is not None and dim_out != dim_in:
            raise ValueError(
                f"projection kind 'none' keeps all {dim_in} coordinates; got dim_out={dim_out} "
                f"(pass dim_out=None or {dim_in}, or choose a kind in {PROJECTION_KINDS[:3]})"
            )
        if kw:
            raise ValueError(f"projection kind 'none' takes no options, got {sorted(kw)}")
        return IdentityProjector(dim_in, seed)
    if dim_out is None:
        raise ValueError(f"projection kind {kind!r} needs dim_out (the projected dimension)")
    if kind == "sparse":
        return SparseSketchProjector(dim_in, dim_out, seed, **kw)
    return DenseProjector(dim_in, dim_out, seed, kind=kind, **kw)


def projector_from_settings(settings: dict) -> Projector:
    """Rebuild the projector that ``Projector.settings()`` describes (e.g. read from a store).

    Raises ValueError if the settings were written with another hash scheme.
    """
    settings = dict(settings)
    scheme = settings.pop("hash_scheme", None)
    if scheme != HASH_SCHEME:
        raise ValueError(
            f"projection settings use hash scheme {scheme!r}, this code implements {HASH_SCHEME}; "
            "the projection cannot be reproduced, recompute the projected features"
        )
    try:
        kind, dim_in, dim_out, seed = (
            settings.pop(k) for k in ("kind", "dim_in", "dim_out", "seed")
        )
    except KeyError as err:
        raise ValueError(f"projection settings lack {err}: {settings}") from err
    return make_projector(kind, dim_in, dim_out, seed, **settings)
