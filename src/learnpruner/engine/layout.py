"""The visual layout of one forward: which image and which visual token every prompt position holds.

Images carry their own token counts (LLaVA-1.5: 576 each; LLaVA-NeXT: base crop plus an AnyRes grid
whose size follows the image's aspect ratio). Per prompt position the layout stores

* ``vis``: the visual-token index ``0..n_i-1`` within its image, :data:`TEXT` (``-1``) for text, or
  :data:`STRUCTURE` (``-2``) for an image position that is no selectable token (LLaVA-NeXT's
  ``image_newline`` after each grid row): structure is kept with the text, outside the budget;
* ``img``: the image number (``-1`` for text).

Per image it stores its token count and, where the adapter knows them, the crop (or frame) and the
patch of each token. Budgets and schedules are per image; the rules run on *groups* of images with
the same count (one ``[g, n, ...]`` batch per group), so every rule keeps its ``[num_images, n]``
contract and LLaVA-1.5 (one group) runs exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["TEXT", "STRUCTURE", "VisualFeatures", "Layout", "grid_coords", "instruction_rows", "pad_rows",
           "fill_streams"]

TEXT = -1
STRUCTURE = -2


@dataclass
class VisualFeatures:
    """What an adapter's ``encode`` returns for the images of one forward.

    ``features``: per image ``[n_i, d]`` rows at the vision feature layer, before the projector, in
    token order (or one ``[num_images, n, d]`` tensor when all images have ``n`` tokens).
    ``slots``: per image ``[L_i]``: for each of its placeholder positions, in sequence order, the token
    index or :data:`STRUCTURE`. ``structure``: the embedding that fills structure slots (or None).
    ``extras``: per-image side information in token order (``"cls"`` ``[n_i]``, ``"keys"`` ``[n_i, h]``).
    ``crops`` / ``patches``: per image ``[n_i]`` crop (or frame) and patch index of each token.
    ``streams``: per stream, per image ``[n_i, d_j]``: side inputs in token order that follow the features
    through stage 1 (each image keeps the same tokens in every stream), projected by the adapter's
    ``project_stream(j, rows)`` and added to the residual stream after decoder layer ``j`` at the rows of the
    tokens still present (Qwen3-VL's DeepStack features); None for families without any.
    ``coords``: per image ``[n_i, 2]`` float, each token's (row, column) centre in its crop (or frame) grid scaled to
    ``[-1, 1]`` (:func:`grid_coords`; a [CLS] row sits at the centre), for rules that weigh where a token lies;
    None where the adapter gives none.
    """

    features: torch.Tensor | list[torch.Tensor]
    slots: list[torch.Tensor]
    structure: torch.Tensor | None = None
    extras: dict[str, list[torch.Tensor] | torch.Tensor] = field(default_factory=dict)
    crops: list[torch.Tensor] | None = None
    patches: list[torch.Tensor] | None = None
    streams: list[list[torch.Tensor]] | None = None
    coords: list[torch.Tensor] | None = None

    @property
    def num_images(self) -> int:
        return len(self.slots)

    def counts(self) -> list[int]:
        if isinstance(self.features, torch.Tensor):
            return [self.features.shape[1]] * self.features.shape[0]
        return [f.shape[0] for f in self.features]

    def rows(self, images: list[int], what: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        """``[g, n, ...]``: ``what`` (default: the features) of images of equal count, stacked."""
        what = self.features if what is None else what
        if isinstance(what, torch.Tensor):
            return what if len(images) == what.shape[0] else what[images]
        return torch.stack([what[i] for i in images])


def grid_coords(patch: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[n, 2]`` float: the (row, column) centre of raster patch index ``patch`` (``[n]``) in a ``rows x cols`` grid,
    each scaled to ``[-1, 1]`` (``(2 r + 1) / rows - 1``); an index outside the grid (a [CLS] row, given as -1) gets
    the centre ``(0, 0)``."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid_coords needs a positive grid, got {rows} x {cols}")
    patch = patch.long()
    inside = (patch >= 0) & (patch < rows * cols)
    r, c = (patch // cols).float(), (patch % cols).float()
    out = torch.stack([(2 * r + 1) / rows - 1, (2 * c + 1) / cols - 1], dim=-1)
    return torch.where(inside[:, None], out, torch.zeros_like(out))


def pad_rows(rows: list[torch.Tensor], fill: int | float = -1) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into ``[len(rows), max_len]``, padded with ``fill``."""
    width = max((r.shape[0] for r in rows), default=0)
    ref = rows[0] if rows else torch.zeros(0, dtype=torch.long)
    out = ref.new_full((len(rows), width), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


@dataclass
class Layout:
    """The visual layout of a batch (see the module docstring)."""

    vis: torch.Tensor  # [b, s]
    img: torch.Tensor  # [b, s]
    counts: list[int]  # tokens per image
    groups: dict[int, list[int]]  # token count -> images with that count, ascending

    @property
    def num_images(self) -> int:
        return len(self.counts)

    @property
    def width(self) -> int:
        """The largest token count (the width of per-image tables)."""
        return max(self.counts, default=0)

    @classmethod
    def build(cls, placeholders: torch.Tensor, visual: VisualFeatures) -> Layout:
        """The layout of a prompt batch whose ``placeholders`` ([b, s] bool) the images fill in order."""
        counts = visual.counts()
        lengths = [int(s.shape[0]) for s in visual.slots]
        found = int(placeholders.sum())
        if found != sum(lengths):
            per = ", ".join(map(str, lengths)) if len(set(lengths)) > 1 else f"{len(lengths)} x {lengths[0]}"
            raise ValueError(
                f"Image features and image tokens do not match: {found} image tokens in input_ids, "
                f"{len(lengths)} image(s) giving {per} tokens"
            )
        device = placeholders.device
        b, s = placeholders.shape
        g = placeholders.flatten().long().cumsum(0).view(b, s) - 1  # running placeholder number
        slot_value = torch.cat([x.to(device) for x in visual.slots]) if lengths else placeholders.new_zeros(0)
        image_of = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           torch.tensor(lengths, device=device))
        safe = g.clamp(min=0)
        vis = torch.where(placeholders, slot_value[safe] if lengths else g, TEXT)
        img = torch.where(placeholders, image_of[safe] if lengths else g, -1)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(counts):
            groups.setdefault(n, []).append(i)
        return cls(vis=vis, img=img, counts=counts, groups=groups)

    def view(self, vis: torch.Tensor, img: torch.Tensor, images: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vis, img)`` as seen by a rule running on ``images`` only: their image numbers become
        ``0..len(images)-1``; the other images' tokens become :data:`STRUCTURE` (image positions the rule
        must not select). With every image in ``images`` this is the identity."""
        if len(images) == self.num_images:
            return vis, img
        local = torch.full((self.num_images,), -1, dtype=torch.long, device=img.device)
        local[torch.tensor(images, device=img.device)] = torch.arange(len(images), device=img.device)
        img_g = torch.where(img >= 0, local[img.clamp(min=0)], -1)
        vis_g = torch.where((vis >= 0) & (img_g < 0), STRUCTURE, vis)
        return vis_g, img_g


def instruction_rows(vis: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[b, s]`` bool: the instruction of each sample, the one definition every rule shares.

    The valid text positions after the sample's last image position (visual token or structure).
    ``valid`` ([b, s], True for real tokens) excludes padding; None means no padding. Samples without
    such rows get none: callers choose their fallback (the last token, or all text).
    """
    b, s = vis.shape
    ar = torch.arange(s, device=vis.device).expand(b, s)
    text = vis == TEXT
    if valid is not None:
        text = text & valid.to(vis.device).bool()
    last_image = torch.where(vis != TEXT, ar, -1).amax(dim=1)
    return text & (ar > last_image[:, None])


