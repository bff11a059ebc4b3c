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

    python -m recipes.testbed.train --out DIR [--steps-a N] [--steps N] [--batch-size B] [--resume]
    python -m recipes.testbed.train --out DIR --vision-from RUN ...   # reuse RUN's stage (a), start at (b)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import time
from dataclasses import asdict, fields

import numpy as np
import torch
from tqdm import tqdm

from learnpruner.testbed.model import build_model, build_processor, save
from learnpruner.testbed.shapes import (
    MAX_OBJECTS,
    VQAItem,
    generate_item,
    load_split,
)
from learnpruner.utils import atomic_torch_save, check_out_dir, read_checkpoint, rng_state, set_rng_state
from recipes.testbed.recipe import RUN_FILES, STAGE_A_SEED_OFFSET, TestbedConfig
from recipes.testbed.targets import (
    GROUNDING_ATTENTION,
    PatchHeads,
    _generate,
    _register_grounding_attention,
    _subset_targets,
    align_loss,
    answer_targets,
    collate_vqa,
    curriculum_cap,
    grounding_loss,
    grounding_targets,
    keep_visual,
    lr_lambda,
    patch_loss,
    question_targets,
    vqa_accuracy,
    word_targets,
)


class Trainer:
    """Holds model, heads, optimizer state and data positions; ``run()`` trains to completion."""

    def __init__(self, cfg: TestbedConfig):
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

        from learnpruner.hub import resolve

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
        res = vqa_accuracy(self.model, self.processor, load_split("val", self.cfg.eval_n))
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
        test = vqa_accuracy(self.model, self.processor, load_split("test", cfg.test_n), progress=progress)
        test.pop("predictions")
        metrics = {"test": test, "history": self.history, "config": asdict(cfg)}
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        tqdm.write(f"[test] acc={test['accuracy']:.4f} {test['per_qtype']}")
        return metrics


def train(cfg: TestbedConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
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
    for f in fields(TestbedConfig):
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
    cfg = TestbedConfig(**{k: v for k, v in args.items() if v is not None and k != "tiny"}, tiny=args["tiny"])
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    train(cfg, resume=resume, overwrite=overwrite)


if __name__ == "__main__":
    main()
