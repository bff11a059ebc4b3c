"""Training the Learnable Pruning Module (LearnPruner stage 1, arXiv 2604.23950 Sec. 3.2).

The VLM is frozen; only the LPM trains. The paper publishes neither its loss nor its schedule, so
this follows the closest published recipe (Dynamic-LLaVA's learned predictor) and states every choice:

* **Any supported family.** The images go through the adapter's ``encode`` (per image its feature rows at
  the vision feature layer, in token order, and the placeholders they fill), so the LPM sees what it sees
  at inference: LLaVA-1.5's 576 rows per image, or every crop of a LLaVA-NeXT image (base crop plus the
  unpadded AnyRes grid; the row newlines are structure, filled with the adapter's embedding, never gated).
  Images of one batch may have different token counts: per-image tables are padded with a validity mask.
  Each image's target is the schedule inference gives an image of its count at the training budget.
  Video-LLaVA: records with a ``video`` (frames sampled uniformly, 8 by default) and records with an image
  may share a dataset and a batch; a video is one item of all its frames' rows (8 x 257 = 2056 at 224 px).
* **Prompts from the processor's chat template.** Each record becomes chat messages; the processor's
  ``apply_chat_template`` formats them the family's way and the processor tokenizes them (expanding the
  image placeholder to the image's token count). Labels cover each assistant turn: the tokens between the
  prompt with the generation prompt and the prompt with that answer (its end token included).
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
* **Stage 2 in the training forward** (``stage2``, off by default). Inference drops visual tokens a second
  time, in the LLM (the text-attention drop of layer ``K``). With ``stage2=True`` the training forward does the
  same: the instruction's attention in layer ``K - 1`` (over the stage-1 set, as at inference) picks each
  image's ``r2`` tokens, and from layer ``K`` on the others are gated out too. The answer loss then reflects the
  whole two-stage pipeline, so the LPM learns which tokens serve the layers before the drop and which survive
  it. The stage-2 pick is a hard, non-differentiable selection (as at inference); the LPM's gradient reaches it
  through the gates of the tokens in each layer.
* **Loss** = next-token cross-entropy on answer tokens + ``ratio_weight * (kept fraction - rho)^2``
  (per image, the kept fraction through the STE, so the forward value is the real hard fraction; the
  mean over images) with ``rho = r1 / n`` for the target budget (64 tokens -> r1 = 111 of 576 for
  LLaVA-1.5-7B) + optional ``distill_weight * KL(unpruned || pruned)`` on the answer tokens' next-token
  distributions (off by default: it costs a second forward per step). An image whose count is within
  the budget is not pruned at inference: it is never gated and has no keep-ratio term.

Runs on a CPU, one GPU, or many GPUs through ``accelerate launch`` (DDP over the LPM) with no code
change; checkpoints (LPM, optimizer, scheduler, step, data position, RNG) are written atomically as
plain data (tensors, numbers, strings, lists, dicts; read back with ``weights_only=True``, so a checkpoint
can never run code) and ``resume=True`` continues exactly. A new run refuses a non-empty ``out_dir``
unless ``overwrite=True``.
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it; loaded on first use (PEP 562), so the CLI reads TrainConfig's defaults
# without importing torch
_LAZY = {
    "check_out_dir": ".checkpoints", "iter_history": ".checkpoints",
    "GATED_ATTENTION": ".config", "MASKS": ".config", "RUN_FILES": ".config", "TrainConfig": ".config",
    "Example": ".data", "JsonlRecords": ".data", "ShapesRecords": ".data", "SkipRecord": ".data",
    "_collate": ".data", "_encode": ".data", "chat_messages": ".data",
    "Stage2Gate": ".gating", "_register_gated_attention": ".gating", "gated_attention": ".gating",
    "train_lpm": ".loop",
    "_Targets": ".loss", "hard_keep_mask": ".loss", "prompt_embeddings": ".loss", "rotary_positions": ".loss",
    "step_loss": ".loss",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'learnpruner.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
