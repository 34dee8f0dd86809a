"""The queries later stages attribute: the generated samples stage 1 saved, then held-out images."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

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
