"""The peers as their papers run them: budget="paper" schedules, the positions option, CDPruner's CLIP text
relevance, and the LearnPruner ablations cls-only and lpm-lpm."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from harness import check_cached_equals_stepwise
from helpers import IMAGE_TOKEN, VOCAB, make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.budget import describe
from learnpruner.engine.prefill import _renumber
from learnpruner.methods import ABLATIONS, METHODS, describe_budgets, get_method
from learnpruner.peers import vision_select as vs
from learnpruner.peers.llm import recycle_counts, sparsevlm_paper_counts

torch.set_num_threads(1)

N, L = 576, 32  # LLaVA-1.5-7B: the configurations below are published for it


def _drops(method: str, tokens: int, **options) -> tuple:
    return get_method(method).schedule(tokens, N, L, options, budget="paper").drops


# --------------------------------------------------------------------------------------------------
# budget="paper": each peer's official numbers for 576 tokens


def test_dart_paper_keeps_its_pivots_plus_topk_per_pivot():
    # ZichenWen1/DART, llava/model/language_model/modeling_llama_self.py (get_retained_image_token):
    # TOKEN_TOPK = max_num_trunction // (4 + 4); 4 image pivots kept + 8 pivots x TOKEN_TOPK, from pruned_layer 2
    # (scripts/v1_5/eval/*.sh: --pruned_layer 2 --pivot_image_token 4 --pivot_text_token 4)
    assert _drops("dart", 192) == ((2, 196),)
    assert _drops("dart", 128) == ((2, 132),)
    assert _drops("dart", 64) == ((2, 68),)
    assert _drops("dart", 32) == ((2, 36),)
    assert _drops("dart", 64, pivot_image=8, pivot_text=0) == ((2, 8 + 8 * 8),)


def test_fastv_paper_is_k2_and_the_attention_rank():
    # pkunlp-icler/FastV, src/transformers/src/transformers/models/llama/modeling_llama.py: AGG_LAYER K=2, the
    # ATTENTION_RANK top tokens kept from layer K on
    assert _drops("fastv", 192) == ((2, 192),)
    assert _drops("fastv", 128) == ((2, 128),)
    assert _drops("fastv", 64) == ((2, 64),)


def test_sparsevlm_paper_runs_the_official_lists_plus_recycled_tokens():
    # Gumpest/SparseVLMs, llava/model/language_model/score.py (v1): sparse_token_list_192 = [300, 200, 110],
    # _128 = [303, 110, 36], _64 = [66, 30, 17], pruned after layers 2/6/15 (layer_dict); modelling_sparse_llama.py:
    # top min(count, v - 1) kept, plus int((int(0.3 * pruned) + 1) / 10) + 1 recycled (merged) tokens
    assert _drops("sparsevlm", 192) == ((3, 300 + 9), (7, 200 + 4), (16, 110 + 3))
    assert _drops("sparsevlm", 128) == ((3, 303 + 9), (7, 110 + 7), (16, 36 + 3))
    assert _drops("sparsevlm", 64) == ((3, 66 + 16), (7, 30 + 2), (16, 17 + 1))
    assert _drops("sparsevlm", 192, recycle=False) == ((3, 300), (7, 200), (16, 110))
    # the engine's split of each count into kept-by-score + merged is the official one
    for label, official in ((192, (300, 200, 110)), (128, (303, 110, 36)), (64, (66, 30, 17))):
        present = N
        for count, total in zip(official, sparsevlm_paper_counts(label)):
            assert recycle_counts(present, total) == (count, total - count)
            present = total


def test_pyramiddrop_paper_uses_the_published_configurations():
    # Cooperx521/PyramidDrop, scripts/v1_5/pdrop_eval/*.sh: layer_list [8,16,24], image_token_ratio_list
    # [0.5,0.25,0.125] (an average of 270); llava/model/modeling_llama_pdrop.py keeps int(576 * ratio)
    assert _drops("pyramiddrop", 270) == ((8, 288), (16, 144), (24, 72))
    # the maintainer's recipe for the paper's budgets (issue #29): layers 2/8/16, lambda=0.19 for 64 ...
    assert _drops("pyramiddrop", 64) == ((2, 109), (8, 20), (16, 3))
    # ... and lambda solved to two decimals the same way for 192 (0.56) and 128 (0.42)
    assert _drops("pyramiddrop", 192) == ((2, 322), (8, 180), (16, 101))
    assert _drops("pyramiddrop", 128) == ((2, 241), (8, 101), (16, 42))


@pytest.mark.parametrize("method", ["learnpruner", "lpm-only", "cls-text", "text-only", "random", "visionzip",
                                    "vispruner", "divprune", "cdpruner", "cls-only", "lpm-lpm"])
def test_average_convention_papers_map_both_conventions_alike(method):
    m = get_method(method)
    for tokens in (192, 128, 64):
        try:
            average = m.schedule(tokens, N, L, {})
        except ValueError as e:
            with pytest.raises(ValueError, match=re.escape(str(e)[:40])):
                m.schedule(tokens, N, L, {}, budget="paper")
            continue
        assert m.schedule(tokens, N, L, {}, budget="paper") == average


def test_paper_schedules_scale_with_depth_and_refuse_unpublished_labels():
    m = get_method("sparsevlm")
    assert [layer for layer, _ in m.schedule(64, N, 8, {}, budget="paper").drops] == [1, 2, 4]
    assert get_method("dart").schedule(64, N, 8, {}, budget="paper").drops == ((1, 68),)
    with pytest.raises(ValueError, match=r"sparsevlm publishes budget='paper' configurations .* 192, 128, 96, 64 "
                                         r"visual tokens; got tokens=32"):
        m.schedule(32, N, L, {}, budget="paper")
    with pytest.raises(ValueError, match=r"pyramiddrop \(budget='paper'\) first prunes at LLM layer 2 .* at least 37"):
        get_method("pyramiddrop").schedule(32, N, L, {}, budget="paper")
    with pytest.raises(ValueError, match=r"budget must be one of 'average', 'paper' .* got 'mean'"):
        m.schedule(64, N, L, {}, budget="mean")


def test_describe_budgets_shows_both_conventions():
    lines = describe_budgets("dart")
    text = "\n".join(lines)
    assert "576 (layers 0-1), 166 (2-31); average 191.6" in text  # average
    assert "576 (layers 0-1), 196 (2-31); average 219.8" in text  # paper
    assert "positions after a drop: original" in text
    assert [ln.split()[0] for ln in lines[1:-1:2]] == ["192", "128", "64", "32"]
    assert "not available" in "\n".join(describe_budgets("sparsevlm"))
    assert "both conventions are the same" in describe_budgets("visionzip")[-1]
    assert describe(get_method("learnpruner").schedule(64, N, L, {})) == "111 (layers 0-11), 37 (12-31); average 64.8"


@torch.no_grad()
def test_apply_with_the_paper_budget_runs_its_schedule():
    model = tiny_llava(seed=5)
    inp = make_inputs(model)
    learnpruner.apply(model, "dart", tokens=16, budget="paper")
    model(**inp)
    st = learnpruner.stats(model)
    assert st.schedule == get_method("dart").schedule(16, n_visual(model), 8, {}, budget="paper")
    assert st.tokens_per_layer == [n_visual(model)] + [4 + 8 * 2] * 7
    learnpruner.remove(model)
    with pytest.raises(ValueError, match=r"budget must be one of 'average', 'paper'"):
        learnpruner.apply(model, "dart", tokens=16, budget="official")
    assert not learnpruner.is_pruned(model)


# --------------------------------------------------------------------------------------------------
# positions="original" | "contiguous"


def test_positions_defaults_follow_the_official_code():
    contiguous = {"visionzip", "vispruner", "divprune", "cdpruner", "pyramiddrop", "sparsevlm", "scope"}
    for name, m in {**METHODS, **ABLATIONS}.items():
        assert "positions" in m.options
        assert m.positions == ("contiguous" if name in contiguous else "original"), name


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("method,opts", [("random", {}), ("visionzip", {}), ("fastv", {}), ("pyramiddrop", {}),
                                         ("learnpruner", {"lpm": "random"})])
def test_full_budget_is_identical_to_unpatched_either_way(method, opts, positions):
    model = tiny_llava(seed=6)
    inp = make_inputs(model)
    ref = model(**inp).logits
    learnpruner.apply(model, method, tokens=n_visual(model), positions=positions, **opts)
    assert torch.equal(model(**inp).logits, ref)


def _shortened_reference(model, inp, kept, contiguous: bool) -> torch.Tensor:
    """Last-token logits of the UNPATCHED model fed each prompt without its dropped image tokens, at consecutive
    positions 0..len-1 (contiguous) or the kept tokens' original positions."""
    ad = adapter_for(model)
    proj = ad.project(ad.encode(inp["pixel_values"]).features)
    lm = model.model.language_model
    out = []
    for i in range(inp["input_ids"].shape[0]):
        ids = inp["input_ids"][i, inp["attention_mask"][i].bool()]
        image = (ids == IMAGE_TOKEN).nonzero()[:, 0]
        embeds = lm.embed_tokens(ids).clone()
        embeds[image] = proj[i]
        keep = ids != IMAGE_TOKEN
        keep[image[kept[i]]] = True
        pos = torch.arange(int(keep.sum())) if contiguous else torch.arange(ids.shape[0])[keep]
        hidden = lm(inputs_embeds=embeds[keep][None], position_ids=pos[None]).last_hidden_state
        out.append(model.lm_head(hidden[:, -1])[0])
    return torch.stack(out)


