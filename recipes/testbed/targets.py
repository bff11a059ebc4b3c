"""The testbed trainer's pieces: per-patch heads and their loss, the attention-supervision targets (grounding,
answer, question) and losses, the word-alignment loss, the VQA collation, and the accuracy of a trained model on
ShapesVQA items (:func:`vqa_accuracy`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from learnpruner.testbed.model import encode_conversation, question_prompt
from learnpruner.testbed.shapes import (
    CHARS,
    COLOR_NAMES,
    GRID,
    MAX_OBJECTS,
    MIN_OBJECTS,
    SHAPES,
    SceneObject,
    TextBox,
    VQAItem,
    generate_item,
    referents,
    relevant_objects,
)

GROUNDING_ATTENTION = "learnpruner_grounding"


class PatchHeads(nn.Module):
    """Linear per-patch heads used for stage (a) only."""

    SPEC = {"kind": 3, "color": len(COLOR_NAMES) + 1, "shape": len(SHAPES) + 1, "char": len(CHARS) + 1,
            "center": 2, "row": GRID, "col": GRID}

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in self.SPEC.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(feats)
        return {k: head(h) for k, head in self.heads.items()}


def patch_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
               position_weight: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Sum of per-patch cross-entropies; colour/shape/char only on foreground patches; row/column of every
    patch (weighted by ``position_weight``) so that the features LLaVA uses encode position explicitly."""
    loss = F.cross_entropy(logits["kind"].flatten(0, 1), labels["kind"].flatten())
    dev = logits["kind"].device
    w = torch.tensor([1.0, 8.0], device=dev)
    loss = loss + F.cross_entropy(logits["center"].flatten(0, 1), labels["center"].flatten(), weight=w)
    pos = torch.arange(GRID * GRID, device=dev)
    n = logits["row"].shape[0]
    loss = loss + position_weight * F.cross_entropy(logits["row"].flatten(0, 1), (pos // GRID).repeat(n))
    loss = loss + position_weight * F.cross_entropy(logits["col"].flatten(0, 1), (pos % GRID).repeat(n))
    stats = {}
    for k in ("color", "shape", "char"):
        y = labels[k].flatten().clone()
        y[y == 0] = -100
        if (y != -100).any():
            loss = loss + F.cross_entropy(logits[k].flatten(0, 1), y, ignore_index=-100)
            pred = logits[k].flatten(0, 1).argmax(-1)
            stats[k] = ((pred == y) & (y != -100)).sum().item() / max(1, (y != -100).sum().item())
    return loss, stats


def _generate(args: tuple) -> VQAItem:
    split, index, seed, all_questions, max_objects = args
    return generate_item(split, index, seed, all_questions=all_questions, max_objects=max_objects)


def lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine decay to 10%."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    return f


def curriculum_cap(index: int, ramp_items: int) -> int:
    """Max objects for stage-(b) item ``index``: 3 at the start, 8 after ``ramp_items`` items."""
    if ramp_items <= 0:
        return MAX_OBJECTS
    return MIN_OBJECTS + int((MAX_OBJECTS - MIN_OBJECTS + 1) * min(1.0, index / ramp_items) - 1e-9)


def _grounding_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA everywhere except on the layer flagged ``_learnpruner_ground``, which runs eager attention so that
    its probabilities come back for the grounding loss (eager on every layer would double the step time)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if getattr(module, "_learnpruner_ground", False):
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_grounding_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUNDING_ATTENTION, _grounding_attention)
    AttentionMaskInterface.register(GROUNDING_ATTENTION, eager_mask)


def _turns(items: list[VQAItem], labels: torch.Tensor, max_questions: int):
    """Yield (row, item, question, end) per turn; ``end`` is the prompt's last token, which predicts the answer."""
    for b, it in enumerate(items):
        lab = labels[b]
        ends = ((lab[1:] != -100) & (lab[:-1] == -100)).nonzero().flatten().tolist()
        for (q, _a, _t), end in zip(it.qas[:max_questions], ends):
            yield b, it, q, end


def _scene(it: VQAItem) -> tuple[list[SceneObject], list[TextBox]]:
    return [SceneObject(**o) for o in it.objects], [TextBox(**x) for x in it.boxes]


def _object_mask(it: VQAItem, ids_row: torch.Tensor, image_token_id: int, objects: list[int]) -> torch.Tensor:
    """(seq,) mask of the visual tokens whose patch belongs to one of ``objects`` (indices as in labels["id"]-1)."""
    m = torch.zeros(ids_row.shape[0], dtype=torch.bool)
    if objects:
        img_pos = (ids_row == image_token_id).nonzero().flatten()
        patch_ids = torch.from_numpy(it.labels["id"].reshape(-1))
        m[img_pos[torch.isin(patch_ids, torch.tensor(objects) + 1)]] = True
    return m


def _pack(targets: list[tuple[int, int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    targets = [t for t in targets if t[2].any()]
    if not targets:
        return {}
    rows, queries, masks = zip(*targets)
    return {"rows": torch.tensor(rows), "queries": torch.tensor(queries), "masks": torch.stack(masks)}


def grounding_targets(items: list[VQAItem], ids: torch.Tensor, labels: torch.Tensor, tokenizer,
                      image_token_id: int, max_questions: int) -> dict[str, torch.Tensor]:
    """One target per referring word of every turn (``shapes.referents``): the batch row, the word's sequence
    position, and a (targets, seq) mask of the visual tokens of what it refers to."""
    out = []
    for b, it, q, end in _turns(items, labels, max_questions):
        qtok = tokenizer(q, add_special_tokens=False)["input_ids"]
        start = end - 1 - len(qtok)  # "... {question} assistant :"
        if ids[b, start:start + len(qtok)].tolist() != qtok:
            raise RuntimeError(f"question {q!r} not found before position {end}")
        cursor = 0
        for word, rel in referents(q, *_scene(it)):
            cursor = qtok.index(tokenizer.convert_tokens_to_ids(word), cursor)
            out.append((b, start + cursor, _object_mask(it, ids[b], image_token_id, rel)))
            cursor += 1
    return _pack(out)


def answer_targets(items: list[VQAItem], ids: torch.Tensor, labels: torch.Tensor, image_token_id: int,
                   max_questions: int) -> dict[str, torch.Tensor]:
    """One target per turn whose answer depends on something in the image (``shapes.relevant_objects``): the
    batch row, the position that predicts the answer, and a (turns, seq) mask of those objects' visual
    tokens. Turns with nothing relevant (a "no" existence question, a count of zero) are left out."""
    return _pack([(b, end, _object_mask(it, ids[b], image_token_id, relevant_objects(q, *_scene(it))))
                  for b, it, q, end in _turns(items, labels, max_questions)])


def question_targets(items: list[VQAItem], ids: torch.Tensor, labels: torch.Tensor, tokenizer,
                     max_questions: int) -> dict[str, torch.Tensor]:
    """One target per turn: the batch row, the position that predicts the answer, and a (turns, seq) mask of
    that turn's question tokens."""
    out = []
    for b, _it, q, end in _turns(items, labels, max_questions):
        n = len(tokenizer(q, add_special_tokens=False)["input_ids"])
        m = torch.zeros(ids.shape[1], dtype=torch.bool)
        m[end - 1 - n:end - 1] = True
        out.append((b, end, m))
    return _pack(out)


def keep_visual(items: list[VQAItem], ids: torch.Tensor, image_token_id: int, keep: int,
                generator: torch.Generator) -> torch.Tensor:
    """(batch, seq - 576 + keep) indices into the sequence that keep every text token and ``keep`` visual
    tokens per image: the patches of objects and text boxes first (a random subset if there are more), then
    random background patches (``keep`` <= 0: all); kept tokens stay in their original order. Token dropping:
    the sequence and the attention over it shrink ~4x while every answer stays answerable."""
    rows = []
    for b, it in enumerate(items):
        img_pos = (ids[b] == image_token_id).nonzero().flatten()
        if keep <= 0 or keep >= len(img_pos):
            rows.append(torch.arange(ids.shape[1]))
            continue
        fg = torch.from_numpy(it.labels["id"].reshape(-1) > 0)
        order = torch.randperm(len(img_pos), generator=generator)
        order = torch.cat([order[fg[order]], order[~fg[order]]])  # foreground first, each part shuffled
        keep_mask = torch.ones(ids.shape[1], dtype=torch.bool)
        keep_mask[img_pos] = False
        keep_mask[img_pos[order[:keep]]] = True
        rows.append(keep_mask.nonzero().flatten())
    return torch.stack(rows)


def _subset_targets(targets: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Re-express attention targets on the kept positions ``index`` (batch, kept) of each row."""
    if not targets:
        return targets
    rows = targets["rows"]
    inv = torch.full((index.shape[0], int(index.max()) + 1), -1, dtype=torch.long)
    inv.scatter_(1, index, torch.arange(index.shape[1]).expand_as(index))
    queries = inv[rows, targets["queries"]]
    if (queries < 0).any():
        raise RuntimeError("an attention-loss query position was dropped")
    return {"rows": rows, "queries": queries, "masks": torch.gather(targets["masks"], 1, index[rows])}


def word_targets(items: list[VQAItem], tokenizer) -> torch.Tensor:
    """Per patch (batch * 576), the vocabulary ids of the words naming it: (colour word, shape word) for object
    patches, (character, character) for text-box patches, (-100, -100) elsewhere."""
    color_ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in COLOR_NAMES])
    shape_ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in SHAPES])
    char_ids = torch.tensor([tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in CHARS])
    out = torch.full((len(items) * GRID * GRID, 2), -100, dtype=torch.long)
    lab = {k: torch.from_numpy(np.concatenate([it.labels[k].reshape(-1) for it in items]))
           for k in ("color", "shape", "char")}
    obj, txt = lab["color"] > 0, lab["char"] > 0
    out[obj, 0], out[obj, 1] = color_ids[lab["color"][obj] - 1], shape_ids[lab["shape"][obj] - 1]
    out[txt, 0] = out[txt, 1] = char_ids[lab["char"][txt] - 1]
    return out


def align_loss(model, feats: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Word alignment of projected visual tokens (training time only): read through the model's own final norm
    and tied LM head, an object patch should put half its probability on its colour word and half on its shape
    word, a text patch all on its character. This keeps every attribute a prominent direction of the visual
    tokens (without it the projector learnt to keep shape and squash colour) and in word-embedding space, as
    LLaVA's feature-alignment stage does with captions."""
    m = words[:, 0] >= 0
    if not m.any():
        return feats.sum() * 0
    h = model.model.language_model.norm(feats.flatten(0, 1)[m])
    logp = torch.log_softmax(model.lm_head(h).float(), -1)
    w = words[m].to(logp.device)
    return -0.5 * (logp.gather(1, w[:, :1]) + logp.gather(1, w[:, 1:])).mean()


def grounding_loss(attn: torch.Tensor, targets: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """Mean over targets and the first ``heads`` heads of -log(attention mass on the target's mask), from the
    target's query position. ``attn`` is (batch, heads, seq, seq) attention probabilities."""
    a = attn[targets["rows"], :heads, targets["queries"], :]  # (turns, heads, seq)
    mass = (a * targets["masks"][:, None, :].to(a.dtype)).sum(-1)
    return -torch.log(mass.clamp_min(1e-6)).mean()


def collate_vqa(items: list[VQAItem], processor, max_questions: int) -> dict[str, torch.Tensor]:
    """Right-padded multi-turn batch with labels on answer tokens only."""
    tok = processor.tokenizer
    seqs = [encode_conversation(tok, [(q, a) for q, a, _ in it.qas[:max_questions]]) for it in items]
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(items), n), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(items), n), -100, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for i, (s, y) in enumerate(seqs):
        ids[i, : len(s)], lab[i, : len(s)], att[i, : len(s)] = torch.tensor(s), torch.tensor(y), 1
    pix = processor.image_processor([it.image for it in items], return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "pixel_values": pix}


@torch.no_grad()
def vqa_accuracy(model, processor, items: list[VQAItem], batch_size: int = 16, max_new_tokens: int = 3,
             progress: bool = False, device: str | torch.device | None = None) -> dict:
    """Greedy generation; exact match (lowercased, stripped) overall and per question type."""
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"
    hits: dict[str, list[int]] = {}
    preds = []
    rng = range(0, len(items), batch_size)
    for s in tqdm(rng, desc="eval", disable=not progress, mininterval=10):
        batch = items[s: s + batch_size]
        enc = processor(images=[it.image for it in batch], text=[question_prompt(it.question) for it in batch],
                        return_tensors="pt", padding=True).to(device or model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for it, t in zip(batch, texts):
            p = t.strip().lower()
            preds.append(p)
            hits.setdefault(it.qtype, []).append(int(p == it.answer.strip().lower()))
    model.train(was_training)
    allh = [h for v in hits.values() for h in v]
    return {"accuracy": float(np.mean(allh)) if allh else 0.0, "n": len(allh),
            "per_qtype": {k: float(np.mean(v)) for k, v in sorted(hits.items())}, "predictions": preds}
