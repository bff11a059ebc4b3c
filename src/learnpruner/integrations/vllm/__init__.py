"""learnpruner's stage 1 inside vLLM: pruned variants of vLLM's model classes, chosen without code.

``register()`` is the ``vllm.general_plugins`` entry point (vLLM calls it in every process); it registers the
pruned classes under their own architecture names. A served model picks one with ``hf_overrides``, whose
``learnpruner`` entry carries the method, the budget and the options; :func:`overrides` builds that dict
(``json.dumps`` it for ``vllm serve --hf-overrides``)::

    from vllm import LLM
    from learnpruner.integrations.vllm import overrides
    llm = LLM("llava-hf/llava-1.5-7b-hf", hf_overrides=overrides("llava", "learnpruner", tokens=64))

What runs, and the price of what does not, is in docs/serving.md.
"""

from __future__ import annotations

import json

__all__ = ["register", "overrides", "model_class", "ARCHITECTURES", "POSITIONS", "TESTED_VLLM"]



def _served() -> dict:
    """key -> :class:`~learnpruner.adapters.Served`, from every registered adapter's ``served`` (a family declares
    what vLLM serves of it in its adapter; nothing here lists families)."""
    from ...adapters import ADAPTERS

    return {s.key: s for cls in reversed(ADAPTERS) for s in cls.served}


def __getattr__(name: str):
    """``ARCHITECTURES``: key -> (vLLM's architecture, the pruned one, the module holding it, the guarded stock
    class); ``POSITIONS``: how each key's vLLM model numbers the kept tokens (LLaVA's 1-D positions run on over the
    shortened prompt; M-RoPE families keep the kept tokens' original 3-D positions, as the transformers engine
    does). Built on first use from the adapters (so that the CLI's parser imports no torch)."""
    if name == "ARCHITECTURES":
        return _architectures()
    if name == "POSITIONS":
        return {k: s.positions for k, s in _served().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _architectures() -> dict[str, tuple[str, str, str, str]]:
    return {k: (s.stock, s.architecture, f"{s.module}:{s.pruned}", f"{s.module}:{s.guard}")
            for k, s in _served().items()}
TESTED_VLLM = ("0.32.",)  # the plugin uses private vLLM interfaces: the versions it is tested on


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM version the plugin was not tested on, naming both."""
    if version is None:
        import vllm

        version = vllm.__version__
    if not version.startswith(TESTED_VLLM):
        raise RuntimeError(f"learnpruner's vLLM plugin is tested on vLLM {', '.join(v + 'x' for v in TESTED_VLLM)}; "
                           f"this is vLLM {version} (it uses vLLM's internal model interfaces): install "
                           "learnpruner[vllm]")


def register() -> None:
    """Register the pruned model classes with vLLM (the ``vllm.general_plugins`` entry point), and, under vLLM's own
    architecture names, its classes guarded against a learnpruner entry that names no pruned architecture
    (:func:`~.stage1.guarded`: they refuse it at engine start; without the entry they are vLLM's classes)."""
    from vllm import ModelRegistry

    check_vllm_version()
    for stock, arch, target, guard in _architectures().values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{__name__}.{target}")
        ModelRegistry.register_model(stock, f"{__name__}.{guard}")


def model_class(family: str):
    """The pruned vLLM model class of ``family`` (imports vLLM)."""
    import importlib

    module, name = _architectures()[family][2].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def overrides(family: str, method: str = "learnpruner", tokens: int | None = None, *, ratio: float | None = None,
              as_json: bool = False, **options) -> dict | str:
    """The ``hf_overrides`` that serve a ``family`` model ("llava", ...) with ``method`` at a budget of
    ``tokens`` (or ``ratio``) visual tokens per image in every layer; ``options`` are the method's options
    (``lpm=PATH`` among them). Checked now as ``learnpruner.apply`` checks them; ``as_json`` for the command
    line's ``--hf-overrides``."""
    from .stage1 import CONFIG_KEY, Stage1Spec

    architectures = _architectures()
    if family not in architectures:
        raise ValueError(f"family {family!r} has no vLLM integration; accepted: {', '.join(architectures)}")
    spec = Stage1Spec.check(method, tokens, ratio, options, family=family)
    entry = {"method": spec.method, "tokens": spec.tokens, "ratio": spec.ratio, "options": spec.options}
    result = {"architectures": [architectures[family][1]], CONFIG_KEY: entry}
    return json.dumps(result) if as_json else result
