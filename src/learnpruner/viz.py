"""Pictures: accuracy against tokens, and which image patches each stage kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .utils import atomic_write

__all__ = ["plot_accuracy", "overlay_kept", "crop_pixels", "overlay_image_stats"]


def plot_accuracy(records: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Accuracy (%) against visual tokens, one line per method with its cells' 95% intervals as error bars; the
    unpruned model as a dashed line in its interval's band. Methods sit at small horizontal offsets of one another
    so ties stay visible, each with its own marker; the title names the model, the data and the item count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.8), dpi=110)
    ok = [r for r in records if r.get("accuracy") is not None and r.get("status", "ok") == "ok"]
    none = next((r for r in ok if r["method"] == "none"), None)
    if none is not None:
        ax.axhline(100 * none["accuracy"], color="black", ls="--", lw=1, label="none (all tokens)")
        if none.get("ci"):
            ax.axhspan(100 * none["ci"][0], 100 * none["ci"][1], color="black", alpha=0.07, lw=0)
    methods = [m for m in dict.fromkeys(r["method"] for r in ok) if m != "none"]
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    markers = "osD^vp<>hX*P"
    spread = 0.06  # log2 units between neighbouring methods: ties side by side
    for i, m in enumerate(methods):
        cells = sorted((r for r in ok if r["method"] == m), key=lambda r: r["tokens"])
        if not cells:
            continue
        shift = 2 ** (spread * (i - (len(methods) - 1) / 2))
        xs = [r["tokens"] * shift for r in cells]
        ys = [100 * r["accuracy"] for r in cells]
        lo = [100 * (r["accuracy"] - r["ci"][0]) if r.get("ci") else 0.0 for r in cells]
        hi = [100 * (r["ci"][1] - r["accuracy"]) if r.get("ci") else 0.0 for r in cells]
        main = m.startswith("learnpruner")  # this library's methods stand out
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], color=colors[i % len(colors)], label=m,
                    lw=2.2 if main else 1.2, ms=6 if main else 4.5, capsize=2.5, elinewidth=0.9,
                    zorder=3 if main else 2)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tokens"] for r in ok if r["method"] != "none"})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("visual tokens (average per LLM layer)")
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.grid(alpha=0.3)
    if title is None:
        title = _accuracy_title(ok)
    if title:
        ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _accuracy_title(records: list[dict]) -> str:
    """``model · data · N items`` from the cells' records (what they share; several named where they differ)."""
    models = sorted({Path(str((r.get("model") or {}).get("model") or "?")).name for r in records})
    data = sorted({(r.get("run") or {}).get("data_name") or (r.get("run") or {}).get("data") or "?" for r in records})
    items = sorted({r.get("n") for r in records if r.get("n")})
    count = f"{items[0]} items" if len(items) == 1 else f"{items[0]}-{items[-1]} items" if items else ""
    return " · ".join(x for x in (", ".join(models), "data " + ", ".join(data), count) if x)


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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8), dpi=110, squeeze=False)
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
        ax.set_title(f"{label}\n{caption}", fontsize=10)
        ax.axis("off")
    _save(fig, path, title)


