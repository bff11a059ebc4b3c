"""``learnpruner generate``: one question about one image or video, pruned."""

from __future__ import annotations

import argparse
import os
import time

from ..commands import command
from ..options import method_options


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

    from ..hub import check_context, format_prompt, load

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
    from ..adapters import adapter_for

    adapter_for(model).check_media(kind)  # a video on an image-only family is refused, not dropped
    if args.video is not None:
        from ..video import read_frames

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
        from ..viz import crop_pixels, overlay_image_stats

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
        from ..testbed.shapes import SPLIT_SIZES, generate_item

        index = image.split(":", 1)[1]
        if not index.isdigit() or int(index) >= SPLIT_SIZES["test"]:
            raise ValueError(f"shapesvqa:N takes a non-negative integer N below {SPLIT_SIZES['test']} (the test "
                             f"split's size), got {image!r}")
        item = generate_item("test", int(index))
        return item.image, prompt or item.question, item.answer if prompt in (None, item.question) else None
    if prompt is None:
        raise ValueError("--prompt is required with an image file")
    from ..media import read_image

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
