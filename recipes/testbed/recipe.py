"""The testbed trainer's settings (:class:`TestbedConfig`: the recipe, its defaults and its checks) and what a run
writes."""

from __future__ import annotations

from dataclasses import dataclass

STAGE_A_SEED_OFFSET = 1_000_003  # stage (a) images come from a different training stream than stage (b)
# what a run writes into OUT (glob patterns): checkpoint, metrics, and the save_pretrained model and processor
RUN_FILES = ("checkpoint.pt", "metrics.json", "config.json", "generation_config.json", "model*.safetensors",
             "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
             "processor_config.json", "preprocessor_config.json", "chat_template.*")


@dataclass
class TestbedConfig:
    """Hyper-parameters of the staged recipe (see :mod:`recipes.testbed.train`)."""

    __test__ = False  # not a pytest class, whatever its name

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