@torch.no_grad()
@pytest.mark.parametrize("method", ["random", "visionzip"])
def test_contiguous_positions_equal_the_unpatched_model_on_the_shortened_prompt(method):
    model = tiny_llava(seed=7)
    inp = make_inputs(model)  # a left-padded batch of two
    kept, logits = {}, {}
    opts = {"seed": 3} if method == "random" else {"contextual": 0}  # visionzip: dominant tokens only, no merging
    for positions in ("original", "contiguous"):
        learnpruner.apply(model, method, tokens=10, positions=positions, **opts)
        logits[positions] = model(**inp).logits[:, -1]
        kept[positions] = learnpruner.stats(model).stage1_kept
        learnpruner.remove(model)
    assert torch.equal(kept["original"], kept["contiguous"])  # what is kept does not depend on the option
    for positions in ("original", "contiguous"):
        ref = _shortened_reference(model, inp, kept[positions], positions == "contiguous")
        torch.testing.assert_close(logits[positions], ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(logits["original"], logits["contiguous"], atol=1e-4)


@torch.no_grad()
def test_llm_drops_renumber_the_layers_after_them():
    model = tiny_llava(seed=8)
    inp = make_inputs(model, prompts_len=(6,), after=(5,))  # one unpadded prompt
    s = inp["input_ids"].shape[1]
    seen = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, kw["position_ids"].clone()), with_kwargs=True)
        for i, layer in enumerate(model.model.language_model.layers)]
    kept = {}
    for positions in ("original", "contiguous"):
        learnpruner.apply(model, "pyramiddrop", tokens=30, positions=positions)
        model(**inp)
        st = learnpruner.stats(model)
        kept[positions] = st.llm_kept
        for layer, r in st.schedule.drops:
            pos = seen[layer][0]
            assert pos.shape[0] == s - n_visual(model) + r and int(pos[-1]) == s - 1
            if positions == "contiguous":
                assert torch.equal(pos, torch.arange(s - pos.shape[0], s))  # consecutive, ending where the prompt ends
            else:
                assert not torch.equal(pos, torch.arange(s - pos.shape[0], s))
        assert torch.equal(seen[0][0], torch.arange(s))
        learnpruner.remove(model)
    assert torch.equal(kept["original"][0], kept["contiguous"][0])  # the first drop sees the same positions
    for h in handles:
        h.remove()


