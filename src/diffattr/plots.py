"""Seaborn/matplotlib figures shared by the notebooks, styled for print."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def _to_display(image: torch.Tensor | np.ndarray) -> tuple[np.ndarray, str | None]:
    """[C, H, W] in [-1, 1] → ([H, W] or [H, W, 3] in [0, 1], colormap)."""
    arr = np.asarray(image, dtype=np.float32)
    arr = (np.clip(arr, -1, 1) + 1) / 2
    if arr.shape[0] == 1:
        return arr[0], "gray_r"
    return np.transpose(arr, (1, 2, 0)), None


def image_grid(
    images: torch.Tensor | np.ndarray,
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
    cell: float = 0.9,
) -> plt.Figure:
    """A grid of images [N, C, H, W] in [-1, 1] (grayscale shown dark-on-light)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.3), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            arr, cmap = _to_display(images[i])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def loss_curve(
    loss_history: np.ndarray, window: int = 50, checkpoints: Sequence[int] = ()
) -> plt.Figure:
    """Per-step training loss with a rolling mean; checkpoint steps marked."""
    steps = np.arange(1, len(loss_history) + 1)
    frame = pd.DataFrame({"step": steps, "loss": loss_history})
    frame["rolling mean"] = frame["loss"].rolling(window, min_periods=1).mean()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.lineplot(frame, x="step", y="loss", ax=ax, color="0.75", linewidth=0.6, label="per step")
    sns.lineplot(frame, x="step", y="rolling mean", ax=ax, color="C0", label=f"{window}-step mean")
    for s in checkpoints:
        ax.axvline(s, color="C3", linestyle=":", linewidth=0.8)
    ax.set(yscale="log", xlabel="training step", ylabel="loss")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def checkpoint_samples(samples: dict[int, torch.Tensor], per_row: int = 16) -> plt.Figure:
    """One row of generated samples per checkpoint step (samples: step → [N, C, H, W])."""
    steps = sorted(samples)
    ncols = min(per_row, min(len(v) for v in samples.values()))
    fig, axes = plt.subplots(
        len(steps), ncols, figsize=(0.6 * ncols + 0.8, 0.6 * len(steps) + 0.3), squeeze=False
    )
    for r, step in enumerate(steps):
        for c in range(ncols):
            ax = axes[r, c]
            arr, cmap = _to_display(samples[step][c])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"step {step}", rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path: str | Path) -> None:
    """Save a figure as PNG (dpi 150), creating the folder (returns nothing, so a notebook
    cell ending in it prints nothing but the figure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def norm_over_t(
    grid: np.ndarray,
    norms: np.ndarray,
    replayed: Sequence[tuple[int, float]] = (),
    title: str | None = None,
) -> plt.Figure:
    """One sample's ‖g‖ over timesteps: norms [len(grid), draws]; replayed (t, ‖g‖) marked."""
    frame = pd.DataFrame(
        {
            "t": np.repeat(grid, norms.shape[1]),
            "norm": norms.reshape(-1),
        }
    )
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.lineplot(frame, x="t", y="norm", ax=ax, errorbar=("pi", 100), label="grid (band: draws)")
    for i, (t, value) in enumerate(replayed):
        ax.scatter(
            [t],
            [value],
            color="C3",
            zorder=5,
            marker="*",
            s=90,
            label="replayed training draw" if i == 0 else None,
        )
    ax.set(yscale="log", xlabel="timestep t", ylabel=r"$\|\nabla_\theta \ell\|_2$", title=title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def norm_profiles(
    grid: np.ndarray,
    profiles: dict[int, np.ndarray],
    band_spans: Sequence[Sequence[int]] | None = None,
) -> plt.Figure:
    """Mean ‖g‖ over t with a 10–90% band, one line per checkpoint.

    profiles: checkpoint step → norms [n_samples, len(grid), draws]. band_spans: [start, stop)
    timestep intervals to shade (the large-norm band).
    """
    frames = []
    for step, norms in sorted(profiles.items()):
        n, m, d = norms.shape
        frames.append(
            pd.DataFrame(
                {
                    "t": np.tile(np.repeat(grid, d), n),
                    "norm": norms.reshape(-1),
                    "checkpoint": f"step {step}",
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.lineplot(
        frame,
        x="t",
        y="norm",
        hue="checkpoint",
        estimator="mean",
        errorbar=("pi", 80),
        ax=ax,
        palette="viridis",
    )
    ax.set(yscale="log", xlabel="timestep t", ylabel=r"$\|\nabla_\theta \ell\|_2$ (mean, 10–90%)")
    _shade(ax, band_spans)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def _shade(ax: plt.Axes, spans: Sequence[Sequence[int]] | None, label: str = "large-norm band"):
    for i, (start, stop) in enumerate(spans or []):
        ax.axvspan(start, stop, color="tab:red", alpha=0.1, lw=0, label=label if i == 0 else None)


def norm_vs_topk(
    norm_mass: np.ndarray, counts: dict[str, np.ndarray], rho: dict[str, float], k: int
) -> plt.Figure:
    """One panel per method: each training sample's replayed-gradient norm mass [N] (log x)
    against the number of queries whose top-k it is in (counts: method → [N])."""
    fig, axes = plt.subplots(1, len(counts), figsize=(3.3 * len(counts), 3.0), sharey=False)
    axes = np.atleast_1d(axes)
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(norm_mass))
    for ax, (method, count) in zip(axes, counts.items(), strict=True):
        ax.scatter(norm_mass, count + jitter, s=6, alpha=0.5, lw=0, color="tab:blue")
        ax.set(
            xscale="log",
            xlabel=r"replayed-gradient norm mass $\sum_k \eta_k \|g\|$",
            ylabel=f"# queries with j in top-{k}",
            title=f"{method}: Spearman ρ = {rho[method]:+.2f}",
        )
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor log labels overlap
    fig.tight_layout()
    return fig


def replayed_t_of_proponents(
    t: np.ndarray,
    weights: dict[str, np.ndarray],
    spans: Sequence[Sequence[int]] | None,
    num_train_timesteps: int = 1000,
) -> plt.Figure:
    """Density of the replayed timestep t [N] of each training sample, weighted per curve
    (weights: label → [N], e.g. top-k counts per method; uniform weights = all samples)."""
    fig, ax = plt.subplots(figsize=(6, 3.0))
    bins = np.linspace(0, num_train_timesteps, 21)
    has_t = t >= 0
    for label, w in weights.items():
        ax.hist(
            t[has_t],
            bins=bins,
            weights=w[has_t],
            density=True,
            histtype="step",
            lw=1.8,
            label=label,
        )
    _shade(ax, spans)
    ax.set(xlabel="replayed timestep t (last checkpoint's window)", ylabel="density")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def specificity_curves(sweep: pd.DataFrame, tau: float, k: int) -> plt.Figure:
    """Unique ratio against k (at `tau`) and generally influential count against τ (at `k`),
    one line per method. sweep: rows with method, k, tau, unique_ratio, generally_influential."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.0))
    at_tau = sweep[np.isclose(sweep["tau"], tau)]
    sns.lineplot(at_tau, x="k", y="unique_ratio", hue="method", marker="o", ax=left)
    left.set(xscale="log", xlabel="top-k", ylabel="unique ratio U (higher = more specific)")
    left.set_xticks(sorted(at_tau["k"].unique()))
    left.xaxis.set_major_formatter(plt.ScalarFormatter())
    left.xaxis.set_minor_formatter(plt.NullFormatter())
    at_k = sweep[sweep["k"] == k]
    sns.lineplot(at_k, x="tau", y="generally_influential", hue="method", marker="o", ax=right)
    right.set(xlabel="τ (share of queries)", ylabel=f"generally influential (top-{k})")
    for ax in (left, right):
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def proponents(
    queries: torch.Tensor,
    rows: dict[str, torch.Tensor],
    query_titles: Sequence[str] | None = None,
    cell: float = 0.8,
) -> plt.Figure:
    """Each query [Q, C, H, W] beside its top proponents per method (rows: method →
    [Q, k, C, H, W], best first); one figure row per query, methods side by side."""
    n_query = len(queries)
    k = next(iter(rows.values())).shape[1]
    ncols = 1 + len(rows) * (k + 1)
    fig, axes = plt.subplots(
        n_query, ncols, figsize=(cell * ncols, cell * n_query + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for q in range(n_query):
        image, cmap = _to_display(queries[q])
        axes[q, 0].imshow(image, cmap=cmap, vmin=0, vmax=1)
        if query_titles is not None:
            axes[q, 0].set_title(query_titles[q], fontsize=7)
        for m, (method, images) in enumerate(rows.items()):
            start = 1 + m * (k + 1) + 1
            for r in range(k):
                image, cmap = _to_display(images[q, r])
                axes[q, start + r].imshow(image, cmap=cmap, vmin=0, vmax=1)
                if q == 0:
                    axes[q, start + r].set_title(f"{method} #{r + 1}", fontsize=7)
    fig.tight_layout(pad=0.2)
    return fig


def band_shares(table: pd.DataFrame, base_rate: float, k: int) -> plt.Figure:
    """Share of each method's top-k slots whose replayed draw fell in the large-norm band, with
    its 95% bootstrap interval over queries, per query kind, against the base rate (dashed).
    table: rows with method, queries, topk_slots_in_band, band_ci_low, band_ci_high."""
    kinds = list(dict.fromkeys(table["queries"]))
    fig, axes = plt.subplots(
        1,
        len(kinds),
        figsize=(4.2 * len(kinds), 0.45 * table.method.nunique() + 1.2),
        squeeze=False,
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        sub = table[table["queries"] == kind].reset_index(drop=True)
        y = np.arange(len(sub))
        err = np.vstack(
            [sub.topk_slots_in_band - sub.band_ci_low, sub.band_ci_high - sub.topk_slots_in_band]
        )
        ax.errorbar(sub.topk_slots_in_band, y, xerr=err, fmt="o", color="tab:blue", capsize=3)
        ax.axvline(base_rate, ls="--", color="gray", label=f"base rate {base_rate:.1%}")
        ax.set_yticks(y, sub.method)
        ax.invert_yaxis()
        ax.set(xlabel=f"share of top-{k} slots in the large-norm band", title=f"{kind} queries")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def top_proponents(
    queries: torch.Tensor,
    scores: dict[str, np.ndarray],
    train_images: torch.Tensor,
    k: int = 5,
    query_titles: Sequence[str] | None = None,
) -> plt.Figure:
    """Each query [Q, C, H, W] beside its top-k training images [N, C, H, W] per method
    (scores: method → [Q, N], larger = more proponent)."""
    rows = {}
    for method, values in scores.items():
        top = np.argsort(-values, axis=1, kind="stable")[:, :k]
        rows[method] = train_images[torch.from_numpy(top.reshape(-1))].reshape(
            len(queries), k, *train_images.shape[1:]
        )
    return proponents(queries, rows, query_titles)


def ground_truth_spread(truth) -> plt.Figure:
    """Per query (x, sorted by the full model's loss): each subset's loss (mean over seeds, dots)
    and each single model's (faint), relative to the full model trained on everything."""
    measured = truth.measurements  # [M, R, Q]
    order = np.argsort(truth.full)
    rel = measured[:, :, order] - truth.full[order][None, None]
    fig, ax = plt.subplots(figsize=(7, 3.0))
    q = np.arange(len(order))
    for r in range(rel.shape[1]):
        ax.scatter(np.tile(q, rel.shape[0]), rel[:, r].reshape(-1), s=4, color="gray", alpha=0.25)
    ax.scatter(np.tile(q, rel.shape[0]), rel.mean(axis=1).reshape(-1), s=8, color="tab:blue")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xlabel="query (sorted by the full model's loss)",
        ylabel="loss − full model's loss",
        title="subset means (blue) and single models (gray)",
    )
    fig.tight_layout()
    return fig


def lds_bars(table: pd.DataFrame, ceiling=None) -> plt.Figure:
    """LDS ± SEM per method (held-out damping), the oracle choice as an open marker, and the
    exact-retraining reference as a band."""
    t = table.sort_values("lds").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(t) + 1.2))
    y = np.arange(len(t))
    ax.errorbar(t.lds, y, xerr=t["sem"], fmt="o", color="tab:blue", capsize=3, label="LDS")
    swept = t.oracle_lds.ne(t.lds)
    ax.scatter(
        t.oracle_lds[swept],
        y[swept],
        facecolors="none",
        edgecolors="tab:red",
        label="oracle damping",
    )
    if ceiling is not None:
        ax.axvspan(
            ceiling.mean - ceiling.sem,
            ceiling.mean + ceiling.sem,
            color="gray",
            alpha=0.2,
            label="exact retraining (seed vs rest)",
        )
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(y, t.method)
    ax.set(xlabel="LDS (Spearman, mean ± SEM over queries)")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def lds_vs_damping(curves: dict[str, list[dict]]) -> plt.Figure:
    """LDS (± SEM, all queries) against damping λ, one line per swept method.
    curves: method → [{"damping", "lds", "sem"}]."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for method, points in curves.items():
        lam = np.array([p["damping"] for p in points])
        mean = np.array([np.nan if p["lds"] is None else p["lds"] for p in points], float)
        sem = np.array([np.nan if p["sem"] is None else p["sem"] for p in points], float)
        ax.plot(lam, mean, marker="o", ms=3, label=method)
        ax.fill_between(lam, mean - sem, mean + sem, alpha=0.15)
    ax.set(xscale="log", xlabel="damping λ", ylabel="LDS")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def method_costs(table: pd.DataFrame) -> plt.Figure:
    """Wall-clock seconds each method took in this stage (scoring, and for swept methods every
    damping value), log scale, each bar labelled. table: columns method, seconds."""
    t = table.sort_values("seconds").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(t) + 1.0))
    y = np.arange(len(t))
    seconds = t.seconds.clip(lower=0.01)
    ax.barh(y, seconds, color="tab:gray")
    for i, value in enumerate(t.seconds):
        ax.text(seconds[i] * 1.1, i, f"{value:.2f} s", va="center", fontsize=8)
    ax.set_yticks(y, t.method)
    ax.set(xscale="log", xlabel="seconds (this run, this machine)", xlim=(0.01, seconds.max() * 8))
    fig.tight_layout()
    return fig


def removal_effects(removal: pd.DataFrame) -> plt.Figure:
    """Retraining without top proponents: each query's loss change (retrained without the k
    samples a method ranks highest, minus the model trained on everything) per method, one grey
    line per query joining its removals, and the mean ± SEM over queries in colour.
    removal: columns query, method, k, loss_change."""
    wide = removal.pivot_table(index="query", columns="method", values="loss_change")
    order = ["random"] + sorted(c for c in wide.columns if c != "random")
    wide = wide[[c for c in order if c in wide.columns]]
    x = np.arange(len(wide.columns))
    fig, ax = plt.subplots(figsize=(1.4 * len(x) + 2.2, 3.2))
    for _, row in wide.iterrows():
        ax.plot(x, row.to_numpy(), color="0.7", lw=0.8, marker="o", ms=3, zorder=1)
    n = wide.notna().sum()
    sem = wide.std(ddof=1) / np.sqrt(n.clip(lower=1))
    ax.errorbar(x, wide.mean(), yerr=sem, fmt="D", color="tab:red", capsize=4, zorder=2,
                label="mean ± SEM over queries")  # fmt: skip
    ax.axhline(0, color="k", lw=0.6)
    k = int(removal.k.iloc[0]) if len(removal) else 0
    ax.set_xticks(x, [f"{c}\n(n = {n[c]})" for c in wide.columns])
    ax.set(ylabel=f"query loss change\n(top {k} removed, retrained)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def copy_pairs(
    queries: torch.Tensor, sources: torch.Tensor, ratios: Sequence[float], ncols: int = 8
) -> plt.Figure:
    """Generated copies [C, ...] above their pixel nearest training images [C, ...], each
    titled with d1/d2 (distance to the nearest over the second-nearest training image)."""
    n = len(queries)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        2 * nrows, ncols, figsize=(0.9 * ncols, 1.9 * nrows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, ncols)
        for k, image in enumerate((queries[i], sources[i])):
            arr, cmap = _to_display(image)
            axes[2 * r + k, c].imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[2 * r, c].set_title(f"{ratios[i]:.2f}", fontsize=7)
    fig.suptitle(
        "generated (upper) and its nearest training image (lower); d1/d2 above", fontsize=9
    )
    fig.tight_layout()
    return fig


def copy_ratios(ratios: np.ndarray, threshold: float) -> plt.Figure:
    """Histogram of d1/d2 over the generated samples, the copy threshold dashed."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.hist(ratios, bins=np.linspace(0, 1, 41), color="tab:blue")
    ax.axvline(threshold, ls="--", color="gray", label=f"copy: d1/d2 < {threshold:.2g}")
    ax.set(xlabel="d1/d2 (nearest / second-nearest training image, pixel ℓ2)", ylabel="samples")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def tracing_shares(table: pd.DataFrame, protocols: Sequence[str]) -> plt.Figure:
    """Share of copies whose source ranks first, with 95% intervals, per method (rows) and
    protocol (markers). table: rows with label, protocol, rank1, rank1_low, rank1_high."""
    labels = list(dict.fromkeys(table.label))
    fig, ax = plt.subplots(figsize=(7.2, 0.42 * len(labels) + 1.4))
    palette = sns.color_palette("colorblind", len(protocols))
    markers = "osD^vP*X"
    width = 0.7
    for i, protocol in enumerate(protocols):
        sub = table[table.protocol == protocol].set_index("label")
        sub = sub[sub.rank1.notna()]
        offset = (i - (len(protocols) - 1) / 2) * width / max(len(protocols), 1)
        y = np.array([labels.index(label) for label in sub.index]) + offset
        err = np.clip(np.vstack([sub.rank1 - sub.rank1_low, sub.rank1_high - sub.rank1]), 0, 1)
        ax.errorbar(
            sub.rank1,
            y,
            xerr=err,
            fmt=markers[i % len(markers)],
            color=palette[i],
            capsize=2,
            ms=5,
            label=protocol,
        )
    ax.axvline(0.5, ls=":", color="gray")
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("share of copies whose source ranks first (95% Wilson interval)")
    ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
