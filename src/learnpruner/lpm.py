"""The Learnable Pruning Module (LPM), LearnPruner's stage 1 (arXiv 2604.23950, Sec. 3.2).

A small MLP classifies each visual token as keep/drop from the vision encoder's features at the
vision feature layer (CLIP layer -2 for LLaVA, before the projector): ``softmax(MLP(x))`` over two
classes, class 1 = keep. Default shape ``Linear(d, 512) -> GELU -> Linear(512, 2)`` (about 0.53M
parameters for CLIP-L's d = 1024).

On disk an LPM is a folder with ``lpm.safetensors`` (weights) and ``lpm.json`` (metadata: the
model family, feature layer, feature width and number of visual tokens it was trained for).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .utils import atomic_write

__all__ = ["LPMConfig", "LearnablePruningModule", "lpm_digest"]

FORMAT = "learnpruner-lpm"
WEIGHTS = "lpm.safetensors"
META = "lpm.json"


@dataclass
class LPMConfig:
    """What an LPM was built for. ``family`` and ``feature_dim`` must match the model it prunes."""

    feature_dim: int
    hidden_dim: int = 512
    family: str = "llava"
    feature_layer: int | list[int] = -2
    num_tokens: int | None = None
    extra: dict = field(default_factory=dict)


def lpm_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of an LPM folder's two files (weights, then metadata): what its answers depend on, so a result can
    tell two LPMs at the same path apart (an LPM retrained in place)."""
    import hashlib

    h = hashlib.sha256()
    for name in (WEIGHTS, META):
        with open(Path(folder) / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


class LearnablePruningModule(nn.Module):
    """Keep/drop classifier over visual tokens. ``forward(x) -> keep-probability [..., n]``."""

    def __init__(self, config: LPMConfig):
        super().__init__()
        self.config = config
        # where it was loaded from: {"path", "sha256"} (:func:`lpm_digest`); None for one built in memory
        self.source: dict | None = None
        self.mlp = nn.Sequential(
            nn.Linear(config.feature_dim, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, 2),
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Two-class logits ``[..., n, 2]`` (class 1 = keep)."""
        p = next(self.parameters())
        return self.mlp(features.to(p.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features).float(), dim=-1)[..., 1]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``lpm.safetensors`` and ``lpm.json`` into folder ``path`` (atomically)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "version": 1, **asdict(self.config)}
        atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        atomic_write(out / META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> LearnablePruningModule:
        """Load from a folder written by :meth:`save` (or the ``lpm.safetensors`` file inside it)."""
        p = Path(path)
        folder = p.parent if p.suffix == ".safetensors" else p
        meta_path, weights_path = folder / META, folder / WEIGHTS
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"no LPM at {str(path)!r}: expected a folder with {WEIGHTS} and {META} (as written by "
                f"LearnablePruningModule.save or `learnpruner train`)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e}); expected the metadata written by "
                             f"LearnablePruningModule.save") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{meta_path} is not a learnpruner LPM (expected a JSON object with "
                             f"format={FORMAT!r}, got {found!r})")
        fields = {k: meta[k] for k in ("feature_dim", "hidden_dim", "family", "feature_layer", "num_tokens", "extra")
                  if k in meta}
        try:
            module = cls(LPMConfig(**fields))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{meta_path} has invalid LPM metadata {fields}: {e}") from None
        try:
            state = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{weights_path} is not a readable safetensors file ({e}); re-save or re-train the "
                             f"LPM") from None
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} does not match {meta_path} (feature_dim={module.config.feature_dim}, "
                             f"hidden_dim={module.config.hidden_dim}): {str(e).splitlines()[-1].strip()}") from None
        bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{weights_path} holds NaN or infinite values in {', '.join(sorted(bad))}; "
                             f"the LPM is unusable (re-train it)")
        module.source = {"path": str(folder.resolve()), "sha256": lpm_digest(folder)}
        return module

    def check_compatible(self, family: str, feature_dim: int, feature_layer: int | list[int]) -> None:
        """Raise ``ValueError`` when this LPM was trained for another model family or feature width."""
        c = self.config
        if c.family != family:
            raise ValueError(f"this LPM was trained for model family {c.family!r}, but the model is {family!r}")
        if c.feature_dim != feature_dim:
            raise ValueError(
                f"this LPM expects vision features of width {c.feature_dim}, but the model's vision feature "
                f"layer gives width {feature_dim}"
            )
        if c.feature_layer != feature_layer:
            raise ValueError(
                f"this LPM was trained on vision feature layer {c.feature_layer}, but the model uses {feature_layer}"
            )
