"""The run, step by step: targets per token count, freezing the VLM, the LPM, resuming, the steps, the end."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..adapters import Adapter, adapter_for
from ..engine.layout import fill_streams
from ..engine.sequence import layer_additions
from ..hub import model_fingerprint
from ..lpm import LearnablePruningModule, LPMConfig
from ..utils import read_checkpoint, set_rng_state
from .checkpoints import _check_resume_config, _check_trained_on, _save_checkpoint, check_out_dir
from .config import GATED_ATTENTION, TrainConfig
from .data import JsonlRecords, ShapesRecords, _Batches, _order
from .features import FeatureCache
from .gating import _register_gated_attention
from .loss import (
    _check_mask,
    _feature_table,
    _take_rows,
    _Targets,
    prompt_embeddings,
    rotary_positions,
    row_subset,
    rule_mask,
    step_loss,
)
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
    targets = _Targets(cfg.tokens, ad.text_config.num_hidden_layers, cfg.layer, family=ad.family, method=cfg.method)
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
    if _is_set(cfg):
        from .set_policy import SetPolicy

        lpm = SetPolicy(lpm, gamma=cfg.gamma, tau=cfg.tau).to(rt.device)
    groups = lpm.param_groups(cfg.lr) if _is_set(cfg) else lpm.parameters()
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))

    return lpm, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _is_set(cfg: TrainConfig) -> bool:
    """Whether the run trains learnpruner-set's module (REINFORCE on its coverage rule) rather than an LPM (STE)."""
    from ..methods import get_method

    return get_method(cfg.method).stage1 == "coverage"


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
    features: FeatureCache | None = None,
    val: FeatureCache | None = None,
    select=None,
    val_select=None,
) -> LearnablePruningModule:
    """Train an LPM for ``model`` (frozen; any family with an adapter) and save it into ``out_dir``; returns it.

    ``processor`` is the model's processor, with a chat template (every record is formatted by it).
    A non-empty ``out_dir`` is refused unless ``resume`` (continue its checkpoint) or ``overwrite`` (delete
    the old run's ``lpm.*`` and ``checkpoint.pt`` first). ``stop_after`` ends the run after that many steps
    of this call (for tests of interrupted runs); the checkpoint in ``out_dir`` then lets ``resume=True``
    continue exactly.

    ``features``: a :class:`~learnpruner.training.features.FeatureCache` of ``data`` (built by
    :func:`~learnpruner.training.features.build_cache`): the steps read each record's features from it instead of
    encoding its pixels. ``val``: a feature cache of validation records; every ``cfg.val_every`` steps the LPM's
    inference selection is scored on it (:func:`validate`), the curve is plotted into ``out_dir/curve.png``, and
    the LPM saved at the end is the one of the best point of the curve. ``select(keep_prob, features, k, valid)``:
    the training forward's hard mask (default: ``cfg.mask``); ``val_select``: the selection the curve scores
    (default: learnpruner's stage 1, :func:`lpm_stage1`).
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
        batches = (_CachedBatches(features, processor, cfg, rt, model.dtype) if features is not None
                   else _Batches(data, processor, ad, cfg, rt))
        trained_on = {**model_fingerprint(model), **data.identity}
        if features is not None:
            _check_cache_of(features, trained_on)
        step, history = _restore(out / "checkpoint.pt", resume, cfg, lpm, opt, scheduler, batches, data, trained_on)
        lpm.config.extra["trained_on"] = trained_on
        lpm_t, opt_t = rt.prepare(lpm, opt)
        curve = _Curve(val, cfg, out, select=val_select or lpm_stage1, pad_id=processor.tokenizer.pad_token_id or 0)
        curve.load(out / "checkpoint.pt" if resume else None)
        if _is_set(cfg) and cfg.gamma_grid and step == 0:
            if features is None:
                raise ValueError("gamma_grid fits gamma on cached training records: pass a feature cache (--features)")
            from .set_policy import fit_gamma

            fit = fit_gamma(model, ad, lpm, features, targets, cfg.gamma_grid, cfg.gamma_records,
                            processor.tokenizer.pad_token_id or 0)
            lpm.lpm.config.extra["gamma_fit"] = {"records": min(cfg.gamma_records, len(features)), "grid": fit}
            logger.info("gamma fit on the training answer loss: %s", fit)
        if _is_set(cfg) and curve.active and step == 0 and rt.is_main:  # the untrained start: coverage alone
            point = curve.add(model, ad, lpm, targets, 0, 0)
            logger.info("step 0: validation accuracy %.1f%% (answer CE %.3f)", 100 * point["accuracy"], point["ce"])
        step = _train_steps(model, ad, lpm_t, opt_t, opt, scheduler, batches, data, targets, cfg, rt, out, step,
                            history, stop_after, progress, previous_impl, select=select, curve=curve)
    finally:
        _unfreeze(model, cfg, previous_impl)
    trained = _finish(rt.unwrap(lpm_t).eval(), data, cfg, rt, out, step, curve)
    return trained.lpm if _is_set(cfg) else trained


def _check_cache_of(cache: FeatureCache, trained_on: dict) -> None:
    differ = {k: (cache.identity.get(k), v) for k, v in trained_on.items() if cache.identity.get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: {a!r} in the cache, {b!r} in this run" for k, (a, b) in differ.items())
        raise ValueError(f"the feature cache {cache.folder} was built for another model or other data ({shown}); "
                         "build one for this run's --model and --data")


class _CachedBatches:
    """The training stream read from a feature cache: a seeded order of its records, reshuffled each epoch;
    each process reads its own slice (as :class:`~learnpruner.training.data._Batches`); ``pos`` is where it is."""

    def __init__(self, cache: FeatureCache, processor, cfg: TrainConfig, rt, dtype):
        if not len(cache):
            raise ValueError(f"the feature cache {cache.folder} holds no usable record ({cache.skipped})")
        self.cache, self.cfg, self.rt, self.dtype = cache, cfg, rt, dtype
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self.pos = 0
        self._orders: dict[int, np.ndarray] = {}

    def _record(self) -> int:
        index = self.pos * self.rt.world + self.rt.rank
        self.pos += 1
        epoch, offset = divmod(index, len(self.cache))
        if epoch not in self._orders:
            self._orders = {epoch: _order(len(self.cache), self.cfg.seed + epoch)}
        return self.cache.records[int(self._orders[epoch][offset])]

    def next(self):
        return self.cache.batch([self._record() for _ in range(self.cfg.batch_size)], self.pad_id, self.rt.device,
                                self.dtype)


def lpm_stage1(keep_prob: torch.Tensor, feats: torch.Tensor, k: int, diversity: float = 0.1) -> torch.Tensor:
    """LearnPruner's stage 1 at inference (:func:`~learnpruner.selection.lpm_select`: the top ``k`` by
    keep-probability, ``diversity`` of them filled by max-min diversity) as a training-time selection."""
    from ..selection import lpm_select

    return lpm_select(keep_prob, feats, k, diversity)


@torch.no_grad()
def validate(model, ad: Adapter, lpm, cache: FeatureCache, targets, select, pad_id: int, batch_size: int = 32
             ) -> dict:
    """Stage 1 scored on a feature cache of validation records: each record's tokens selected by ``select``
    (``rule(keep_prob, features, k) -> kept``) at the stage-1 count ``targets`` gives its item, the LLM run on the
    text and the kept rows only (what inference computes after stage 1), and the answer read teacher-forced.
    Returns ``{"accuracy": share of records whose every answer token is the argmax, "ce": mean answer
    cross-entropy, "records": count}``."""
    was = lpm.training
    lpm.eval()
    right = total = 0
    ce_sum, tokens = 0.0, 0
    device = next(lpm.parameters()).device
    dtype = next(model.parameters()).dtype
    for start in range(0, len(cache), batch_size):
        cb = cache.batch(cache.records[start:start + batch_size], pad_id, device, dtype)
        batch, visual = cb.batch, cb.visual
        embeds, visual, layout = prompt_embeddings(model, ad, batch, visual)
        positions = rotary_positions(ad, batch)
        adds = fill_streams(ad, visual, [None] * visual.num_images, embeds, layout.vis >= 0)
        feats, valid = _feature_table(visual)
        fractions = [targets(n) for n in visual.counts()]
        k = [n if f is None else max(1, round(f * n)) for n, f in zip(visual.counts(), fractions)]
        if hasattr(lpm, "keep_mask"):  # learnpruner-set's policy: its greedy rule
            hard = lpm.keep_mask(ad, visual, feats, valid, k)
        else:
            hard = rule_mask(select, lpm(feats).float(), feats, k, valid)
        rows, _ = row_subset(hard, valid, layout, 0)
        token = layout.vis >= 0
        gate = torch.ones(token.shape, dtype=embeds.dtype, device=embeds.device)
        e, gate, mask, labels, pos, adds = _take_rows(rows, embeds, gate, batch["attention_mask"], batch["labels"],
                                                      positions, adds)
        with layer_additions(ad, adds):
            logits = model(inputs_embeds=e, attention_mask=mask, learnpruner_gate=gate, use_cache=False,
                           **pos).logits[:, :-1].float()
        target = labels[:, 1:]
        answer = target != -100
        logp = torch.log_softmax(logits, dim=-1)
        ce_sum += float(-logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][answer].sum())
        tokens += int(answer.sum())
        ok = (logits.argmax(dim=-1) == target) | ~answer
        right += int(ok.all(dim=1).sum())
        total += labels.shape[0]
    lpm.train(was)
    return {"accuracy": right / max(1, total), "ce": ce_sum / max(1, tokens), "records": total}


class _Curve:
    """The validation curve of a run: points every ``cfg.val_every`` steps, the best point's LPM weights, a plot."""

    def __init__(self, cache: FeatureCache | None, cfg: TrainConfig, out: Path, select, pad_id: int):
        self.cache, self.cfg, self.out, self.select, self.pad_id = cache, cfg, out, select, pad_id
        self.points: list[dict] = []
        self.best: dict | None = None  # {"step", "accuracy", "ce", "state"}

    @property
    def active(self) -> bool:
        return self.cache is not None and self.cfg.val_every > 0

    def load(self, ckpt: Path | None) -> None:
        if ckpt is not None and ckpt.is_file():
            state = read_checkpoint(ckpt)
            self.points = list(state.get("val_points", []))
            self.best = state.get("val_best")

    def due(self, step: int, total: int) -> bool:
        return self.active and (step % self.cfg.val_every == 0 or step == total)

    def add(self, model, ad, lpm, targets, step: int, samples: int) -> dict:
        point = {"step": step, "samples": samples,
                 **validate(model, ad, lpm, self.cache, targets, self.select, self.pad_id)}
        self.points.append(point)
        if self.best is None or (point["accuracy"], -point["ce"]) > (self.best["accuracy"], -self.best["ce"]):
            self.best = {**point, "state": {k: v.detach().cpu().clone() for k, v in lpm.state_dict().items()}}
        return point

    def state(self) -> dict:
        return {"val_points": self.points, "val_best": self.best}

    def plot(self, history: list[dict]) -> None:
        if self.points:
            from ..viz import plot_training_curve

            plot_training_curve(history, self.points, self.out / "curve.png",
                                title=f"validation: {self.points[-1]['records']} records ({self.cache.folder.name})")


