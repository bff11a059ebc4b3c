"""Training the Learnable Pruning Module (LearnPruner stage 1, arXiv 2604.23950 Sec. 3.2).

The VLM is frozen; only the LPM trains. The paper publishes neither its loss nor its schedule, so
this follows the closest published recipe (Dynamic-LLaVA's learned predictor) and states every choice:

* **Straight-through estimator.** The forward pass uses the hard keep mask ``keep = p > 0.5``
  (the argmax of the LPM's two-class softmax); gradients flow through the soft keep-probability
  ``p`` (``gate = keep + p - p.detach()``).
* **Which tokens the hard mask keeps** (``mask``). ``"threshold"`` (default, the argmax above)
  lets the kept count vary per image, and the keep-ratio term below pulls it to the target.
  ``"topk"`` keeps exactly the top ``r1`` by ``p`` in every image, as inference does, so the
  training forward sees the inference-time token count from the first step and the answer loss
  trains the ranking that inference uses (the keep-ratio term is then zero). On the ShapesVQA
  testbed the threshold mask's kept fraction stayed far from the target in short runs (0.4 to 0.9
  against 0.19 over 300 steps at lr 1e-3; at lr 1e-2 it collapsed to about 0.05 and stayed there),
  while ``"topk"`` needs no calibration. The shipped ShapesVQA LPM says which one trained it (``lpm.json``).
* **Dropping by attention, not by removal.** The hard mask's size varies per image, so during
  training dropped visual tokens stay in the sequence but are excluded from every LLM layer's
  attention: an attention function multiplies each key's post-softmax probability by its gate and
  renormalises, which equals removing the dropped keys in the forward pass and still passes a
  gradient to the gates of dropped tokens (a gate of 0 on an additive mask would pass none).
  At inference the engine physically keeps the top ``r1`` by keep-probability.
* **Loss** = next-token cross-entropy on answer tokens + ``ratio_weight * (kept fraction - rho)^2``
  (the kept fraction through the STE, so the forward value is the real hard fraction) with
  ``rho = r1 / n`` for the target budget (64 tokens -> r1 = 111 of 576 for LLaVA-1.5-7B) +
  optional ``distill_weight * KL(unpruned || pruned)`` on the answer tokens' next-token
  distributions (off by default: it costs a second forward per step).

Runs on a CPU, one GPU, or many GPUs through ``accelerate launch`` (DDP over the LPM) with no code
change; checkpoints (LPM, optimizer, scheduler, step, data position, RNG) are written atomically as
plain data (tensors, numbers, strings, lists, dicts; read back with ``weights_only=True``, so a checkpoint
can never run code) and ``resume=True`` continues exactly. A new run refuses a non-empty ``out_dir``
unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import adapter_for
from .lpm import LearnablePruningModule, LPMConfig
from .methods import get_method
from .utils import atomic_torch_save, read_checkpoint, rng_state, set_rng_state
from .utils import check_out_dir as _check_out_dir

__all__ = ["TrainConfig", "train_lpm", "check_out_dir", "LlavaRecords", "ShapesRecords", "GATED_ATTENTION"]

logger = logging.getLogger(__name__)
GATED_ATTENTION = "learnpruner_gated"
MASKS = ("threshold", "topk")
RUN_FILES = ("lpm.safetensors", "lpm.json", "checkpoint.pt")  # what a run writes into its out_dir


@dataclass
class TrainConfig:
    """Defaults for LPM training; every weight is configurable."""

    tokens: int = 64
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    ratio_weight: float = 4.0
    mask: str = "threshold"
    distill_weight: float = 0.0
    hidden_dim: int = 512
    seed: int = 0
    ckpt_every: int = 100
    grad_ckpt: bool = False
    bf16: bool = False
    max_length: int = 2048
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# gated attention: dropped keys excluded in the forward pass, gradient to the gates


def gated_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, learnpruner_gate=None,
                    **kwargs):
    """Eager attention whose post-softmax key probabilities are multiplied by ``learnpruner_gate`` [b, s_kv]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(weights.float(), dim=-1)
    if learnpruner_gate is not None:
        probs = probs * learnpruner_gate[:, None, None, : key.shape[-2]].float()
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, probs


def _register_gated_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GATED_ATTENTION, gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, eager_mask)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    image: object  # PIL image
    turns: list[tuple[str, str]]  # (human, gpt) pairs; the first human turn holds <image>


class _Records:
    """Bad-record bookkeeping shared by the data sources: each bad record is counted once."""

    def __init__(self):
        self.skipped: dict[str, int] = {}
        self._bad: set[int] = set()

    def skip(self, index: int, reason: str) -> None:
        if index not in self._bad:
            self._bad.add(index)
            self.skipped[reason] = self.skipped.get(reason, 0) + 1