def image_samples(img: torch.Tensor, num_images: int) -> torch.Tensor:
    """``[num_images]``: the sample (batch row) holding each image, from a ``[b, s]`` table of each position's image
    number (-1 where none)."""
    rows, cols = (img >= 0).nonzero(as_tuple=True)
    out = torch.zeros(num_images, dtype=torch.long, device=img.device)
    out[img[rows, cols]] = rows
    return out


def project_rows(ad, rows, stack: bool = False) -> torch.Tensor:
    """``[total, D]``: the adapter's projector on each item's (kept) feature rows, in item order (``rows``: a
    ``[g, k, d]`` tensor, or a list of ``[k_i, d]`` projected one by one, or in one call with ``stack`` when every
    item has as many rows)."""
    if isinstance(rows, torch.Tensor):
        return ad.project(rows).flatten(0, 1)
    if stack and len(rows) and all(r.shape[0] == rows[0].shape[0] for r in rows):
        return ad.project(torch.stack(list(rows))).flatten(0, 1)
    return torch.cat([ad.project(r) for r in rows])


def fill_visual(embeds: torch.Tensor, slot: torch.Tensor, projected: torch.Tensor, layout, structure) -> torch.Tensor:
    """The LLM input with the projected rows in the placeholders ``slot`` (``[b, s]`` bool, those that keep a
    token) in (item, token) order, and the structure rows (LLaVA-NeXT's row newlines) filled with ``structure``."""
    embeds = embeds.masked_scatter(slot[..., None], projected.to(embeds.device, embeds.dtype))
    is_structure = layout.vis == STRUCTURE
    if structure is not None and bool(is_structure.any()):
        embeds = torch.where(is_structure[..., None], structure.to(embeds), embeds)
    return embeds


def fill_streams(ad, visual: VisualFeatures, kept: list, embeds: torch.Tensor,
                 slot: torch.Tensor) -> torch.Tensor | None:
    """``[streams, b, s, D]``: each of ``visual.streams`` on the rows of the tokens each image keeps (``kept``: per
    image its kept indices, ascending, or None for all), projected by ``ad.project_stream`` and written at the
    placeholders ``slot`` (as :func:`fill_visual` writes the main rows), zero elsewhere; None without streams."""
    if not visual.streams:
        return None
    out = []
    for j, stream in enumerate(visual.streams):
        rows = torch.cat([s if k is None else s[k.to(s.device)] for s, k in zip(stream, kept, strict=True)])
        proj = ad.project_stream(j, rows).to(embeds.device, embeds.dtype)
        out.append(torch.zeros_like(embeds).masked_scatter(slot[..., None], proj))
    return torch.stack(out)
