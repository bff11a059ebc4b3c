"""The run, step by step: targets per token count, freezing the VLM, the LPM, resuming, the steps, the end."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import Adapter, adapter_for
from ..hub import model_fingerprint
from ..lpm import LearnablePruningModule, LPMConfig
from ..utils import read_checkpoint, set_rng_state
from .checkpoints import _check_resume_config, _check_trained_on, _save_checkpoint, check_out_dir
from .config import GATED_ATTENTION, TrainConfig
from .data import JsonlRecords, ShapesRecords, _Batches
from .gating import _register_gated_attention
from .loss import _check_mask, _Targets, step_loss
from .runtime import _Runtime

logger = logging.getLogger("learnpruner.training")


def _check_processor(processor) -> None:
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat template: LPM training formats every record with "
            "processor.apply_chat_template (each model family its own way); load the model's processor "
            "with its chat_template, or set processor.chat_template"
        )


def _start_run(out: Path, resume: bool, overwrite: bool, cfg: TrainConfig, device: str | None) -> _Runtime:
    """Refuse a used ``out`` (unless resume/overwrite), start the runtime, delete an overwritten run's files."""
    old_run = check_out_dir(out, resume, overwrite)
    rt = _Runtime(cfg.bf16, device)
    if old_run and rt.is_main:
        for path in old_run:
            path.unlink(missing_ok=True)
    rt.wait()
    return rt


def _targets(ad: Adapter, cfg: TrainConfig, frames: int | None = None) -> tuple[_Targets, int]:
    """The per-count targets and the largest item's token count (refused when stage 1 keeps it whole): the largest
    image, or with ``frames`` (the data has videos; None: it has none) a video of that many frames."""
    n = ad.num_visual_tokens()
    video = frames is not None and ad.video_tokens(frames) is not None
    if video:
        n = max(n, ad.video_tokens(frames))
    if cfg.layer is not None and not 0 < cfg.layer < ad.text_config.num_hidden_layers:
        raise ValueError(f"layer must lie in 1..{ad.text_config.num_hidden_layers - 1} (the LLM's layers after the "
                         f"first), got {cfg.layer}")
    targets = _Targets(cfg.tokens, ad.text_config.num_hidden_layers, cfg.layer)
    if targets.r1(n) is None:
        raise ValueError(f"tokens={cfg.tokens} keeps every one of the {n} visual tokens in stage 1: nothing to train")
    if cfg.max_length <= n and video:
        logger.warning("max_length=%d cannot hold a %d-frame video's %d visual tokens: video records are skipped "
                       "as too long (raise max_length, e.g. to 4096 for 8-frame Video-LLaVA videos)", cfg.max_length,
                       frames, n)
    elif cfg.max_length <= n:
        logger.warning("max_length=%d cannot hold the largest image's %d visual tokens: records with such images "
                       "are skipped as too long (raise max_length, e.g. to 4096 for LLaVA-NeXT)", cfg.max_length, n)
    return targets, n


def _freeze(model, ad: Adapter, cfg: TrainConfig, rt: _Runtime) -> str:
    """The VLM frozen on ``rt.device`` with the gated attention in its text model; returns the previous one."""
    _register_gated_attention()
    previous_impl = ad.text_config._attn_implementation
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    model.requires_grad_(False).eval().to(rt.device)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return previous_impl


def _unfreeze(model, cfg: TrainConfig, previous_impl: str) -> None:
    model.set_attn_implementation({"text_config": previous_impl})
    if cfg.grad_ckpt:
        model.gradient_checkpointing_disable()


def _new_lpm(ad: Adapter, cfg: TrainConfig, targets: _Targets, n: int, rt: _Runtime):
    """A fresh LPM for the adapter's family and feature layer, its optimizer and its LR schedule."""
    torch.manual_seed(cfg.seed)
    r1 = targets.r1(n)
    lpm = LearnablePruningModule(LPMConfig(
        feature_dim=ad.feature_dim(), hidden_dim=cfg.hidden_dim, family=ad.family,
        feature_layer=ad.feature_layer(), num_tokens=n,
        extra={"trained_tokens": cfg.tokens, "r1": r1, "keep_ratio": r1 / n,
               **({"budget_range": list(cfg.budget_range)} if cfg.budget_range else {}),
               **({"options": {"layer": cfg.layer}} if cfg.layer is not None else {})},
    )).to(rt.device)
    opt = torch.optim.AdamW(lpm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))

    return lpm, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _restore(ckpt_path: Path, resume: bool, cfg: TrainConfig, lpm, opt, scheduler, batches: _Batches, data,
             trained_on: dict):
    """Load a run's checkpoint to continue it exactly; returns ``(step, history)`` (``(0, [])`` when new)."""
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path, ("lpm", "opt", "sched", "step", "pos", "history", "rng"))
        _check_resume_config(state.get("config", {}), asdict(cfg), ckpt_path)
        _check_trained_on(state.get("trained_on"), trained_on, ckpt_path)
        lpm.load_state_dict(state["lpm"])
        opt.load_state_dict(state["opt"])
        scheduler.load_state_dict(state["sched"])
        batches.pos = state["pos"]
        data.skipped = dict(state.get("skipped", {}))
        data._bad = set(state.get("bad", []))
        set_rng_state(state["rng"])
        return state["step"], state["history"]
    if resume:
        logger.warning("no checkpoint at %s: starting from scratch", ckpt_path)
    return 0, []


