"""Video-LLaVA: images and videos as items of the visual layout, against the unmodified transformers model.

Tiny random configs built offline: CLIP at 56 px (16 patches per image; a frame keeps its [CLS] row, so a
4-frame video has 4 x 17 = 68 tokens), a LLaMA text model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import method_options
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.budget import split_evenly

torch.set_num_threads(1)

VOCAB, IMAGE, VIDEO, PAD = 96, 94, 95, 0
FRAMES, PER_IMAGE, PER_FRAME = 4, 16, 17
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
    learnpruner.apply(model, method, tokens=FRAMES * PER_FRAME, **method_options(method))
    assert torch.equal(model(**batch).logits, ref)
    assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_each_item_follows_its_own_schedule(model, method):
    batch = make_batch(PROMPTS)
    learnpruner.apply(model, method, tokens=40, **method_options(method))
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
    learnpruner.apply(model, method, tokens=40, **method_options(method))
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
    learnpruner.apply(model, method, tokens=40, **method_options(method))
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


VIDEO_CHAT_TEMPLATE = (  # Video-LLaVA's turn format: USER: <image>/<video>, then the text; ASSISTANT: answer
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] if c['type'] in ('image', 'video') %}<{{ c['type'] }}>\n{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }} {% endfor %}"
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class FramesProcessor:
    """A stand-in for VideoLlavaProcessor (whose video half needs torchvision, absent here): expands each
    ``<image>`` to its 16 placeholders and each ``<video>`` to ``frames x 17``, preprocesses images and every
    frame with the CLIP image processor, and renders ``chat_template`` through the tokenizer's own renderer."""

    image_token, video_token = "<image>", "<video>"

    def __init__(self, tokenizer, chat_template=None):
        from transformers import CLIPImageProcessorPil

        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})

    def _pixels(self, images):
        return self.images(images=list(images), return_tensors="pt")["pixel_values"]

    def __call__(self, text, images=None, videos=None, return_tensors="pt", **kwargs):
        import re

        from transformers import BatchFeature

        counts = {"<image>": iter([PER_IMAGE] * len(images or [])),
                  "<video>": iter([len(v) * PER_FRAME for v in videos or []])}
        texts = [re.sub("<image>|<video>", lambda m: m[0] * next(counts[m[0]]), t)
                 for t in ([text] if isinstance(text, str) else text)]
        out = dict(self.tokenizer(texts, return_tensors=return_tensors, padding=True))
        if images:
            out["pixel_values_images"] = self._pixels(images)
        if videos:
            out["pixel_values_videos"] = torch.stack([self._pixels(frames) for frames in videos])
        return BatchFeature(out)

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

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


# --- LPM training on video records ---------------------------------------------------------------------


def _video_tokenizer():
    from learnpruner.testbed.model import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


