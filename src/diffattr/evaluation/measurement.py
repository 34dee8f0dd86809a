"""The LDS ground truth's measurement m(θ, q): a query's diffusion loss on a model's weights.

m(θ, q) = (1/K) Σ_k ℓ(θ; q, t_k, ε_k), with ℓ the training loss (`diffusion.task`, l2 or l1)
and K draws (t_k, ε_k) keyed by the query's identity alone: (seed, Tag.MEASURE, query kind
code, query key, draw index k). The same query gets the same draws in every model, batch and
position, so differences between retrained models are not Monte-Carlo noise of the draws.

Timesteps: ``t_sampling="stratified"`` (the default) puts draw k of every query uniformly in
the k-th of K equal strata of [0, T): t_k = ⌊(k + u_k)·T/K⌋ with u_k ~ U[0, 1). Each t_k is
not uniform on its own but the mean over the K draws is an unbiased estimate of the loss
averaged over t ~ U[0, T) (the paper's measurement) with a lower variance, since the loss
varies by orders of magnitude with t. ``"uniform"`` draws t_k = ⌊u_k·T⌋ independently.

The noise ε_k is drawn from the same keyed generator after u_k and regenerated on demand, one
batch at a time, so nothing of size [Q, K, C, H, W] is ever held (CIFAR scale is fine).

A stage builds :func:`measurement_draws` once from the query set, then calls :func:`measure`
on every retrained model (its EMA weights), stacking the results to [M, R, Q] for
:func:`diffattr.evaluation.lds.ground_truth`; :meth:`MeasurementDraws.settings` goes in the
provenance of every measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffattr.diffusion.model import predict_eps
from diffattr.diffusion.schedule import add_noise
from diffattr.diffusion.task import LOSS_KINDS, per_sample_loss
from diffattr.gradients.items import KIND_GENERATED, KIND_HELDOUT, KIND_TRAIN, ItemSet
from diffattr.rng import Tag, keyed_generator
from diffattr.storage.checkpoints import settings_hash, weights_hash

# Measurement noise is generated once and kept when all of it fits in this (48 queries × 256
# draws of 8×8 digits: 3 MB; CIFAR-size query sets fall back to generating per batch).
NOISE_CACHE_BYTES = 256 * 2**20
T_SAMPLINGS = ("stratified", "uniform")
KIND_CODES = {"train": KIND_TRAIN, "generated": KIND_GENERATED, "heldout": KIND_HELDOUT}


def kind_codes(kind: Sequence | np.ndarray) -> np.ndarray:
    """Integer kind codes [Q] int64 of query kinds given as names ("generated", "heldout",
    "train", as in `QuerySet.kind`) or already as codes; the same codes key the gradient grid."""
    arr = np.asarray(kind)
    if arr.dtype.kind in "iu":
        bad = sorted(set(arr.tolist()) - set(KIND_CODES.values()))
        if bad:
            raise ValueError(f"unknown query kind codes {bad}; known: {KIND_CODES}")
        return arr.astype(np.int64)
    unknown = sorted({str(k) for k in arr.tolist()} - set(KIND_CODES))
    if unknown:
        raise ValueError(f"unknown query kinds {unknown}; choose among {sorted(KIND_CODES)}")
    return np.array([KIND_CODES[str(k)] for k in arr.tolist()], dtype=np.int64)


def _draw(
    seed: int, kind: int, key: int, k: int, n_draws: int, num_train_timesteps: int, stratified: bool
) -> tuple[int, torch.Generator]:
    """Timestep of draw k of a query, and its generator positioned after it (ε comes next)."""
    gen = keyed_generator(seed, Tag.MEASURE, kind, key, k)
    u = float(torch.rand((), dtype=torch.float64, generator=gen))
    pos = (k + u) / n_draws if stratified else u
    t = min(int(pos * num_train_timesteps), num_train_timesteps - 1)
    return t, gen


@dataclass(frozen=True, eq=False)
class MeasurementDraws:
    """The K (t, ε) draws of each of Q queries, keyed by (kind, key) and regenerated on demand.

    kinds: [Q] int64 kind codes; keys: [Q] int64 (seed of a generated query, dataset id of a
    held-out one); t: [Q, K] int64 in [0, T); image_shape: (C, H, W).
    """

    kinds: np.ndarray
    keys: np.ndarray
    t: np.ndarray
    image_shape: tuple[int, int, int]
    seed: int
    num_train_timesteps: int
    t_sampling: str
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_query(self) -> int:
        return int(self.t.shape[0])

    @property
    def n_draws(self) -> int:
        return int(self.t.shape[1])

    def eps(
        self, queries: Sequence[int] | np.ndarray, draws: Sequence[int] | np.ndarray
    ) -> torch.Tensor:
        """The noise of the (query, draw) pairs (queries[i], draws[i]). Returns [P, C, H, W]
        float32 on the CPU; each pair's noise depends on that query's identity and k alone.

        When all Q·K draws fit in `NOISE_CACHE_BYTES` they are generated once, on the first
        call, and reused by every later call (every model measured on these draws)."""
        q_idx = np.asarray(queries, np.int64)
        k_idx = np.asarray(draws, np.int64)
        table = self._table()
        if table is not None:
            return table[torch.from_numpy(q_idx), torch.from_numpy(k_idx)]
        return self._generate(q_idx, k_idx)

    def _table(self) -> torch.Tensor | None:
        """All draws [Q, K, C, H, W] when they fit in NOISE_CACHE_BYTES (made once), else None."""
        size = self.n_query * self.n_draws * int(np.prod(self.image_shape)) * 4
        if size > NOISE_CACHE_BYTES:
            return None
        if "table" not in self._cache:
            q = np.repeat(np.arange(self.n_query), self.n_draws)
            k = np.tile(np.arange(self.n_draws), self.n_query)
            self._cache["table"] = self._generate(q, k).reshape(
                self.n_query, self.n_draws, *self.image_shape
            )
        return self._cache["table"]

    def _generate(self, queries: np.ndarray, draws: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(queries), *self.image_shape))
        for i, (q, k) in enumerate(zip(queries, draws, strict=True)):
            _, gen = _draw(
                self.seed,
                int(self.kinds[q]),
                int(self.keys[q]),
                int(k),
                self.n_draws,
                self.num_train_timesteps,
                self.t_sampling == "stratified",
            )
            out[i] = torch.randn(self.image_shape, generator=gen)
        return out

    def items(self, images: torch.Tensor) -> ItemSet:
        """The draws as an `ItemSet` over the queries' images [Q, C, H, W] (one column per draw,
        one noise draw per cell): its mean gradient per row is ∇m(θ, q) exactly."""
        expected = (self.n_query, *self.image_shape)
        if tuple(images.shape) != expected:
            raise ValueError(
                f"images must be [Q, C, H, W] = {list(expected)} to match the measurement draws, "
                f"got {list(images.shape)}"
            )
        k = self.n_draws

        def noise(rows: np.ndarray) -> torch.Tensor:
            rows = np.asarray(rows, np.int64)
            eps = self.eps(np.repeat(rows, k), np.tile(np.arange(k), len(rows)))
            return eps.reshape(len(rows), k, 1, *self.image_shape)

        return ItemSet(images, torch.from_numpy(self.t), 1, noise)

    def settings(self, loss_kind: str) -> dict:
        """Provenance of the measurement: everything that defines m(θ, q) besides the queries."""
        if loss_kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss {loss_kind!r}; choose one of {list(LOSS_KINDS)}")
        return {
            "measurement": "loss",
            "loss": loss_kind,
            "draws": self.n_draws,
            "seed": self.seed,
            "num_train_timesteps": self.num_train_timesteps,
            "t_sampling": self.t_sampling,
            "rng": "keyed (seed, Tag.MEASURE, kind code, query key, draw index)",
        }


def measurement_draws(
    kinds: Sequence | np.ndarray,
    keys: Sequence[int] | np.ndarray,
    image_shape: Sequence[int],
    n_draws: int,
    seed: int,
    num_train_timesteps: int = 1000,
    t_sampling: str = "stratified",
) -> MeasurementDraws:
    """The measurement draws of Q queries identified by (kind, key).

    kinds: [Q] names or codes (see :func:`kind_codes`); keys: [Q] int; image_shape: (C, H, W);
    n_draws: K ≥ 1 draws per query; t_sampling: "stratified" (default) or "uniform".
    """
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"unknown t_sampling {t_sampling!r}; choose one of {list(T_SAMPLINGS)}")
    if n_draws < 1:
        raise ValueError(f"a measurement needs ≥ 1 draw per query, got {n_draws}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be ≥ 1, got {num_train_timesteps}")
    codes = kind_codes(kinds)
    key_arr = np.asarray(keys, dtype=np.int64)
    if codes.ndim != 1 or key_arr.shape != codes.shape:
        raise ValueError(
            f"kinds and keys must be 1-D of equal length [Q], got {codes.shape} and {key_arr.shape}"
        )
    pairs = set(zip(codes.tolist(), key_arr.tolist(), strict=True))
    if len(pairs) != len(codes):
        raise ValueError("two queries share a (kind, key): they would get the same draws")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {shape}")
    stratified = t_sampling == "stratified"
    t = np.array(
        [
            [
                _draw(seed, int(c), int(key), k, n_draws, num_train_timesteps, stratified)[0]
                for k in range(n_draws)
            ]
            for c, key in zip(codes, key_arr, strict=True)
        ],
        dtype=np.int64,
    ).reshape(len(codes), n_draws)
    return MeasurementDraws(
        kinds=codes,
        keys=key_arr,
        t=t,
        image_shape=shape,  # type: ignore[arg-type]
        seed=int(seed),
        num_train_timesteps=int(num_train_timesteps),
        t_sampling=t_sampling,
    )


def measure(
    model: torch.nn.Module,
    images: torch.Tensor,
    draws: MeasurementDraws,
    alphas_cumprod: torch.Tensor,
    loss_kind: str = "l2",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """m(θ, q) of every query: its loss averaged over its K draws, on the model's weights.

    model: an ε-prediction UNet holding the weights to measure (pass the EMA weights);
    images: [Q, C, H, W] x0 of the queries in [-1, 1], in the order of `draws`;
    alphas_cumprod: [T] of the training schedule; loss_kind: "l2" or "l1", as trained.
    Runs without gradients in eval mode (the model's mode is restored), batch_size (query,
    draw) pairs at a time. Returns [Q] float64 (the loss is a mean over C·H·W per draw).
    """
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {loss_kind!r}; choose one of {list(LOSS_KINDS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    expected = (draws.n_query, *draws.image_shape)
    if tuple(images.shape) != expected:
        raise ValueError(
            f"images must be [Q, C, H, W] = {list(expected)} to match the measurement draws "
            f"(their queries and image shape), got {list(images.shape)}; build the draws from "
            "the same query set"
        )
    if alphas_cumprod.shape != (draws.num_train_timesteps,):
        raise ValueError(
            f"alphas_cumprod has {tuple(alphas_cumprod.shape)} entries but the draws were made "
            f"for T = {draws.num_train_timesteps}"
        )
    n_pairs = draws.n_query * draws.n_draws
    pair_q = np.repeat(np.arange(draws.n_query), draws.n_draws)
    pair_k = np.tile(np.arange(draws.n_draws), draws.n_query)
    t_flat = torch.from_numpy(draws.t.reshape(-1))
    x0_all = images.to(device)
    totals = np.zeros(draws.n_query, dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(
                range(0, n_pairs, batch_size),
                desc="measure",
                unit="batch",
                disable=not progress,
                leave=False,
            ):
                sl = slice(start, start + batch_size)
                q, k = pair_q[sl], pair_k[sl]
                x0 = x0_all[torch.from_numpy(q).to(x0_all.device)]
                eps = draws.eps(q, k).to(device=x0.device, dtype=x0.dtype)
                t = t_flat[sl].to(x0.device)
                x_t = add_noise(x0, eps, t, alphas_cumprod)
                loss = per_sample_loss(predict_eps(model, x_t, t), eps, loss_kind)
                loss = loss.double().cpu().numpy()
                if not np.isfinite(loss).all():
                    bad = sorted(set(q[~np.isfinite(loss)].tolist()))
                    raise ValueError(
                        f"non-finite loss for queries {bad[:10]}: the model's weights are "
                        "broken (NaN/inf); check its checkpoint"
                    )
                np.add.at(totals, q, loss)
    finally:
        model.train(was_training)
    return totals / draws.n_draws


@dataclass(frozen=True, eq=False)
class QueryMeasurement:
    """m(θ, q) of a fixed query set, as one object a retraining job can apply to the model it
    has just trained (`diffattr.retraining`), saved once next to the model store.

    images: [Q, C, H, W] in [-1, 1]; draws: their K draws each; alphas_cumprod: [T] of the
    training schedule; loss_kind: "l2" | "l1"; queries_hash: the query set's content hash.
    `key` names the measurement in a model's record: the same key means the same numbers.
    """

    images: torch.Tensor
    draws: MeasurementDraws
    alphas_cumprod: torch.Tensor
    loss_kind: str
    queries_hash: str

    @property
    def key(self) -> str:
        return settings_hash(
            {
                "measurement": self.draws.settings(self.loss_kind),
                "queries": self.queries_hash,
                "alphas_cumprod": weights_hash({"a": self.alphas_cumprod}),
            }
        )

    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> np.ndarray:
        """[Q] float64: `measure` on the model's weights (pass its EMA weights)."""
        return measure(
            model, self.images, self.draws, self.alphas_cumprod, self.loss_kind, device=device
        )

    def save(self, folder: str | Path) -> Path:
        """Write to `folder/<key>.pt` (once; an existing file with that key is kept)."""
        path = Path(folder) / f"{self.key}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "images": self.images.cpu(),
                "draws": {k: getattr(self.draws, k) for k in _DRAW_FIELDS},
                "alphas_cumprod": self.alphas_cumprod.cpu(),
                "loss_kind": self.loss_kind,
                "queries_hash": self.queries_hash,
            }
            tmp = path.with_suffix(".tmp")
            torch.save(payload, tmp)
            tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QueryMeasurement:
        """Read a saved measurement; ValueError if the file's content no longer has its key."""
        path = Path(path)
        payload = torch.load(path, weights_only=False)
        draws = MeasurementDraws(**payload.pop("draws"))
        found = cls(draws=draws, **payload)
        if found.key != path.stem:
            raise ValueError(f"{path} holds measurement {found.key}, not {path.stem}: remove it")
        return found


_DRAW_FIELDS = (
    "kinds",
    "keys",
    "t",
    "image_shape",
    "seed",
    "num_train_timesteps",
    "t_sampling",
)