class LlavaRecords(_Records):
    """LLaVA instruction data: a JSON list or JSONL of ``{"image", "conversations"}`` records.

    ``image`` is relative to ``image_folder``; ``conversations`` alternates ``{"from": "human"}``
    and ``{"from": "gpt"}`` turns, the first human turn containing ``<image>``. Records without an
    image, with a missing or unreadable image, or without an ``<image>`` tag are skipped and
    counted in ``skipped`` (reason -> count); they never stop a run.
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None = None):
        super().__init__()
        text = Path(path).read_text()
        try:
            data = json.loads(text)
            records = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            records = []
            for line in text.splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        records.append(None)
        self.records = records
        self.image_folder = Path(image_folder) if image_folder else Path(path).parent
        if not self.records:
            raise ValueError(f"no records in {str(path)!r}: expected a JSON list or JSONL of LLaVA records")

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> Example | None:
        from PIL import Image

        if index in self._bad:
            return None

        def bad(reason: str) -> None:
            self.skip(index, reason)

        rec = self.records[index]
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            bad("malformed record")
            return None
        if not rec.get("image"):
            bad("no image")
            return None
        conv = rec["conversations"]
        turns = []
        for human, gpt in zip(conv[0::2], conv[1::2]):
            if not (isinstance(human, dict) and isinstance(gpt, dict)):
                break
            turns.append((str(human.get("value", "")), str(gpt.get("value", ""))))
        if not turns:
            bad("no human/gpt turn")
            return None
        if "<image>" not in turns[0][0]:
            bad("no <image> tag")
            return None
        if sum(h.count("<image>") for h, _ in turns) > 1:
            bad("more than one <image> tag")
            return None
        try:
            with Image.open(self.image_folder / rec["image"]) as im:
                image = im.convert("RGB")
        except (OSError, ValueError):
            bad("missing or unreadable image")
            return None
        return Example(image, turns)


class ShapesRecords(_Records):
    """The ShapesVQA training stream as examples (one question per image)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def __len__(self) -> int:
        return 10**9

    def get(self, index: int) -> Example:
        from .testbed.shapes import generate_item

        item = generate_item("train", index, seed=self.seed)
        return Example(item.image, [(f"<image>\n{item.question}", item.answer)])


def _encode(example: Example, tokenizer, image_token_id: int, n_visual: int, max_length: int):
    """Token ids and labels in LLaVA-1.5's format ``USER: <image>\nQ ASSISTANT: A</s>USER: ...``.

    Labels are -100 except on the assistant answers and their end token. Returns None when the
    sequence is longer than ``max_length``.
    """

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [-100] * len(ids)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for k, (human, gpt) in enumerate(example.turns):
        if k == 0:
            before, _, after = human.partition("<image>")
            prompt = tok(f"USER: {before.strip()}".strip()) + [image_token_id] * n_visual
            prompt += tok(f"{after.strip()} ASSISTANT:")
        else:
            prompt = tok(f"USER: {human.strip()} ASSISTANT:")
        answer = tok(f" {gpt.strip()}") + end
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return (ids, labels) if len(ids) <= max_length else None


# --------------------------------------------------------------------------------------------------
# runtime: plain or accelerate


class _Runtime:
    def __init__(self, bf16: bool, device: str | None):
        self.acc = None
        try:
            from accelerate import Accelerator

            if int(os.environ.get("WORLD_SIZE", "1")) > 1 or device is None:
                # accelerate sets up CPU-only multi-process (gloo) training only when told cpu=True
                no_accelerator = not (hasattr(torch, "accelerator") and torch.accelerator.is_available())
                cpu = device == "cpu" or (device is None and no_accelerator)
                self.acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu)
        except ImportError:
            pass
        self.device = self.acc.device if self.acc else torch.device(device or "cpu")
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.is_main = self.rank == 0

    def prepare(self, *objs):
        return self.acc.prepare(*objs) if self.acc else objs

    def backward(self, loss):
        if self.acc:
            self.acc.backward(loss)
        else:
            loss.backward()

    def unwrap(self, module):
        return self.acc.unwrap_model(module) if self.acc else module

    def reduce_mean(self, value: torch.Tensor) -> float:
        if self.acc and self.world > 1:
            value = self.acc.reduce(value.detach(), reduction="mean")
        return float(value.detach())

    def wait(self):
        if self.acc:
            self.acc.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# the loop


