"""``learnpruner demo``: a few ShapesVQA questions, unpruned and with LearnPruner, with pictures."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import learnpruner

from .hub import format_prompt, load
from .testbed.shapes import load_split
from .viz import overlay_kept

__all__ = ["run_demo"]


def _answer(model, processor, item, device):
    inputs = processor(images=item.image, text=format_prompt(processor, item.question), return_tensors="pt").to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    dt = time.perf_counter() - t0
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    return text, dt


def run_demo(model_name: str = "shapes-tiny", images: int = 4, budgets=(64, 32), out_dir: str = "learnpruner-demo",
             device: str = "cpu", lpm=None, print_fn=print) -> list[Path]:
    """Answer ``images`` test questions with the unpruned model and LearnPruner at each budget; write overlays."""
    if images <= 0:
        raise ValueError(f"--images must be a positive integer, got {images}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)  # fails now, not after the work, where it cannot be written
    model, processor = load(model_name, device=device)
    options = {} if lpm is None else {"lpm": lpm}
    if lpm is None and model_name == "tiny-random-llava":
        options["lpm"] = "random"
        print_fn("note: tiny-random-llava has random weights and an untrained LPM; its answers are noise")
    written = []
    for item in load_split("test", images):
        print_fn(f"\n[{item.qtype}] {item.question}   (answer: {item.answer})")
        text, dt = _answer(model, processor, item, device)
        print_fn(f"  none        {576:>3} tokens  -> {text!r:14} {dt * 1000:7.0f} ms")
        panels = [(f"unpruned (576 tokens): {text!r}", None, None)]
        for tokens in budgets:
            learnpruner.apply(model, "learnpruner", tokens=tokens, **options)
            try:
                text, dt = _answer(model, processor, item, device)
                st = learnpruner.stats(model)
            finally:
                learnpruner.remove(model)
            grid = int(math.isqrt(st.schedule.n))
            r1 = st.stage1_kept.shape[1] if st.stage1_kept is not None else st.schedule.n
            r2 = st.stage2_kept.shape[1] if st.stage2_kept is not None else r1
            print_fn(f"  learnpruner {tokens:>3} tokens  -> {text!r:14} {dt * 1000:7.0f} ms   "
                     f"(stage 1 kept {r1}, stage 2 kept {r2}; average {st.average_tokens:.1f} per layer)")
            panels.append((f"learnpruner @{tokens}: {text!r}",
                           None if st.stage1_kept is None else st.stage1_kept[0].cpu(),
                           None if st.stage2_kept is None else st.stage2_kept[0].cpu()))
        path = out / f"demo-{item.index:04d}.png"
        overlay_kept(item.image, panels, grid, path, title=f"{item.question} (answer: {item.answer})")
        written.append(path)
    print_fn(f"\noverlays written to {out}/ ({len(written)} PNG)")
    return written