def train_lpm(
    model,
    processor,
    data: JsonlRecords | ShapesRecords,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    device: str | None = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> LearnablePruningModule:
    """Train an LPM for ``model`` (frozen; any family with an adapter) and save it into ``out_dir``; returns it.

    ``processor`` is the model's processor, with a chat template (every record is formatted by it).
    A non-empty ``out_dir`` is refused unless ``resume`` (continue its checkpoint) or ``overwrite`` (delete
    the old run's ``lpm.*`` and ``checkpoint.pt`` first). ``stop_after`` ends the run after that many steps
    of this call (for tests of interrupted runs); the checkpoint in ``out_dir`` then lets ``resume=True``
    continue exactly.
    """
    cfg = config or TrainConfig()
    _check_mask(cfg.mask)
    _check_processor(processor)
    out = Path(out_dir)
    rt = _start_run(out, resume, overwrite, cfg, device)
    ad = adapter_for(model)
    targets, n = _targets(ad, cfg, data.num_frames if getattr(data, "has_video", False) else None)
    previous_impl = _freeze(model, ad, cfg, rt)
    try:
        lpm, opt, scheduler = _new_lpm(ad, cfg, targets, n, rt)
        batches = _Batches(data, processor, ad, cfg, rt)
        trained_on = {**model_fingerprint(model), **data.identity}
        step, history = _restore(out / "checkpoint.pt", resume, cfg, lpm, opt, scheduler, batches, data, trained_on)
        lpm.config.extra["trained_on"] = trained_on
        lpm_t, opt_t = rt.prepare(lpm, opt)
        step = _train_steps(model, ad, lpm_t, opt_t, opt, scheduler, batches, targets, cfg, rt, out, step, history,
                            stop_after, progress, previous_impl)
    finally:
        _unfreeze(model, cfg, previous_impl)
    return _finish(rt.unwrap(lpm_t).eval(), data, cfg, rt, out, step)


def _train_steps(model, ad, lpm_t, opt_t, opt, scheduler, batches: _Batches, targets: _Targets, cfg: TrainConfig,
                 rt: _Runtime, out: Path, step: int, history: list, stop_after: int | None, progress: bool,
                 previous_impl: str) -> int:
    """The optimisation loop from ``step`` to ``cfg.steps`` (or ``stop_after`` steps); checkpoints on the way."""
    from tqdm.auto import tqdm

    data, total, done_here = batches.data, cfg.steps, 0
    per_budget = {cfg.tokens: targets}
    bar = tqdm(total=total, initial=step, desc="train LPM", disable=not (progress and rt.is_main), dynamic_ncols=True)
    while step < total and (stop_after is None or done_here < stop_after):
        batch = {k: v.to(rt.device) for k, v in batches.next().items()}
        tokens = cfg.step_tokens(step)
        if tokens not in per_budget:
            per_budget[tokens] = _Targets(tokens, targets.num_layers, targets.layer)
        loss, parts = step_loss(model, ad, lpm_t, batch, per_budget[tokens], cfg, previous_impl)
        opt_t.zero_grad(set_to_none=True)
        rt.backward(loss)
        opt_t.step()
        scheduler.step()
        step += 1
        done_here += 1
        rec = {"step": step, "loss": rt.reduce_mean(loss), "lr": scheduler.get_last_lr()[0],
               **{k: rt.reduce_mean(v) for k, v in parts.items() if v.dim() == 0}}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", kept=f"{rec['kept']:.3f}",
                        target=f"{rec['target']:.3f}", skipped=sum(data.skipped.values()))
        if rt.is_main and (step % cfg.ckpt_every == 0 or step == total or
                           (stop_after is not None and done_here == stop_after)):
            _save_checkpoint(out / "checkpoint.pt", rt.unwrap(lpm_t), opt, scheduler, step, batches.pos, history,
                             data, cfg)
    bar.close()
    rt.wait()
    return step


def _finish(trained: LearnablePruningModule, data, cfg: TrainConfig, rt: _Runtime, out: Path, step: int):
    """Report skipped records; a finished run saves the LPM (with its run's settings) into ``out``."""
    if data.skipped:
        logger.warning("skipped %d bad record(s): %s", sum(data.skipped.values()), data.skipped)
    if rt.is_main and step >= cfg.steps:
        trained.config.extra.update({"steps": step, "skipped": data.skipped, "train_config": asdict(cfg)})
        if getattr(data, "has_video", False):
            trained.config.extra["frames"] = data.num_frames
        trained.save(out)
    return trained