def _training_setup(tmp_path):
    """A tiny Video-LLaVA on a word-level tokenizer with ``<image>``/``<video>``, the stand-in processor with its
    chat template, and a JSONL mixing an image record, a 6-frame video record and bad video records."""
    import json

    import numpy as np

    from learnpruner.testbed.shapes import generate_item
    from learnpruner.video import write_video

    tok = _video_tokenizer()
    model = tiny_video_llava(image_token=tok.convert_tokens_to_ids("<image>"),
                             video_token=tok.convert_tokens_to_ids("<video>"))
    items = [generate_item("test", i) for i in range(6)]
    items[0].image.resize((56, 56)).save(tmp_path / "still.png")
    write_video(tmp_path / "clip.mp4", [np.asarray(it.image.resize((112, 112))) for it in items])
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 10)

    def conv(question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    records = [
        {"image": "still.png", "conversations": conv("<image>\nwhat is the circle ?", "red")},
        {"video": "clip.mp4", "conversations": conv("how many squares ?\n<video>", "two")},
        {"video": "missing.mp4", "conversations": conv("<video>\nhow many squares ?", "two")},
        {"video": "broken.mp4", "conversations": conv("<video>\nhow many squares ?", "two")},
        {"video": "clip.mp4", "conversations": conv("how many squares ?", "two")},
        {"video": "clip.mp4", "image": "still.png", "conversations": conv("<video>\nhow many squares ?", "two")},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return model, FramesProcessor(tok, VIDEO_CHAT_TEMPLATE)


BAD_VIDEO_RECORDS = {"missing or unreadable video": 2, "no <video> tag": 1, "both image and video": 1}


def test_video_records_go_through_the_chat_template_and_the_adapter(tmp_path):
    import numpy as np

    from learnpruner.adapters import adapter_for
    from learnpruner.training import JsonlRecords, _collate, _encode, chat_messages, prompt_embeddings

    model, proc = _training_setup(tmp_path)
    ad = adapter_for(model)
    data = JsonlRecords(tmp_path / "data.jsonl", num_frames=FRAMES)
    assert data.has_video and [data.get(i) for i in range(2, 6)] == [None] * 4
    assert data.skipped == BAD_VIDEO_RECORDS
    image, video = data.get(0), data.get(1)
    assert video.image is None and video.video.shape == (FRAMES, 112, 112, 3) and video.video.dtype == np.uint8
    assert chat_messages(video)[0]["content"] == [{"type": "text", "text": "how many squares ?"}, {"type": "video"}]
    enc = [_encode(ex, proc, ad, 2048) for ex in (image, video)]
    ids = torch.tensor(enc[1].input_ids)
    assert int((ids == model.config.video_token_id).sum()) == FRAMES * PER_FRAME
    assert int((ids == model.config.image_token_id).sum()) == 0
    assert enc[1].visual["pixel_values_videos"].shape == (1, FRAMES, 3, 56, 56)
    for e, answer in zip(enc, ("red", "two")):
        assert proc.tokenizer.convert_ids_to_tokens([v for v in e.labels if v != -100]) == [answer, "</s>"]
    # the whole conversation, exactly as the processor renders and tokenizes it
    text = proc.apply_chat_template(chat_messages(video))
    assert text.startswith("USER: <video>\nhow many squares ? ASSISTANT: two </s>")
    assert enc[1].input_ids == proc(text=[text], videos=[video.video])["input_ids"][0].tolist()
    # an image and a video in one batch: each visual input stacked over the examples that have it
    batch = _collate(enc, proc.tokenizer.pad_token_id)
    assert batch["pixel_values_images"].shape == (1, 3, 56, 56)
    assert batch["pixel_values_videos"].shape == (1, FRAMES, 3, 56, 56)
    with torch.no_grad():
        embeds, visual, _ = prompt_embeddings(model, ad, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_images", "pixel_values_videos")}
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits,
                                   model(**inputs).logits, atol=1e-5, rtol=1e-4)
    assert visual.counts() == [PER_IMAGE, FRAMES * PER_FRAME]


def test_lpm_trains_on_images_and_videos_and_apply_uses_it(tmp_path):
    import json
    import math

    from learnpruner.training import JsonlRecords, TrainConfig, train_lpm

    model, proc = _training_setup(tmp_path)
    data = JsonlRecords(tmp_path / "data.jsonl", num_frames=FRAMES)
    cfg = TrainConfig(tokens=10, steps=4, batch_size=2, lr=1e-2, warmup=1, ckpt_every=4, hidden_dim=8, seed=0)
    trained = train_lpm(model, proc, data, tmp_path / "out", cfg, progress=False)
    hist = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 4 and all(math.isfinite(h["loss"]) and math.isfinite(h["ce"]) for h in hist)
    assert data.skipped == BAD_VIDEO_RECORDS
    meta = json.loads((tmp_path / "out" / "lpm.json").read_text())
    assert (meta["family"], meta["feature_layer"], meta["extra"]["frames"]) == ("video_llava", -2, FRAMES)
    assert model.config.text_config._attn_implementation == "sdpa"  # the gated attention is gone again

    learnpruner.apply(model, "learnpruner", tokens=10, lpm=tmp_path / "out")
    used = model._learnpruner.lpm
    for (k, a), (_, b) in zip(trained.state_dict().items(), used.state_dict().items()):
        assert torch.equal(a, b), k
    image, video = data.get(0), data.get(1)
    batch = proc(text=["USER: <video>\nhow many squares ? ASSISTANT:",
                       "USER: <image>\nwhat is the circle ? <video>\nhow many squares ? ASSISTANT:"],
                 images=[image.image], videos=[video.video, video.video])
    with torch.no_grad():
        model(**batch)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [68, 16, 68]
    # each video keeps its r1 (18 of 68) by the trained LPM; the 16-token image is within budget in stage 1
    assert [im.schedule.r1 for im in st.images] == [18, None, 18]
    assert [None if im.stage1_kept is None else im.stage1_kept.numel() for im in st.images] == [18, None, 18]
    learnpruner.remove(model)


def test_cli_train_reads_frames_from_video_records(tmp_path, monkeypatch, capsys):
    import json

    import learnpruner.hub
    from learnpruner.cli import main

    model, proc = _training_setup(tmp_path)
    monkeypatch.setattr(learnpruner.hub, "load", lambda *a, **k: (model, proc))
    common = ["train", "--model", "x", "--data", str(tmp_path / "data.jsonl"), "--tokens", "10", "--steps", "1",
              "--batch-size", "2", "--hidden-dim", "8", "--device", "cpu"]
    assert main([*common, "--frames", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--frames must be a positive integer, got 0" in capsys.readouterr().err
    assert main([*common, "--frames", "3", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "LPM written" in out and "missing or unreadable video" in out
    assert json.loads((tmp_path / "out" / "lpm.json").read_text())["extra"]["frames"] == 3


# --- bench: video-llava-7b / -mid / -tiny --------------------------------------------------------------


def test_video_bench_end_to_end_on_the_tiny_arch(tmp_path, capsys):
    """video-llava-tiny: one 8-frame video of 56 px frames per sample, 8 x 17 = 136 tokens."""
    import json

    from learnpruner import bench
    from learnpruner.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "--arch", "video-llava-tiny", "--methods", "none,learnpruner", "--tokens", "45",
               "--new-tokens", "2", "--text-tokens", "20", "--repeats", "1", "--warmup", "0", "--variants", "2",
               "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "one 8-frame video (56x56 frames): 136 visual tokens" in capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["tokens"]) for r in records] == [("none", 136), ("learnpruner", 45)]
    cfg = bench.arch_config("video-llava-tiny")
    for r in records:
        assert (r["family"], r["item"], r["image_size"], r["crops"], r["visual_tokens"], r["structure_tokens"]) == (
            "video_llava", "video", [56, 56], 8, 136, 0)
        [video] = r["images"]
        assert video["count"] == 136 and abs(r["avg_visual_tokens"] - r["tokens"]) <= 1.0
        sched = learnpruner.get_method(r["method"]).schedule(r["tokens"], 136, 8, {})
        assert r["tokens_per_layer"] == sched.per_layer()
        assert r["flops"] == bench.analytic_flops(cfg, sched, 1, 20)
        assert r["kv_cache_bytes"] == bench.analytic_kv_bytes(cfg, sched, 1, 20, dtype=torch.float32)
        assert r["prefill_ms"] > 0 and r["vision_ms"] > 0 and r["ideal_prefill_ms"] > 0
    assert records[1]["kv_cache_bytes"] == 268_288 and records[1]["flops_ratio"] < 1.0


def test_video_bench_inputs_and_geometry_come_from_the_adapter():
    from learnpruner import bench
    from learnpruner.bench.geometry import ItemGeometry, bench_for

    model = bench.build_arch("video-llava-tiny")
    ad = bench_for(model)
    assert ad.item_geometry() == ItemGeometry(size=(56, 56), crops=8, tokens=136, structure=0)
    assert ad.bench_budgets() == [136, 45, 15] and ad.vision_module() is model.model.video_tower
    assert ad.random_images(2)["pixel_values_videos"].shape == (2, 8, 3, 56, 56)
    inputs, start = bench._make_inputs(model, 2, 10, 1, "cpu", torch.float32)
    ids = inputs[0]["input_ids"]
    assert start == 5 and ids.shape == (2, 10 + 136) and set(inputs[0]) == {
        "input_ids", "attention_mask", "pixel_values_videos"}
    assert int((ids == 511).sum()) == 2 * 136 and int((ids == 510).sum()) == 0  # video placeholders, no image


def test_video_analytic_flops_equal_a_hand_count():
    """video-llava-tiny, config only: CLIP 56 px / 14 (16 patches + [CLS] = 17 positions), width 64, MLP 128,
    2 layers, on each of 8 frames; LLaMA width 128, 4 heads of 32, 2 KV heads, SwiGLU 256, 8 layers, vocab 512.
    Schedule (learnpruner at 45 of 136): 78 tokens after stage 1, 26 from layer 3; 20 text tokens."""
    from learnpruner import bench
    from learnpruner.budget import Schedule

    sched = Schedule(n=136, num_layers=8, r1=78, drops=((3, 26),))
    assert learnpruner.get_method("learnpruner").schedule(45, 136, 8, {}) == sched
    # vision, per frame: conv 2*16*(3*14*14)*64 = 1_204_224; per layer 2*17*(4*64*64 + 2*64*128) + 4*17*17*64
    # = 1_114_112 + 73_984 = 1_188_096, 2 layers; (1_204_224 + 2 * 1_188_096) * 8 frames = 28_643_328
    vision = 28_643_328
    # projector on the 78 kept rows: 2*78*(64*128 + 128*128) = 3_833_856
    projector = 3_833_856
    # LLM per token per layer 2*(q 128*128 + k,v 2*128*64 + o 128*128 + MLP 3*128*256) = 294_912;
    # layers 0-2: 20 text + 78 = 98 tokens: 98*294_912 + 4*98*98*128 = 33_818_624 (x3);
    # layers 3-7: 20 + 26 = 46 tokens: 46*294_912 + 4*46*46*128 = 14_649_344 (x5)
    llm = 3 * 33_818_624 + 5 * 14_649_344
    assert llm == 174_702_592
    lm_head = 2 * 128 * 512  # the last position
    expected = {"vision": vision, "projector": projector, "llm": llm, "lm_head": lm_head}
    cfg = bench.arch_config("video-llava-tiny")
    assert bench.flops_breakdown(cfg, sched, 1, 20) == expected
    assert bench.flops_breakdown(cfg, sched, 2, 20) == {k: 2 * v for k, v in expected.items()}
    assert bench.analytic_flops(cfg, sched, 1, 20) == 207_310_848
    # fp32 KV: per layer K and V, 2 heads x 32 x 4 bytes per token: 512 * (20 + 78) x 3 + 512 * (20 + 26) x 5
    assert bench.analytic_kv_bytes(cfg, sched, 1, 20, dtype=torch.float32) == 150_528 + 117_760 == 268_288


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils import flop_counter

    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("none", {}), ("learnpruner", {"tokens": 45, "lpm": "random"})])
def test_video_analytic_flops_match_flop_counter(method, opts):
    """A plain model(**inputs) on two videos: every position through the lm_head (lm_head='all'); FlopCounterMode
    counts SDPA full non-causal, as the analytic count does. Selection work (the LPM) is left out of both."""
    from torch.utils.flop_counter import FlopCounterMode

    from learnpruner import bench

    model = bench.build_arch("video-llava-tiny")
    inputs = bench._make_inputs(model, 2, 20, 1, "cpu", torch.float32, seed=1)[0][0]
    learnpruner.apply(model, method, **opts)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(**inputs, use_cache=False)
    measured = counter.get_total_flops() - sum(counter.get_flop_counts().get("LearnablePruningModule", {}).values())
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [136, 136]
    assert bench.analytic_flops(model, st.schedule, 2, 20, lm_head="all") == pytest.approx(measured, rel=0.02)
    learnpruner.remove(model)


def test_video_llava_7b_arch_has_the_real_dims_and_2056_tokens_per_video():
    """LanguageBind/Video-LLaVA-7B-hf, as a config and a meta-device model (no weights allocated)."""
    from learnpruner import bench
    from learnpruner.budget import Schedule

    cfg = bench.arch_config("video-llava-7b")
    vc, tc = cfg.vision_config, cfg.text_config
    assert cfg.model_type == "video_llava"
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size, vc.image_size,
            vc.patch_size) == (1024, 24, 16, 4096, 224, 14)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size, tc.vocab_size) == (4096, 32, 32, 32, 11008, 32064)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (
        32000, 32001, -2, "default")
    ad = bench.arch_adapter("video-llava-7b")
    assert all(p.is_meta for p in ad.model.parameters())
    geo = ad.item_geometry()
    assert (geo.size, geo.crops, geo.tokens, geo.structure) == ((224, 224), 8, 2056, 0)
    assert ad.video_tokens() == 8 * (16 * 16 + 1) == 2056 and ad.num_visual_tokens() == 256  # an image: 256
    assert ad.bench_budgets() == [2056, 685, 228]
    assert 7.3e9 < sum(p.numel() for p in ad.model.parameters()) < 7.4e9  # two CLIP-L towers + vicuna-7B
    full = Schedule(n=2056, num_layers=32)
    parts = bench.flops_breakdown(cfg, full, 1, 64)
    # per frame: conv 2*256*588*1024 = 308_281_344, 24 layers of 2*257*(4*1024^2 + 2*1024*4096) + 4*257^2*1024
    # = 6_738_153_472; x 8 frames
    assert parts["vision"] == 8 * (308_281_344 + 24 * 6_738_153_472) == 1_296_191_717_376
    assert parts["projector"] == 2 * 2056 * (1024 * 4096 + 4096 * 4096)
    # bf16 KV cache: 32 layers x (K, V) x 32 heads x (64 text + 2056) x 128 x 2 bytes
    assert bench.analytic_kv_bytes(cfg, full, 1, 64) == 32 * 2 * 32 * 2120 * 128 * 2 == 1_111_490_560
    mid = bench.arch_adapter("video-llava-mid")
    assert mid.item_geometry().tokens == 2056 and mid.bench_budgets() == [2056, 685, 228]


def test_eval_reads_video_records_from_jsonl(tmp_path):
    import json

    import numpy as np

    from learnpruner.evaluation import evaluate, load_items
    from learnpruner.testbed.model import build_tokenizer
    from learnpruner.testbed.shapes import generate_item
    from learnpruner.video import write_video

    tok = build_tokenizer()
    tok.add_tokens(["<video>"], special_tokens=True)
    model = tiny_video_llava(image_token=tok.convert_tokens_to_ids("<image>"),
                             video_token=tok.convert_tokens_to_ids("<video>"))
    processor = FramesProcessor(tok, chat_template=VIDEO_CHAT_TEMPLATE)
    frames = [np.asarray(generate_item("test", i).image.resize((112, 112))) for i in range(4)]
    write_video(tmp_path / "a.mp4", frames)
    generate_item("test", 9).image.save(tmp_path / "b.png")
    records = [{"id": "v", "video": "a.mp4", "question": "how many squares ?", "answer": "2"},
               {"id": "i", "image": "b.png", "question": "what colour is the circle ?", "answers": "red"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    items = load_items(str(data))
    assert [it.kind for it in items] == ["video", "image"]
    out = evaluate(model, processor, items, ["none", "learnpruner"], [30], tmp_path / "eval", max_new_tokens=2,
                   method_options={"learnpruner": {"lpm": "random"}}, progress=False)
    cell = next(r for r in out if r["method"] == "learnpruner")
    assert cell["status"] == "ok" and cell["n"] == 2 and cell["avg_tokens"] < 68
    (tmp_path / "a.mp4").write_bytes(b"broken")
    (tmp_path / "b.png").unlink()
    import pytest as _pytest

    with _pytest.raises(FileNotFoundError, match=r"data.jsonl:2: item 'i': no image at"):
        load_items(str(data))


@torch.no_grad()
def test_token_counts_the_adapter_reports_are_the_ones_it_encodes(model):
    """``video_tokens(frames)`` (the training and benchmark sizes), ``num_visual_tokens`` and the benchmark
    geometry equal what ``encode`` gives for an image and for videos of 2 and 4 frames."""
    ad = adapter_for(model)
    for frames in (2, FRAMES):
        pix = torch.randn(1, frames, 3, 56, 56)
        assert ad.video_tokens(frames) == ad.encode(pixel_values_videos=pix).counts()[0] == frames * PER_FRAME
    assert ad.encode(pixel_values_images=torch.randn(1, 3, 56, 56)).counts() == [PER_IMAGE]
    from learnpruner.bench.geometry import bench_for

    geo = bench_for(ad).item_geometry()
    assert geo.tokens == ad.video_tokens() == ad.default_frames * PER_FRAME and geo.crops == ad.default_frames
