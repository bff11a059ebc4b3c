"""Video-LLaVA: images and videos as items of the visual layout, against the unmodified transformers model.

Tiny random configs built offline: CLIP at 56 px (16 patches per image; a frame keeps its [CLS] row, so a
4-frame video has 4 x 17 = 68 tokens), a LLaMA text model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

import learnpruner
from learnpruner.engine.prefill import split_evenly

torch.set_num_threads(1)

VOCAB, IMAGE, VIDEO, PAD = 96, 94, 95, 0
FRAMES, PER_IMAGE, PER_FRAME = 4, 16, 17
OPTIONS = {"learnpruner": {"lpm": "random"}, "lpm-only": {"lpm": "random"}, "random": {"seed": 1}}
METHODS = sorted(learnpruner.METHODS)


def tiny_video_llava(layers: int = 6, seed: int = 0, attn: str = "sdpa", image_token: int = IMAGE,
                     video_token: int = VIDEO):
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=32)
    cfg = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                           video_token_id=video_token, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    model = VideoLlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [image_token, video_token]
    model.generation_config.pad_token_id = PAD
    return model


def make_batch(prompts, seed: int = 0):
    """``prompts``: per sample a list of "image"/"video" in prompt order; left-padded ids and pixel tensors."""
    g = torch.Generator().manual_seed(seed)
    seqs, images, videos = [], [], []
    for kinds in prompts:
        ids = [1] + torch.randint(2, 90, (3,), generator=g).tolist()
        for kind in kinds:
            if kind == "image":
                ids += [IMAGE] * PER_IMAGE
                images.append(torch.randn(3, 56, 56, generator=g))
            else:
                ids += [VIDEO] * (FRAMES * PER_FRAME)
                videos.append(torch.randn(FRAMES, 3, 56, 56, generator=g))
            ids += torch.randint(2, 90, (2,), generator=g).tolist()
        ids += torch.randint(2, 90, (4,), generator=g).tolist()
        seqs.append(ids)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, ids in enumerate(seqs):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if images:
        out["pixel_values_images"] = torch.stack(images)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out


def single(batch, prompts, i):
    """Sample ``i`` of a batch made by :func:`make_batch`, unpadded, with its own pixels."""
    real = batch["attention_mask"][i].bool()
    out = {"input_ids": batch["input_ids"][i:i + 1, real], "attention_mask": batch["attention_mask"][i:i + 1, real]}
    n_img = [k.count("image") for k in prompts]
    n_vid = [k.count("video") for k in prompts]
    if n_img[i]:
        start = sum(n_img[:i])
        out["pixel_values_images"] = batch["pixel_values_images"][start:start + n_img[i]]
    if n_vid[i]:
        start = sum(n_vid[:i])
        out["pixel_values_videos"] = batch["pixel_values_videos"][start:start + n_vid[i]]
    return out


PROMPTS = [["video"], ["image", "video"]]


@pytest.fixture(scope="module")
def model():
    return tiny_video_llava()


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prompts", [[["image"], ["image"]], [["video"], ["video"]], PROMPTS],
                         ids=["images", "videos", "mixed"])
def test_full_budget_is_identical_to_unpatched(model, method, prompts):
    batch = make_batch(prompts)
    ref = model(**batch).logits
    ref_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    learnpruner.apply(model, method, tokens=FRAMES * PER_FRAME, **OPTIONS.get(method, {}))
    assert torch.equal(model(**batch).logits, ref)
    assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_each_item_follows_its_own_schedule(model, method):
    batch = make_batch(PROMPTS)
    learnpruner.apply(model, method, tokens=40, **OPTIONS.get(method, {}))
    model(**batch)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [68, 16, 68]  # prompt order: video; image, video
    for im in st.images:
        assert im.tokens_per_layer == im.schedule.per_layer()
        assert abs(im.average_tokens - min(40, im.count)) <= 1.0
    assert st.images[0].crops.tolist() == [f for f in range(FRAMES) for _ in range(PER_FRAME)]


@torch.no_grad()
@pytest.mark.parametrize("method", ["learnpruner", "fastv", "divprune", "visionzip", "pyramiddrop"])
def test_padded_batch_equals_each_sample_alone(model, method):
    batch = make_batch(PROMPTS)
    learnpruner.apply(model, method, tokens=40, **OPTIONS.get(method, {}))
    out = model(**batch)
    st = learnpruner.stats(model)
    items = [[0], [1, 2]]
    for i in range(2):
        alone = model(**single(batch, PROMPTS, i))
        s1 = learnpruner.stats(model)
        for j, k in enumerate(items[i]):
            a, b = st.images[k], s1.images[j]
            assert (a.stage1_kept is None) == (b.stage1_kept is None)
            if a.stage1_kept is not None:
                assert torch.equal(a.stage1_kept, b.stage1_kept)
            for x, y in zip(a.llm_kept, b.llm_kept, strict=True):
                assert torch.equal(x, y)
        torch.testing.assert_close(out.logits[i, -1], alone.logits[0, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("method", ["learnpruner", "fastv", "divprune"])
def test_cached_generation_equals_stepwise_recomputation(model, method):
    batch = make_batch(PROMPTS)
    learnpruner.apply(model, method, tokens=40, **OPTIONS.get(method, {}))
    steps = 3
    gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    st = learnpruner.stats(model)
    new = gen.sequences[:, batch["input_ids"].shape[1]:]
    pixels = {k: v for k, v in batch.items() if k.startswith("pixel")}
    with learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
        for t in range(steps):
            ids = torch.cat([batch["input_ids"], new[:, :t]], dim=1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(new[:, :t])], dim=1)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **pixels).logits
            torch.testing.assert_close(logits[:, -1], gen.logits[t], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_stage1_per_frame_keeps_an_even_share_of_every_frame(model):
    batch = make_batch([["video"]])
    learnpruner.apply(model, "learnpruner", tokens=10, lpm="random", stage1_unit="crop")
    model(**batch)
    im = learnpruner.stats(model).images[0]
    per_frame = torch.bincount(im.crops[im.stage1_kept], minlength=FRAMES).tolist()
    assert per_frame == split_evenly(im.schedule.r1, [PER_FRAME] * FRAMES)
    learnpruner.remove(model)
    learnpruner.apply(model, "learnpruner", tokens=10, lpm="random")  # default: ranked across the video
    model(**batch)
    assert learnpruner.stats(model).images[0].stage1_kept.numel() == im.schedule.r1


def test_bad_stage1_unit_is_refused(model):
    with pytest.raises(ValueError, match="stage1_unit must be 'image' or 'crop', got 'frame'"):
        learnpruner.apply(model, "divprune", tokens=10, stage1_unit="frame")


class FramesProcessor:
    """A stand-in for VideoLlavaProcessor (whose video half needs torchvision, absent here): expands
    ``<video>`` to its placeholders and preprocesses each frame with the CLIP image processor."""

    video_token = "<video>"
    chat_template = None

    def __init__(self, tokenizer):
        from transformers import CLIPImageProcessorPil

        self.tokenizer = tokenizer
        self.images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})

    def __call__(self, text, videos, return_tensors="pt"):
        from transformers import BatchFeature

        frames = videos[0]
        text = text.replace("<video>", "<video>" * (len(frames) * PER_FRAME))
        ids = self.tokenizer(text, return_tensors="pt")
        pixels = self.images(images=list(frames), return_tensors="pt")["pixel_values"][None]
        return BatchFeature({**ids, "pixel_values_videos": pixels})

    def batch_decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def test_cli_generate_reads_a_video_file(tmp_path, monkeypatch, capsys):
    import numpy as np

    import learnpruner.hub
    from learnpruner.cli import main
    from learnpruner.testbed.model import build_tokenizer
    from learnpruner.testbed.shapes import generate_item
    from learnpruner.video import write_video

    tok = build_tokenizer()
    tok.add_tokens(["<video>"], special_tokens=True)
    model = tiny_video_llava(image_token=tok.convert_tokens_to_ids("<image>"),
                             video_token=tok.convert_tokens_to_ids("<video>"))
    monkeypatch.setattr(learnpruner.hub, "load", lambda *a, **k: (model, FramesProcessor(tok)))
    video = tmp_path / "shapes.mp4"
    write_video(video, [np.asarray(generate_item("test", i).image.resize((112, 112))) for i in range(6)])
    overlay = tmp_path / "frames.png"
    rc = main(["generate", "--model", "x", "--video", str(video), "--frames", str(FRAMES), "--prompt",
               "USER: <video>\nhow many squares ? ASSISTANT:", "--method", "learnpruner", "--option", "lpm=random",
               "--tokens", "30", "--max-new-tokens", "2", "--overlay", str(overlay)])
    out = capsys.readouterr().out
    assert rc == 0 and f"visual tokens: {FRAMES * PER_FRAME}" in out and overlay.stat().st_size > 0
    assert learnpruner.stats(model).images[0].crops.max() == FRAMES - 1
    learnpruner.remove(model)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 10)
    for path, message in ((bad, "cannot decode video"), (tmp_path / "missing.mp4", "no video file at")):
        assert main(["generate", "--model", "x", "--video", str(path), "--prompt", "<video> ?"]) == 2
        assert message in capsys.readouterr().err
