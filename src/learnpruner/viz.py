"""Pictures: accuracy against tokens, and which image patches each stage kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .utils import atomic_write

__all__ = ["plot_accuracy", "overlay_kept"]


def plot_accuracy(records: list[dict], path: str | os.PathLike) -> None:
    """Accuracy (%) against visual tokens, one line per method; the unpruned model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=110)
    none = next((r for r in records if r["method"] == "none" and r.get("accuracy") is not None), None)
    if none is not None:
        ax.axhline(100 * none["accuracy"], color="black", ls="--", lw=1, label="none (all tokens)")
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if m != "none"]
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    markers = "os^Dvp<>hX*P"
    for i, m in enumerate(methods):
        pts = sorted((r["tokens"], 100 * r["accuracy"]) for r in records
                     if r["method"] == m and r.get("accuracy") is not None and r["status"] == "ok")
        if pts:
            xs, ys = zip(*pts)
            main = m == "learnpruner"  # this library's method stands out
            ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)], label=m,
                    lw=2.6 if main else 1.4, ms=6 if main else 4.5, zorder=3 if main else 2)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tokens"] for r in records if r["method"] != "none"})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("visual tokens (average per LLM layer)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def overlay_kept(image, panels: list[tuple[str, object, object]], grid: int, path: str | os.PathLike,
                 title: str = "") -> None:
    """Save ``image`` once per panel with the patch grid shaded by what each stage kept.

    Each panel is ``(label, stage1_kept, stage2_kept)``: 1D index tensors (``None``: the stage did
    not run) over a ``grid x grid`` patch grid in row-major order. Patches stage 1 dropped are
    darkened; patches stage 2 kept are outlined in red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    h, w = arr.shape[:2]
    ph, pw = h / grid, w / grid
    n = grid * grid
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.9), dpi=100, squeeze=False)
    for ax, (label, stage1_kept, stage2_kept) in zip(axes[0], panels):
        s1 = np.ones(n, dtype=bool) if stage1_kept is None else np.isin(np.arange(n), np.asarray(stage1_kept))
        shade = np.where(s1, 1.0, 0.22).reshape(grid, grid)
        shade = np.kron(shade, np.ones((int(np.ceil(ph)), int(np.ceil(pw)))))[:h, :w]
        ax.imshow(arr * shade[..., None])
        caption = f"stage 1: {int(s1.sum())}/{n}"
        if stage2_kept is not None:
            for idx in np.asarray(stage2_kept).tolist():
                r, c = divmod(int(idx), grid)
                ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, ec="#ff2d2d", lw=1.0))
            caption += f", stage 2 (red): {len(np.asarray(stage2_kept))}"
        ax.set_title(f"{label}\n{caption}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
