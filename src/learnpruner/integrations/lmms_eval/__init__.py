"""lmms-eval 0.7.x integration: the model ``learnpruner`` and an offline ShapesVQA task.

lmms-eval finds the model through the entry-point group ``lmms_eval.models`` (``pyproject.toml``
points it at :func:`manifests`), so after ``pip install -e ".[lmms-eval]"``::

    python -m lmms_eval --model learnpruner \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=learnpruner,tokens=64,lpm=PATH --tasks gqa

- :mod:`.config`: the model arguments, checked before any weights load, and the loader (no lmms-eval import).
- :mod:`.model`: :class:`~.model.LearnPrunerLMM`, the lmms-eval model (imports lmms-eval).
- :mod:`.task`: ``learnpruner lmms-task``, which writes the offline ShapesVQA task.

This package imports neither lmms-eval nor transformers at import time.
"""

from __future__ import annotations

__all__ = ["MODEL_NAME", "CLASS_PATH", "manifests"]

MODEL_NAME = "learnpruner"
CLASS_PATH = "learnpruner.integrations.lmms_eval.model.LearnPrunerLMM"


def manifests():
    """The lmms-eval model manifests this package registers (the ``lmms_eval.models`` entry point's target)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]