def _train_steps(model, ad, lpm_t, opt_t, opt, scheduler, batches, data, targets: _Targets, cfg: TrainConfig,
                 rt: _Runtime, out: Path, step: int, history: list, stop_after: int | None, progress: bool,
                 previous_impl: str, select=None, curve: _Curve | None = None) -> int:
    """The optimisation loop from ``step`` to ``cfg.steps`` (or ``stop_after`` steps); checkpoints on the way."""
    import time

    from tqdm.auto import tqdm

    total, done_here = cfg.steps, 0
    per_budget = {cfg.tokens: targets}
    bar = tqdm(total=total, initial=step, desc="train LPM", disable=not (progress and rt.is_main), dynamic_ncols=True)
    while step < total and (stop_after is None or done_here < stop_after):
        t0 = time.perf_counter()
        nxt = batches.next()
        visual = None
        if isinstance(batches, _CachedBatches):
            batch, visual = nxt.batch, nxt.visual
        else:
            batch = {k: v.to(rt.device) for k, v in nxt.items()}
        tokens = cfg.step_tokens(step)
        if tokens not in per_budget:
            per_budget[tokens] = _Targets(tokens, targets.num_layers, targets.layer, family=ad.family,
                                          method=cfg.method)
        rows_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step) if cfg.dropped_rows is not None else None
        if _is_set(cfg):
            from .set_policy import policy_loss

            draws = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            loss, parts = policy_loss(model, ad, lpm_t, batch, per_budget[tokens], cfg, visual=visual,
                                      generator=draws)
        else:
            loss, parts = step_loss(model, ad, lpm_t, batch, per_budget[tokens], cfg, previous_impl, visual=visual,
                                    select=select, generator=rows_rng)
        opt_t.zero_grad(set_to_none=True)
        rt.backward(loss)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(lpm_t.parameters(), cfg.clip_grad)
        opt_t.step()
        scheduler.step()
        step += 1
        done_here += 1
        rec = {"step": step, "loss": rt.reduce_mean(loss), "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - t0,
               **{k: rt.reduce_mean(v) for k, v in parts.items() if v.dim() == 0}}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", kept=f"{rec['kept']:.3f}",
                        target=f"{rec['target']:.3f}", skipped=sum(data.skipped.values()))
        if curve is not None and curve.due(step, total) and rt.is_main:
            point = curve.add(model, ad, rt.unwrap(lpm_t), targets, step, step * cfg.batch_size * rt.world)
            curve.plot(history)
            bar.write(f"step {step}: validation accuracy {100 * point['accuracy']:.1f}% (answer CE "
                      f"{point['ce']:.3f}, {point['records']} records)")
        if rt.is_main and (step % cfg.ckpt_every == 0 or step == total or
                           (stop_after is not None and done_here == stop_after)):
            _save_checkpoint(out / "checkpoint.pt", rt.unwrap(lpm_t), opt, scheduler, step, batches.pos, history,
                             data, cfg, extra=curve.state() if curve is not None else None)
    bar.close()
    rt.wait()
    return step


def _finish(trained: LearnablePruningModule, data, cfg: TrainConfig, rt: _Runtime, out: Path, step: int,
            curve: _Curve | None = None):
    """Report skipped records; a finished run saves the LPM (with its run's settings) into ``out``: with a
    validation curve, the weights of its best point (the curve ships in ``lpm.json``)."""
    if data.skipped:
        logger.warning("skipped %d bad record(s): %s", sum(data.skipped.values()), data.skipped)
    if rt.is_main and step >= cfg.steps:
        extra = {"steps": step, "skipped": data.skipped, "train_config": asdict(cfg)}
        if curve is not None and curve.best is not None:
            trained.load_state_dict(curve.best["state"])
            extra["validation"] = {"data": curve.cache.identity.get("data"), "records": curve.best["records"],
                                   "chosen_step": curve.best["step"], "accuracy": curve.best["accuracy"],
                                   "ce": curve.best["ce"],
                                   "curve": [{k: p[k] for k in ("step", "samples", "accuracy", "ce")}
                                             for p in curve.points]}
        trained.config.extra.update(extra)
        if getattr(data, "has_video", False):
            trained.config.extra["frames"] = data.num_frames
        trained.save(out)
    return trained