@pytest.mark.parametrize("method,opts", [("pyramiddrop", {"tokens": 30}), ("random", {"tokens": 10}),
                                         ("learnpruner", {"tokens": 16, "lpm": "random"})])
def test_contiguous_cached_generation_equals_stepwise_recomputation(method, opts):
    model = tiny_llava(seed=3)  # a seed whose greedy continuations emit no EOS within the steps checked
    learnpruner.apply(model, method, positions="contiguous", **opts)
    check_cached_equals_stepwise(model, make_inputs(model))


@torch.no_grad()
def test_contiguous_positions_on_the_fast_path_equal_the_plain_path():
    model = tiny_llava(seed=10)
    inp = make_inputs(model)
    gens = []
    for fast in (False, True):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm="random", positions="contiguous", fast=fast)
        gens.append(model.generate(**inp, max_new_tokens=5, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True))
        learnpruner.remove(model)
    assert torch.equal(gens[0].sequences, gens[1].sequences)
    for a, b in zip(gens[0].scores, gens[1].scores):
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


def test_contiguous_positions_are_refused_for_multidimensional_rotary_positions():
    rotary = object()
    state = SimpleNamespace(plan=learnpruner.resolve("qwen2_5_vl", "divprune", 16),
                            adapter=SimpleNamespace(family="qwen2_5_vl",
                                                    language_model=SimpleNamespace(rotary_emb=rotary)))
    mrope, flat = torch.zeros(3, 1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    assert _renumber(state, flat) is rotary  # divprune's default: contiguous
    assert _renumber(state, mrope) is None  # the default falls back to the original positions
    state.plan = learnpruner.resolve("qwen2_5_vl", "divprune", 16, positions="contiguous")  # asked for explicitly
    with pytest.raises(ValueError, match=r"positions='contiguous' is not available for qwen2_5_vl: its rotary "
                                         r"positions are multi-dimensional \(M-RoPE\); use positions='original'"):
        _renumber(state, mrope)
    state.plan = learnpruner.resolve("qwen2_5_vl", "divprune", 16, positions="original")
    assert _renumber(state, flat) is None


def test_bad_positions_and_options_name_the_accepted_values():
    model = tiny_llava(seed=11)
    with pytest.raises(ValueError, match=r"option positions must be one of 'original', 'contiguous', got 'shifted'"):
        learnpruner.apply(model, "visionzip", tokens=16, positions="shifted")
    with pytest.raises(ValueError, match=r"method 'cls-only' does not take option\(s\) \['r1'\]; accepted: positions"):
        learnpruner.apply(model, "cls-only", tokens=16, r1=3)
    with pytest.raises(ValueError, match=r"option text_model must be a path, a hub id or a CLIP module, got int"):
        learnpruner.apply(model, "cdpruner", tokens=16, text_model=3)
    with pytest.raises(ValueError, match=r"option tokenizer is only used with text_model="):
        learnpruner.apply(model, "cdpruner", tokens=16, tokenizer="x")
    assert not learnpruner.is_pruned(model)


# --------------------------------------------------------------------------------------------------
# CDPruner's official relevance with a CLIP text tower


def _word_tokenizer(words: list[str], specials: dict[str, str], wrap: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if wrap:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP (vision width 32, as the tiny LLaVA's tower; text segments of 4 tokens) and its word-level
    tokenizer saved to a folder, plus the VLM's word-level tokenizer (id i <-> "w{i}")."""
    from transformers import CLIPConfig, CLIPModel

    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(2, VOCAB - 1)]
    clip_tok = _word_tokenizer(words, {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}, True)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=4, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        projection_dim=16,
    )
    clip = CLIPModel(cfg).eval()
    folder = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(folder)
    clip_tok.save_pretrained(folder)
    vlm_words = ["<pad>", "<s>"] + [f"w{i}" for i in range(2, VOCAB - 1)] + ["<image>", "<unk>"]
    vlm_tok = _word_tokenizer(vlm_words, {"pad_token": "<pad>", "bos_token": "<s>",
                                          "additional_special_tokens": ["<image>"]}, False)
    return SimpleNamespace(folder=str(folder), clip=clip, clip_tok=clip_tok, vlm_tok=vlm_tok)


def _tower_layernorm(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).post_layernorm


def _direct_relevance(model, inp, tc) -> torch.Tensor:
    """The official computation written out: post_layernorm + visual_projection on the feature-layer patches,
    CLIP text embeddings of the instruction in segments of 4 tokens, mean negated cosine, min-max per image."""
    feats = adapter_for(model).encode(inp["pixel_values"]).features
    patches = tc.clip.visual_projection(_tower_layernorm(model)(feats).float())
    patches = patches / patches.norm(dim=-1, keepdim=True)
    out = []
    for i in range(feats.shape[0]):
        ids = inp["input_ids"][i][inp["attention_mask"][i].bool()]
        after = ids[int((ids == IMAGE_TOKEN).nonzero().max()) + 1:]
        text = " ".join(f"w{int(t)}" for t in after)
        tokens = tc.clip_tok(text=text)["input_ids"]
        tokens = tokens + [0] * (-len(tokens) % 4)
        ids4 = torch.tensor(tokens).view(-1, 4)
        mask = torch.zeros_like(ids4).view(-1)
        mask[: len(tc.clip_tok(text=text)["input_ids"])] = 1
        pooled = tc.clip.text_model(input_ids=ids4, attention_mask=mask.view(-1, 4)).pooler_output
        text_embeds = tc.clip.text_projection(pooled)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        r = (-(patches[i] @ text_embeds.T)).mean(dim=-1)
        out.append((r - r.min() + 1e-6) / (r.max() - r.min()))
    return torch.stack(out)


@torch.no_grad()
def test_cdpruner_official_relevance_equals_a_direct_computation(tiny_clip, monkeypatch):
    model = tiny_llava(seed=12)
    inp = make_inputs(model, after=(7, 5))  # 9 and 7 CLIP tokens: 3 and 2 segments of 4
    expected = _direct_relevance(model, inp, tiny_clip)
    seen = []
    original = vs.normalize_relevance
    monkeypatch.setattr(vs, "normalize_relevance", lambda r, theta=None: seen.append(original(r, theta)) or seen[-1])
    learnpruner.apply(model, "cdpruner", tokens=12, text_model=tiny_clip.folder, tokenizer=tiny_clip.vlm_tok)
    model(**inp)
    kept = learnpruner.stats(model).stage1_kept
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    projected = adapter_for(model).project(adapter_for(model).encode(inp["pixel_values"]).features)
    assert torch.equal(kept, vs.dpp_greedy(vs.conditional_kernel(projected, expected), 12))
    learnpruner.remove(model)
    # a CLIP module with its tokenizer works the same; without a text tower the fallback relevance is different
    learnpruner.apply(model, "cdpruner", tokens=12, text_model=tiny_clip.clip, text_tokenizer=tiny_clip.clip_tok,
                      tokenizer=tiny_clip.vlm_tok)
    model(**inp)
    torch.testing.assert_close(seen[-1], expected, atol=1e-5, rtol=1e-5)
    learnpruner.remove(model)
    learnpruner.apply(model, "cdpruner", tokens=12)
    model(**inp)
    assert not torch.allclose(seen[-1], expected, atol=1e-3)


def test_cdpruner_text_model_without_a_tokenizer_is_refused_clearly(tiny_clip):
    model = tiny_llava(seed=13)  # built in memory: no folder to read the model's tokenizer from
    learnpruner.apply(model, "cdpruner", tokens=12, text_model=tiny_clip.folder)
    with pytest.raises(ValueError, match=r"needs the model's tokenizer: pass tokenizer=PATH_OR_TOKENIZER"):
        model(**make_inputs(model))


# --------------------------------------------------------------------------------------------------
# the paper's ablations at 64 tokens: cls-only, lpm-only, lpm-lpm, learnpruner (and cls-text)


def test_new_ablations_are_registered_by_name_only():
    for name in ("cls-only", "lpm-lpm"):
        assert name in ABLATIONS and name not in METHODS and get_method(name).name == name
    assert get_method("lpm-lpm").schedule(64, N, L, {}) == get_method("learnpruner").schedule(64, N, L, {})
    assert get_method("cls-only").schedule(64, N, L, {}).per_layer() == [64] * L
    with pytest.raises(ValueError, match=r"unknown method 'lpm-text'; known methods: .*cls-only.*lpm-lpm"):
        get_method("lpm-text")


@torch.no_grad()
def test_cls_only_keeps_the_top_cls_attention_tokens():
    model = tiny_llava(seed=14)
    inp = make_inputs(model)
    learnpruner.apply(model, "cls-only", tokens=12)
    model(**inp)
    st = learnpruner.stats(model)
    assert st.llm_kept == [] and st.tokens_per_layer == [12] * 8
    learnpruner.remove(model)
    learnpruner.apply(model, "cls-text", tokens=12, r1=12, r2=6)  # the same stage 1, then text attention
    model(**inp)
    assert torch.equal(learnpruner.stats(model).stage1_kept, st.stage1_kept)


@torch.no_grad()
def test_lpm_lpm_ranks_the_stage1_tokens_again_by_the_keep_probability():
    model = tiny_llava(seed=15)
    inp = make_inputs(model)
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    model(**inp)
    ref = learnpruner.stats(model)
    learnpruner.remove(model)
    learnpruner.apply(model, "lpm-lpm", tokens=16, lpm="random")
    model(**inp)
    st = learnpruner.stats(model)
    assert st.schedule == ref.schedule
    assert torch.equal(st.stage1_kept, ref.stage1_kept)  # stage 1 is learnpruner's
    lpm = model._learnpruner.lpm
    keep_prob = lpm(adapter_for(model).encode(inp["pixel_values"]).features)
    r2 = st.schedule.r2
    for i in range(2):
        kept1 = st.stage1_kept[i]
        top = kept1[keep_prob[i, kept1].topk(r2).indices].sort().values
        assert torch.equal(st.llm_kept[0][i], top)
    assert not torch.equal(st.llm_kept[0], ref.llm_kept[0])  # text attention picks otherwise
    # a fixed stage-1 selection leaves stage 2 without this forward's keep-probabilities: refused clearly
    with learnpruner.fixed_selection(model, st.stage1_kept), pytest.raises(ValueError, match="lpm-lpm's stage 2"):
        model(**inp)


def test_cdpruner_uniform_fallback_is_the_dpp_on_similarity_alone():
    from learnpruner.peers import vision_select as vs

    model = tiny_llava(layers=4, seed=2)
    inp = make_inputs(model)
    learnpruner.apply(model, "cdpruner", tokens=12, fallback="uniform")
    try:
        with torch.no_grad():
            model(**inp)
            kept = learnpruner.stats(model).stage1_kept
            ad = model._learnpruner.adapter
            projected = ad.project(ad.encode(inp["pixel_values"]).features)
            expected = vs.dpp_greedy(vs.conditional_kernel(projected, torch.ones(projected.shape[:2])), 12)
        assert torch.equal(kept, expected)
    finally:
        learnpruner.remove(model)
    with pytest.raises(ValueError, match=r"option fallback must be one of \('instruction', 'uniform'\), got 'x'"):
        learnpruner.apply(model, "cdpruner", tokens=12, fallback="x")