def _save(fig, path, title: str = "", fontsize: int = 9) -> None:
    """Title, layout, an atomic PNG write (the folder made if needed), and the figure closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def crop_pixels(pixel_values, image: int, num_crops: int) -> list[np.ndarray]:
    """The crops the vision encoder saw for one image, as ``[H, W, 3]`` arrays in [0, 1] for display.

    ``pixel_values``: the processor's ``[num_images, 3, H, W]`` (one crop per image) or
    ``[num_images, max_crops, 3, H, W]`` (LLaVA-NeXT); each crop is min-max scaled (normalisation undone
    up to an affine map, which is what a picture needs)."""
    pv = pixel_values[image]
    crops = [pv] if pv.dim() == 3 else [pv[c] for c in range(num_crops)]
    out = []
    for c in crops:
        a = c.detach().float().permute(1, 2, 0).cpu().numpy()
        lo, hi = a.min(), a.max()
        out.append((a - lo) / max(hi - lo, 1e-6))
    return out


def overlay_image_stats(im, pixels: list[np.ndarray], path: str | os.PathLike, title: str = "") -> None:
    """One panel per crop (or frame) of an image: patches stage 1 dropped are darkened, the tokens the last
    LLM layer saw are outlined in red. ``im`` is a :class:`learnpruner.engine.ItemStats`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = im.count
    crops = np.zeros(count, dtype=int) if im.crops is None else im.crops.cpu().numpy()
    patches = np.arange(count) if im.patches is None else im.patches.cpu().numpy()
    s1 = np.ones(count, dtype=bool) if im.stage1_kept is None else np.isin(np.arange(count), im.stage1_kept.cpu())
    final = None if not im.llm_kept else np.isin(np.arange(count), im.llm_kept[-1].cpu())
    side = int(np.ceil(np.sqrt(patches.max() + 1))) if patches.size else 1  # patches per crop side
    if side * side != patches.max() + 1 and round(np.sqrt(patches.max())) ** 2 == patches.max():
        patches = patches - 1  # token 0 of each crop is its [CLS] row (Video-LLaVA frames): not drawn
        side = round(np.sqrt(patches.max() + 1))
    grid = side
    fig, axes = plt.subplots(1, len(pixels), figsize=(max(5.0, 4.0 * len(pixels)), 5.2), dpi=120, squeeze=False)
    for c, (ax, arr) in enumerate(zip(axes[0], pixels)):
        mine = crops == c
        h, w = arr.shape[:2]
        ph, pw = h / grid, w / grid
        shade = np.full(grid * grid, 0.22)  # patches that are no token of this image (unpadding) stay dark
        shade[patches[mine & s1 & (patches >= 0)]] = 1.0
        shade = np.kron(shade.reshape(grid, grid), np.ones((int(np.ceil(ph)), int(np.ceil(pw)))))[:h, :w]
        ax.imshow(arr * shade[..., None])
        if final is not None:
            for p in patches[mine & final & (patches >= 0)].tolist():
                r, col = divmod(int(p), grid)
                ax.add_patch(Rectangle((col * pw, r * ph), pw, ph, fill=False, ec="#ff2d2d", lw=0.8))
        label = "base" if len(pixels) > 1 and c == 0 else f"crop {c}" if len(pixels) > 1 else "image"
        caption = f"{label}: {int((mine & s1).sum())}/{int(mine.sum())}"
        if final is not None:
            caption += f", red {int((mine & final).sum())}"
        ax.set_title(caption, fontsize=10)
        ax.axis("off")
    _save(fig, path, title, fontsize=11)


def plot_training_curve(history: list[dict], points: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """An LPM run's curve: validation accuracy (%) against training samples (left), the training answer loss
    smoothed over 50 steps (right); the best validation point is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=110)
    xs = [p["samples"] for p in points]
    ys = [100 * p["accuracy"] for p in points]
    a.plot(xs, ys, marker="o", ms=3.5, lw=1.6, color="tab:blue")
    best = max(range(len(points)), key=lambda i: (points[i]["accuracy"], -points[i]["ce"]))
    a.plot([xs[best]], [ys[best]], marker="*", ms=13, color="tab:red", ls="none",
           label=f"best: {ys[best]:.1f}% at {xs[best]:,} samples")
    a.set_xlabel("training samples")
    a.set_ylabel("validation accuracy (%)")
    a.grid(alpha=0.3)
    a.legend(loc="lower right", fontsize=8)
    steps = [h["step"] for h in history if "ce" in h]
    ce = np.array([h["ce"] for h in history if "ce" in h], dtype=float)
    if len(ce):
        w = min(50, len(ce))
        smooth = np.convolve(ce, np.ones(w) / w, mode="valid")
        per_step = xs[-1] / points[-1]["step"] if points and points[-1]["step"] else 1
        b.plot(np.array(steps[w - 1:]) * per_step, smooth, lw=1.4, color="tab:gray")
    b.set_xlabel("training samples")
    b.set_ylabel("training answer loss (50-step mean)")
    b.grid(alpha=0.3)
    _save(fig, path, title)