def train_lpm(
    model,
    processor,
    data: LlavaRecords | ShapesRecords,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    device: str | None = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> LearnablePruningModule:
    """Train an LPM for ``model`` (frozen) and save it into ``out_dir``; returns the trained LPM.

    A non-empty ``out_dir`` is refused unless ``resume`` (continue its checkpoint) or ``overwrite`` (delete
    the old run's ``lpm.*`` and ``checkpoint.pt`` first). ``stop_after`` ends the run after that many steps
    of this call (for tests of interrupted runs); the checkpoint in ``out_dir`` then lets ``resume=True``
    continue exactly.
    """
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    _check_mask(cfg.mask)
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    old_run = check_out_dir(out, resume, overwrite)
    rt = _Runtime(cfg.bf16, device)
    if old_run and rt.is_main:
        for path in old_run:
            path.unlink(missing_ok=True)
    rt.wait()
    ad = adapter_for(model)
    n = ad.num_visual_tokens()
    num_layers = ad.text_config.num_hidden_layers
    sched = get_method("learnpruner").schedule(cfg.tokens, n, num_layers, {})
    if sched.r1 is None:
        raise ValueError(f"tokens={cfg.tokens} keeps every one of the {n} visual tokens in stage 1: nothing to train")
    rho = sched.r1 / n

    _register_gated_attention()
    previous_impl = ad.text_config._attn_implementation
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    model.requires_grad_(False).eval().to(rt.device)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    torch.manual_seed(cfg.seed)
    lpm = LearnablePruningModule(LPMConfig(
        feature_dim=ad.feature_dim(), hidden_dim=cfg.hidden_dim, family=ad.family,
        feature_layer=ad.feature_layer(), num_tokens=n,
        extra={"trained_tokens": cfg.tokens, "r1": sched.r1, "keep_ratio": rho},
    )).to(rt.device)
    opt = torch.optim.AdamW(lpm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.steps

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step, pos, history = 0, 0, []
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path, ("lpm", "opt", "sched", "step", "pos", "history", "rng"))
        _check_resume_config(state.get("config", {}), asdict(cfg), ckpt_path)
        lpm.load_state_dict(state["lpm"])
        opt.load_state_dict(state["opt"])
        scheduler.load_state_dict(state["sched"])
        step, pos, history = state["step"], state["pos"], state["history"]
        data.skipped = dict(state.get("skipped", {}))
        data._bad = set(state.get("bad", []))
        set_rng_state(state["rng"])
    elif resume:
        logger.warning("no checkpoint at %s: starting from scratch", ckpt_path)
    lpm_t, opt_t = rt.prepare(lpm, opt)

    tokenizer = processor.tokenizer
    image_processor = processor.image_processor
    image_token_id = ad.image_token_id
    order = _order(len(data), cfg.seed) if isinstance(data, LlavaRecords) else None

    def next_batch():
        nonlocal pos
        examples = []
        while len(examples) < cfg.batch_size:
            if len(data._bad) >= len(data):
                raise ValueError(f"no usable training record: every record was skipped ({data.skipped})")
            # every process reads its own slice of the global order
            index = pos * rt.world + rt.rank
            pos += 1
            if order is not None:
                epoch, offset = divmod(index, len(order))
                index = int(_order(len(order), cfg.seed + epoch)[offset]) if epoch else int(order[offset])
            ex = data.get(index)
            if ex is None:
                continue
            enc = _encode(ex, tokenizer, image_token_id, n, cfg.max_length)
            if enc is None:
                data.skip(index, "too long")
                continue
            examples.append((ex.image, *enc))
        return _collate(examples, image_processor, tokenizer.pad_token_id or 0)

    bar = tqdm(total=total, initial=step, desc="train LPM", disable=not (progress and rt.is_main), dynamic_ncols=True)
    done_here = 0
    while step < total and (stop_after is None or done_here < stop_after):
        batch = {k: v.to(rt.device) for k, v in next_batch().items()}
        loss, parts = step_loss(model, ad, lpm_t, batch, rho, cfg, previous_impl)
        opt_t.zero_grad(set_to_none=True)
        rt.backward(loss)
        opt_t.step()
        scheduler.step()
        step += 1
        done_here += 1
        rec = {"step": step, "loss": rt.reduce_mean(loss), "lr": scheduler.get_last_lr()[0],
               **{k: rt.reduce_mean(v) for k, v in parts.items() if k != "keep_prob"}}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", kept=f"{rec['kept']:.3f}",
                        target=f"{rho:.3f}", skipped=sum(data.skipped.values()))
        if rt.is_main and (step % cfg.ckpt_every == 0 or step == total or
                           (stop_after is not None and done_here == stop_after)):
            _save_checkpoint(ckpt_path, rt.unwrap(lpm_t), opt, scheduler, step, pos, history, data, cfg)
    bar.close()
    rt.wait()
    model.set_attn_implementation({"text_config": previous_impl})
    if cfg.grad_ckpt:
        model.gradient_checkpointing_disable()
    trained = rt.unwrap(lpm_t).eval()
    if data.skipped:
        logger.warning("skipped %d bad record(s): %s", sum(data.skipped.values()), data.skipped)
    if rt.is_main and step >= total:
        trained.config.extra.update({"steps": step, "skipped": data.skipped, "train_config": asdict(cfg)})
        trained.save(out)
    return trained


