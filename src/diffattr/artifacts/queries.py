"""The queries later stages attribute: the generated samples stage 1 saved, then held-out images."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffattr.data.datasets import ImageDataset
from diffattr.diffusion.sampling import load_queries
from diffattr.gradients.items import KIND_GENERATED, KIND_HELDOUT, ItemSet, concat_items, grid_items


@dataclass
class QuerySet:
    """Queries attributed by later stages: generated samples, then held-out images."""

    images: torch.Tensor  # [Q, C, H, W]
    kind: np.ndarray  # [Q] "generated" | "heldout"
    key: np.ndarray  # [Q] int64: the seed (generated) or dataset id (held out)

    def content_hash(self) -> str:
        """Hash of the query images and who they are: a store is tied to its queries."""
        h = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        h.update(json.dumps([self.kind.tolist(), self.key.tolist()]).encode())
        return h.hexdigest()[:16]

    def items(self, timesteps: np.ndarray, draws: int, seed: int) -> ItemSet:
        generated = self.kind == "generated"
        parts = []
        for mask, kind in ((generated, KIND_GENERATED), (~generated, KIND_HELDOUT)):
            if mask.any():
                parts.append(
                    grid_items(
                        self.images[torch.from_numpy(mask)],
                        self.key[mask],
                        kind,
                        timesteps,
                        draws,
                        seed,
                    )
                )
        return concat_items(parts)


def load_query_set(train_dir: Path, heldout: ImageDataset, n_heldout: int) -> QuerySet:
    images, seeds, _ = load_queries(train_dir / "queries.npz")
    held = heldout.subset(heldout.ids[: min(n_heldout, len(heldout))])
    return QuerySet(
        images=torch.cat([images, held.images]),
        kind=np.array(["generated"] * len(images) + ["heldout"] * len(held)),
        key=np.concatenate([np.asarray(seeds, np.int64), held.ids]),
    )
