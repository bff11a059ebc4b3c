"""Train the ShapesVQA tiny LLaVA from scratch on CPU (or GPU), resumably.

Recipe (two stages):
  (a) dense per-patch pretraining of the vision tower alone: small linear heads on the layer used by LLaVA
      (``vision_feature_layer=-2``) predict object kind, colour, shape, character and object centre per patch;
  (b) projector + LLM on the VQA stream (vision tower frozen unless ``--lr-vision-b`` > 0), loss on answer
      tokens only. Each training image carries up to 6 questions as a multi-turn conversation (the visual
      tokens, which dominate the cost, are shared); the first turn is exactly the evaluation prompt.
      A curriculum raises the object cap from 3 to 8 during the first part of stage (b).
      ``--visual-keep K`` drops visual tokens during training: each image shows the LLM K of its 576 tokens
      (every object and text-box patch first, then random background ones) at their original positions,
      which makes a step ~5x cheaper on CPU; the last ``--full-frac`` of the steps see all 576 again. At
      test time the model sees every token, as a stock LLaVA does.
      Optional training aids (attention supervision, training time only; at test time the model is a stock
      LLaVA), each weighted 0.2 by default so that, under Adam's per-parameter normalisation, they do not
      drown the answer loss on the parameters they share; the first ``--grounding-heads`` query heads of:
        - layer ``--grounding-layer``, from each referring word ("circle" in "what color is the circle?"),
          attend to the visual tokens of what it refers to (``--grounding-weight``);
        - the same layer, from the position that predicts the answer, attend to the visual tokens of
          everything the answer depends on (``--answer-weight``);
        - layer ``--question-layer``, from that position, attend to its own question (``--question-weight``).
      ``--align-weight`` adds a word-alignment loss on the projected visual tokens (read through the final
      norm and the tied LM head, an object patch names its colour and shape, a text patch its character).
      ``--whiten-projector`` folds the vision features' standardisation into the projector's first layer.
      Methods that read those heads' attention see better-grounded attention than a large VLM would give them.

Checkpoints (model, heads, optimizer, scheduler, stage, step, RNG states, data-stream position) are written
atomically to ``OUT/checkpoint.pt`` as plain data (read back with ``weights_only=True``: a checkpoint never runs
code); ``--resume`` continues from there, ``--overwrite`` replaces the run in OUT (without either, a non-empty OUT
is refused). The final model and processor are saved with ``save_pretrained`` into OUT, with ``metrics.json``
(test accuracy).

    python -m learnpruner.testbed.train --out DIR [--steps-a N] [--steps N] [--batch-size B] [--resume]
    python -m learnpruner.testbed.train --out DIR --vision-from RUN ...   # reuse RUN's stage (a), start at (b)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..utils import atomic_torch_save, check_out_dir, read_checkpoint, rng_state, set_rng_state
from .model import build_model, build_processor, encode_conversation, format_prompt, save
from .shapes import (
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
    load_split,
    referents,
    relevant_objects,
)

GROUNDING_ATTENTION = "learnpruner_grounding"
STAGE_A_SEED_OFFSET = 1_000_003  # stage (a) images come from a different training stream than stage (b)
# what a run writes into OUT (glob patterns): checkpoint, metrics, and the save_pretrained model and processor
RUN_FILES = ("checkpoint.pt", "metrics.json", "config.json", "generation_config.json", "model*.safetensors",
             "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
             "processor_config.json", "preprocessor_config.json", "chat_template.*")


@dataclass
class TrainConfig:
    """Hyper-parameters of the staged recipe (see module docstring)."""

    out: str
    steps_a: int = 1200
    steps_b: int = 2400
    batch_size_a: int = 16
    batch_size: int = 16
    lr_a: float = 1e-3
    lr: float = 1e-3
    lr_vision_b: float = 0.0
    position_weight: float = 0.5  # stage (a): weight of the per-patch row/column targets
    grounding_weight: float = 0.2  # stage (b): weight of the grounding loss (0 disables it)
    grounding_layer: int = 1  # stage (b): decoder layer whose attention the grounding loss supervises
    grounding_heads: int = 3  # stage (b): how many of that layer's query heads (the first ones) it supervises
    answer_weight: float = 0.2  # stage (b): weight of the answer-grounding loss (at --grounding-layer; 0 disables)
    question_weight: float = 0.2  # stage (b): weight of the question-attention loss (0 disables it)
    question_layer: int = 0  # stage (b): decoder layer whose attention the question-attention loss supervises
    visual_keep: int = 0  # stage (b): visual tokens per image seen in training (objects first; 0: all 576)
    full_frac: float = 0.0  # stage (b): final fraction of steps that see all 576 visual tokens again
    align_weight: float = 0.0  # stage (b): weight of the word-alignment loss on projected object/text patches
    whiten_projector: bool = False  # stage (b) start: fold feature standardisation into the projector's first layer
    vision_from: str | None = None  # skip stage (a): take the vision tower from this run's checkpoint.pt
    init_from: str | None = None  # skip stage (a): start stage (b) from every weight of this saved model (a folder)
    device: str = "cpu"  # "cuda" on a GPU (TF32 matmuls allowed)
    workers: int = 0  # processes generating training images ahead of the trainer (0: in the main process)
    weight_decay: float = 0.01
    warmup: int = 100
    max_questions: int = 6
    curriculum_frac: float = 0.3
    seed: int = 0
    ckpt_every: int = 100
    eval_every: int = 400
    eval_n: int = 180
    test_n: int | None = None
    threads: int = 1
    tiny: bool = False
    save_dtype: str = "float32"


# ------------------------------------------------------------------------------------------------ helpers


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
def evaluate(model, processor, items: list[VQAItem], batch_size: int = 16, max_new_tokens: int = 3,
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
        enc = processor(images=[it.image for it in batch], text=[format_prompt(it.question) for it in batch],
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


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Holds model, heads, optimizer state and data positions; ``run()`` trains to completion."""

    def __init__(self, cfg: TrainConfig):
        for name, ok, accepted in (("visual_keep", cfg.visual_keep >= 0, "0 (all tokens) or a positive count"),
                                   ("full_frac", 0.0 <= cfg.full_frac <= 1.0, "a fraction in [0, 1]"),
                                   ("align_weight", cfg.align_weight >= 0, "a weight >= 0")):
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is invalid: expected {accepted}")
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.processor = build_processor()
        self.model = build_model(tokenizer=self.processor.tokenizer, tiny=cfg.tiny, seed=cfg.seed)
        self.vision = self.model.model.vision_tower
        self.heads = PatchHeads(self.model.config.vision_config.hidden_size)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model.to(self.device)
        self.heads.to(self.device)
        self._keep_gen = torch.Generator().manual_seed(cfg.seed + 17)  # training-time visual token dropping
        self._pool = None
        self._stream: tuple | None = None  # worker pool: (stage, next position, pending results, next index)
        self.stage, self.step, self.pos = "a", 0, 0
        self.history: list[dict] = []
        self._setup_stage()
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        if cfg.vision_from and cfg.init_from:
            raise ValueError(f"--vision-from {cfg.vision_from!r} and --init-from {cfg.init_from!r} both set the "
                             "starting weights: give one of them")
        if cfg.vision_from:
            self._take_vision(cfg.vision_from)
        if cfg.init_from:
            self._take_model(cfg.init_from)

    def _take_vision(self, run_dir: str) -> None:
        """Start at stage (b) with the vision tower (and stage-(a) heads) of another run. Valid only when that
        run kept its tower frozen after stage (a) (``lr_vision_b == 0``), so its tower is exactly the stage-(a)
        result; projector and LLM stay at this run's seeded initialisation, as after a full stage (a)."""
        path = os.path.join(run_dir, "checkpoint.pt") if os.path.isdir(run_dir) else run_dir
        ck = read_checkpoint(path, ("stage", "step", "model", "heads"))
        src = ck.get("config", {})
        if ck["stage"] == "a":
            raise ValueError(f"--vision-from {run_dir!r}: that run is still in stage (a) (step {ck['step']})")
        if src.get("lr_vision_b", 0) != 0:
            raise ValueError(f"--vision-from {run_dir!r}: that run trained its vision tower in stage (b) "
                             f"(lr_vision_b={src['lr_vision_b']}), so its tower is not the stage-(a) result")
        prefix = "model.vision_tower."
        vis = {k[len(prefix):]: v for k, v in ck["model"].items() if k.startswith(prefix)}
        self.vision.load_state_dict(vis)
        self.heads.load_state_dict(ck["heads"])
        self.history.append({"stage": "a", "vision_from": os.path.abspath(path),
                             "config": {k: src.get(k) for k in ("steps_a", "batch_size_a", "lr_a",
                                                                "position_weight", "seed")}})
        self._next_stage()

    def _take_model(self, model_dir: str) -> None:
        """Start at stage (b) from every weight of a saved testbed model (``save_pretrained`` folder or a
        ``learnpruner.hub`` name such as ``shapes-tiny``): a fine-tuning run. The model's architecture and
        vocabulary must be this configuration's."""
        from transformers import LlavaForConditionalGeneration

        from ..hub import resolve

        path = resolve(model_dir)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--init-from {model_dir!r}: no saved model (config.json) in {path}")
        state = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()
        own = self.model.state_dict()
        bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
        if bad:
            raise ValueError(f"--init-from {model_dir!r} is not this testbed architecture: {len(bad)} weights "
                             f"missing or of another shape, e.g. {bad[:3]}")
        self.model.load_state_dict({k: state[k] for k in own})
        self.model.tie_weights()
        self.history.append({"stage": "a", "init_from": os.path.abspath(path)})
        self._next_stage()

    # stage setup -------------------------------------------------------------------------------------
    def _setup_stage(self) -> None:
        cfg = self.cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.stage == "a":
            params = list(self.vision.parameters()) + list(self.heads.parameters())
            groups = [{"params": params, "lr": cfg.lr_a}]
            total = cfg.steps_a
        else:
            mm = self.model.model
            params = list(mm.multi_modal_projector.parameters()) + list(mm.language_model.parameters())
            params += [p for p in self.model.lm_head.parameters() if all(p is not q for q in params)]
            groups = [{"params": params, "lr": cfg.lr}]
            if cfg.lr_vision_b > 0:
                groups.append({"params": list(self.vision.parameters()), "lr": cfg.lr_vision_b})
            total = cfg.steps_b
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        if self.stage == "b":
            impl = "sdpa"
            layers = self.model.model.language_model.layers
            for name in ("grounding_layer", "question_layer"):
                if not 0 <= getattr(cfg, name) < len(layers):
                    raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not a decoder layer of "
                                     f"this model (0..{len(layers) - 1})")
            for w, k in ((cfg.grounding_weight, cfg.grounding_layer), (cfg.answer_weight, cfg.grounding_layer),
                         (cfg.question_weight, cfg.question_layer)):
                if w > 0:
                    _register_grounding_attention()
                    impl = GROUNDING_ATTENTION
                    layers[k].self_attn._learnpruner_ground = True
            self.model.set_attn_implementation({"text_config": impl})
        self.model.train(self.stage == "b")
        self.vision.train()
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(min(cfg.warmup, max(1, total // 5)),
                                                                           total))

    def _next_stage(self) -> None:
        self.stage = {"a": "b", "b": "done"}[self.stage]
        self.step, self.pos = 0, 0
        if self.stage == "b" and self.cfg.whiten_projector:
            self._whiten_projector()
        if self.stage != "done":
            self._setup_stage()

    @torch.no_grad()
    def _whiten_projector(self, n_images: int = 64) -> None:
        """Data-dependent initialisation of the projector (architecture unchanged): the vision features LLaVA
        reads are a pre-LayerNorm residual stream whose few large, nearly constant dimensions swamp the
        per-patch content after a random projection. Folding their per-dimension standardisation (mean and
        std over ``n_images`` stage-(a) images) into ``linear_1`` gives the LLM well-conditioned inputs."""
        items = [generate_item("train", i, self.cfg.seed + STAGE_A_SEED_OFFSET) for i in range(n_images)]
        feats = []
        for s in range(0, n_images, 16):
            pix = self.processor.image_processor([it.image for it in items[s:s + 16]],
                                                 return_tensors="pt")["pixel_values"]
            out = self.vision(pix.to(self.device), output_hidden_states=True)
            feats.append(out.hidden_states[self.model.config.vision_feature_layer][:, 1:].flatten(0, 1))
        f = torch.cat(feats).double().cpu()
        mu, sigma = f.mean(0), f.std(0).clamp_min(1e-3)
        lin = self.model.model.multi_modal_projector.linear_1
        w = lin.weight.double().cpu() / sigma[None, :]
        lin.bias.copy_((lin.bias.double().cpu() - w @ mu).to(lin.bias))
        lin.weight.copy_(w.to(lin.weight))

    # checkpointing -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"stage": self.stage, "step": self.step, "pos": self.pos, "model": self.model.state_dict(),
                "heads": self.heads.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "rng": rng_state(), "keep_gen": self._keep_gen.get_state(), "history": self.history,
                "config": asdict(self.cfg)}

    def save_checkpoint(self) -> None:
        os.makedirs(self.cfg.out, exist_ok=True)
        atomic_torch_save(self.state(), self.ckpt_path)

    def load_checkpoint(self, path: str | None = None) -> None:
        ck = read_checkpoint(path or self.ckpt_path, ("model", "heads", "stage", "history", "step", "pos", "rng"))
        self.model.load_state_dict(ck["model"])
        self.heads.load_state_dict(ck["heads"])
        self.stage, self.history = ck["stage"], ck["history"]
        if self.stage != "done":
            self._setup_stage()
            self._load_optimizer(ck["opt"], ck["sched"])
        self.step, self.pos = ck["step"], ck["pos"]
        set_rng_state(ck["rng"])
        if "keep_gen" in ck:
            self._keep_gen.set_state(ck["keep_gen"])

    def _load_optimizer(self, opt: dict, sched: dict) -> None:
        """Restore optimizer and scheduler. A run resumed with ``--lr-vision-b`` newly above 0 has one more
        parameter group (the vision tower) than its checkpoint: the saved groups are restored and the new
        one starts fresh (no Adam moments) on the same schedule."""
        cur = self.opt.state_dict()
        n_saved, n_cur = len(opt["param_groups"]), len(cur["param_groups"])
        if n_saved > n_cur:
            raise ValueError(f"the checkpoint has {n_saved} optimizer groups but this configuration has {n_cur}: "
                             "a run cannot be resumed with --lr-vision-b set back to 0")
        if n_saved < n_cur:
            opt = {"state": opt["state"], "param_groups": opt["param_groups"] + cur["param_groups"][n_saved:]}
            for g in opt["param_groups"][n_saved:]:
                g["initial_lr"] = g.get("initial_lr", g["lr"])
        self.opt.load_state_dict(opt)
        self.sched.load_state_dict(sched)
        if len(self.sched.base_lrs) < n_cur:
            self.sched.base_lrs = [g["initial_lr"] for g in self.opt.param_groups]
            factor = self.sched.lr_lambdas[0](self.sched.last_epoch)
            for g in self.opt.param_groups[n_saved:]:
                g["lr"] = g["initial_lr"] * factor
            self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]

    # steps -------------------------------------------------------------------------------------------
    def _item_args(self, index: int) -> tuple:
        cfg = self.cfg
        if self.stage == "a":
            return ("train", index, cfg.seed + STAGE_A_SEED_OFFSET, False, MAX_OBJECTS)
        ramp = int(cfg.curriculum_frac * cfg.steps_b * cfg.batch_size)
        return ("train", index, cfg.seed, True, curriculum_cap(index, ramp))

    def _items(self, n: int) -> list[VQAItem]:
        """The next ``n`` items of the current stage's stream; item ``i`` depends only on its index, so
        worker processes (``workers`` > 0, generating ahead, in order) give exactly the same batches."""
        if self.cfg.workers <= 0:
            its = [_generate(self._item_args(self.pos + i)) for i in range(n)]
        else:
            if self._pool is None:
                import multiprocessing as mp

                self._pool = mp.get_context("spawn").Pool(self.cfg.workers)
            if self._stream is None or self._stream[:2] != (self.stage, self.pos):
                self._stream = (self.stage, self.pos, collections.deque(), self.pos)
            stage, _, pending, nxt = self._stream
            ahead = max(4 * n, 2 * self.cfg.workers)
            while len(pending) < ahead:  # keep a bounded number of items in flight, in stream order
                pending.append(self._pool.apply_async(_generate, (self._item_args(nxt),)))
                nxt += 1
            its = [pending.popleft().get() for _ in range(n)]
            self._stream = (stage, self.pos + n, pending, nxt)
        self.pos += n
        return its

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool, self._stream = None, None

    def train_step(self) -> dict:
        """One optimisation step of the current stage; returns loss and accuracy stats."""
        if self.stage == "a":
            items = self._items(self.cfg.batch_size_a)
            pix = self.processor.image_processor([it.image for it in items], return_tensors="pt")["pixel_values"]
            out = self.vision(pix.to(self.device), output_hidden_states=True)
            feats = out.hidden_states[self.model.config.vision_feature_layer][:, 1:]
            labels = {k: torch.from_numpy(np.stack([it.labels[k].reshape(-1) for it in items])).to(self.device)
                      for k in ("kind", "color", "shape", "char", "center")}
            loss, stats = patch_loss(self.heads(feats), labels, self.cfg.position_weight)
            params = list(self.vision.parameters()) + list(self.heads.parameters())
        else:
            cfg = self.cfg
            items = self._items(cfg.batch_size)
            batch = collate_vqa(items, self.processor, cfg.max_questions)
            layers = self.model.model.language_model.layers
            tok, image_id = self.processor.tokenizer, self.model.config.image_token_id
            aux = []  # (name, weight, targets, layer, heads)
            if cfg.grounding_weight > 0:
                aux.append(("ground", cfg.grounding_weight, grounding_targets(
                    items, batch["input_ids"], batch["labels"], tok, image_id, cfg.max_questions),
                    cfg.grounding_layer, cfg.grounding_heads))
            if cfg.answer_weight > 0:
                aux.append(("answer", cfg.answer_weight, answer_targets(
                    items, batch["input_ids"], batch["labels"], image_id, cfg.max_questions),
                    cfg.grounding_layer, cfg.grounding_heads))
            if cfg.question_weight > 0:
                aux.append(("question", cfg.question_weight, question_targets(
                    items, batch["input_ids"], batch["labels"], tok, cfg.max_questions),
                    cfg.question_layer, cfg.grounding_heads))
            keep, feats = self.visual_keep_at(self.step), None
            if keep > 0 or cfg.align_weight > 0:  # the projected tokens are computed once, here
                feats = self._projected(batch["pixel_values"])
                index = keep_visual(items, batch["input_ids"], image_id, keep, self._keep_gen)
                aux = [(a, w, _subset_targets(t, index), k, h) for a, w, t, k, h in aux]
                batch = self._embed_kept(batch, index, feats)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            aux = [(a, w, {k: v.to(self.device) for k, v in t.items()}, k, h) for a, w, t, k, h in aux]
            captured: dict[int, torch.Tensor] = {}
            hooks = [layers[k].self_attn.register_forward_hook(
                lambda _m, _a, o, k=k: captured.__setitem__(k, o[1])) for k in {a[3] for a in aux}]
            try:
                out = self.model(**batch)
            finally:
                for h in hooks:
                    h.remove()
            loss = out.loss
            y = batch["labels"][:, 1:]
            pred = out.logits[:, :-1].argmax(-1)
            m = (y != -100) & (y != tok.eos_token_id)
            stats = {"acc": ((pred == y) & m).sum().item() / max(1, m.sum().item())}
            for name, w, targets, k, heads in aux:
                if targets and captured.get(k) is not None:
                    g = grounding_loss(captured[k], targets, heads)
                    stats[name] = g.item()
                    loss = loss + w * g
            if cfg.align_weight > 0:
                a = align_loss(self.model, feats, word_targets(items, tok))
                stats["align"] = a.item()
                loss = loss + cfg.align_weight * a
            params = [p for g in self.opt.param_groups for p in g["params"]]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {"loss": loss.item(), **stats}

    def visual_keep_at(self, step: int) -> int:
        """Visual tokens per image that stage-(b) step ``step`` trains on (0: all)."""
        return self.cfg.visual_keep if step < int((1 - self.cfg.full_frac) * self.cfg.steps_b) else 0

    def _embed_kept(self, batch: dict[str, torch.Tensor], index: torch.Tensor,
                    feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs for the kept positions ``index``: embeddings (the projected visual tokens ``feats``
        of the kept patches, token embeddings elsewhere), mask, labels, and the original position ids, so every
        text token sits where it sits in the full sequence."""
        mm, image_id = self.model.model, self.model.config.image_token_id
        ids = batch["input_ids"]
        patch = torch.cumsum(ids == image_id, 1) - 1  # patch number at each image position
        kept_ids = torch.gather(ids, 1, index)
        kept_img = kept_ids == image_id
        emb = mm.get_input_embeddings()(kept_ids.to(self.device))
        patch_idx = torch.gather(patch, 1, index)
        rows = torch.arange(ids.shape[0])[:, None].expand_as(index)
        sel = feats[rows[kept_img].to(self.device), patch_idx[kept_img].to(self.device)]
        emb = emb.masked_scatter(kept_img.to(self.device)[..., None], sel.to(emb.dtype))
        return {"inputs_embeds": emb, "attention_mask": torch.gather(batch["attention_mask"], 1, index),
                "position_ids": index, "labels": torch.gather(batch["labels"], 1, index)}

    def _projected(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (batch, 576, hidden) of ``pixel_values``, with grad through the projector."""
        with torch.set_grad_enabled(self.cfg.lr_vision_b > 0):  # the tower is frozen in stage (b) by default
            hs = self.vision(pixel_values.to(self.device), output_hidden_states=True).hidden_states
        return self.model.model.multi_modal_projector(hs[self.model.config.vision_feature_layer][:, 1:])

    def eval_val(self) -> dict:
        res = evaluate(self.model, self.processor, load_split("val", self.cfg.eval_n))
        res.pop("predictions")
        return res

    def run(self, progress: bool = True) -> dict:
        """Train all remaining steps of all stages, then save the final model and test metrics."""
        cfg = self.cfg
        while self.stage != "done":
            total = cfg.steps_a if self.stage == "a" else cfg.steps_b
            bar = tqdm(total=total, initial=self.step, desc=f"stage {self.stage}", disable=not progress,
                       mininterval=15, dynamic_ncols=True)
            ema: dict[str, float] = {}
            t0 = time.time()
            while self.step < total:
                st = self.train_step()
                ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in st.items()}
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()}, refresh=False)
                if self.step % 50 == 0:
                    self.history.append({"stage": self.stage, "step": self.step, **ema,
                                         "sec_per_step": (time.time() - t0) / 50})
                    t0 = time.time()
                if self.stage == "b" and (self.step % cfg.eval_every == 0 or self.step == total):
                    res = self.eval_val()
                    self.history.append({"stage": "b", "step": self.step, "val": res})
                    tqdm.write(f"[val step {self.step}] acc={res['accuracy']:.3f} {res['per_qtype']}")
                if self.step % cfg.ckpt_every == 0 or self.step == total:
                    self.save_checkpoint()
            bar.close()
            tqdm.write(f"stage {self.stage} done: {ema}")
            self._next_stage()
            self.save_checkpoint()
        return self.finish(progress)

    def finish(self, progress: bool = True) -> dict:
        cfg = self.cfg
        self.model.set_attn_implementation({"text_config": "sdpa"})
        for layer in self.model.model.language_model.layers:
            layer.self_attn.__dict__.pop("_learnpruner_ground", None)
        dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.save_dtype]
        save(self.model, self.processor, cfg.out, dtype=dtype)
        test = evaluate(self.model, self.processor, load_split("test", cfg.test_n), progress=progress)
        test.pop("predictions")
        metrics = {"test": test, "history": self.history, "config": asdict(cfg)}
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        tqdm.write(f"[test] acc={test['accuracy']:.4f} {test['per_qtype']}")
        return metrics


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train (or resume) with ``cfg``; returns final metrics. A non-empty ``cfg.out`` is refused unless
    ``resume`` (continue its checkpoint) or ``overwrite`` (delete the old run's files, ``RUN_FILES``, first)."""
    for path in check_out_dir(cfg.out, resume, overwrite, RUN_FILES):
        path.unlink(missing_ok=True)
    tr = Trainer(cfg)
    if resume and os.path.exists(tr.ckpt_path):
        tr.load_checkpoint()
        tqdm.write(f"resumed at stage {tr.stage} step {tr.step} (data position {tr.pos})")
    try:
        return tr.run(progress)
    finally:
        tr.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, dest="steps_b", help="stage (b) steps")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="replace the run in OUT (a non-empty OUT is refused "
                    "without it or --resume)")
    names = {"steps_b", "out"}
    for f in fields(TrainConfig):
        if f.name in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool) and f.default:
            ap.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", default=None)
        elif f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true")
        else:
            typ = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[str(f.type)]
            ap.add_argument(flag, type=typ)
    args = vars(ap.parse_args(argv))
    resume, overwrite = args.pop("resume"), args.pop("overwrite")
    cfg = TrainConfig(**{k: v for k, v in args.items() if v is not None and k != "tiny"}, tiny=args["tiny"])
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    train(cfg, resume=resume, overwrite=overwrite)


if __name__ == "__main__":
    main()