def check_out_dir(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """Refuse to start a new run in a non-empty ``out_dir``; returns the old run's files (``RUN_FILES``) that
    ``overwrite`` deletes. ``resume`` with a ``checkpoint.pt`` there continues that run."""
    return _check_out_dir(out_dir, resume, overwrite, RUN_FILES)


RESUME_MAY_CHANGE = ("steps", "ckpt_every")


def _check_resume_config(saved: dict, now: dict, path: Path) -> None:
    """Resuming continues exactly, so only ``RESUME_MAY_CHANGE`` may differ from the checkpoint's run."""
    diff = {k: (saved[k], now.get(k)) for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != now.get(k)}
    if diff:
        shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {path} with different settings ({shown}); "
                         "use the checkpoint's settings or another --out")


def hard_keep_mask(keep_prob: torch.Tensor, rho: float, mask: str = "threshold") -> torch.Tensor:
    """The forward pass's 0/1 keep mask ``[b, n]``: ``p > 0.5``, or exactly the top ``round(rho * n)``."""
    if mask == "threshold":
        return (keep_prob > 0.5).to(keep_prob.dtype)
    _check_mask(mask)
    k = max(1, round(rho * keep_prob.shape[-1]))
    idx = keep_prob.detach().topk(k, dim=-1).indices
    return torch.zeros_like(keep_prob).scatter_(-1, idx, 1.0)


def _check_mask(mask: str) -> None:
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; accepted: {', '.join(MASKS)}")


def step_loss(model, ad, lpm, batch: dict, rho: float, cfg: TrainConfig, teacher_impl: str = "sdpa"):
    """The training loss for one batch (the model must use the gated attention): ``(loss, parts)``.

    ``parts`` holds ``ce``, ``ratio``, ``kl``, ``kept`` (hard kept fraction) and ``keep_prob``.
    """
    lm = ad.language_model
    image_token_id = ad.image_token_id
    with torch.no_grad():
        feats = ad.vision_features(batch["pixel_values"].to(model.dtype))
        embeds = lm.embed_tokens(batch["input_ids"])
        placeholders = batch["input_ids"] == image_token_id
        proj = ad.project(feats).to(embeds.dtype)
        embeds = embeds.masked_scatter(placeholders[..., None], proj.reshape(-1, proj.shape[-1]))
        teacher = None
        if cfg.distill_weight > 0:
            model.set_attn_implementation({"text_config": teacher_impl})
            teacher = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
            model.set_attn_implementation({"text_config": GATED_ATTENTION})
    keep_prob = lpm(feats)  # [b, n]
    hard = hard_keep_mask(keep_prob, rho, cfg.mask)
    gate_vis = hard + keep_prob - keep_prob.detach()  # straight-through: hard forward, soft gradient
    gate = torch.ones(placeholders.shape, dtype=gate_vis.dtype, device=gate_vis.device)
    gate = gate.masked_scatter(placeholders, gate_vis.reshape(-1))
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                learnpruner_gate=gate, use_cache=False)
    ratio = ((gate_vis.mean(dim=1) - rho) ** 2).mean()
    loss = out.loss + cfg.ratio_weight * ratio
    kl = torch.zeros((), device=loss.device)
    if teacher is not None:
        answer = batch["labels"][:, 1:] != -100
        s_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)[answer]
        t_logp = torch.log_softmax(teacher[:, :-1].float(), dim=-1)[answer]
        kl = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        loss = loss + cfg.distill_weight * kl
    return loss, {"ce": out.loss.detach(), "ratio": ratio.detach(), "kl": kl.detach(), "kept": hard.mean(),
                  "keep_prob": keep_prob}


def _order(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(length)


def _collate(examples, image_processor, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for _, ids, _ in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (_, ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    pixels = image_processor([img for img, _, _ in examples], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def _save_checkpoint(path: Path, lpm: nn.Module, opt, scheduler, step, pos, history, data, cfg) -> None:
    state = {"lpm": lpm.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(), "step": step,
             "pos": pos, "history": history, "skipped": dict(data.skipped), "bad": sorted(data._bad),
             "rng": rng_state(), "config": asdict(cfg)}
    atomic_torch_save(state, path)


def iter_history(out_dir: str | os.PathLike) -> Iterator[dict]:
    """The per-step records of a run's checkpoint (loss, ce, kept, kl, lr)."""
    yield from read_checkpoint(Path(out_dir) / "checkpoint.pt", ("history",))["history"]
