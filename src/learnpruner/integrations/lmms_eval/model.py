"""The lmms-eval model ``learnpruner``: a Hugging Face VLM pruned by :func:`learnpruner.apply`.

Requests are batched (``batch_size``, left padding) after lmms-eval's usual sort by prompt length,
grouped by generation arguments. Prompts go through the processor's chat template (the same text as
``learnpruner eval``); ``max_new_tokens``, ``temperature`` / ``do_sample`` / ``top_p`` and the ``until``
stop strings of each task are honoured. After each batch the log gets what the pruned forward really
processed (``learnpruner.stats``: average visual tokens per LLM layer per request), and each request type
ends with a summary that lmms-eval also writes to the results file (``throughput``:
``avg_learnpruner_visual_tokens_per_layer``).

Data parallel as lmms-eval's own models: ``accelerate launch --num_processes N -m lmms_eval --model
learnpruner ...`` puts one copy per process on ``cuda:LOCAL_RANK`` and lmms-eval shards the requests by
the accelerator's rank and world size.
"""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator, DistributedType
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger
from tqdm import tqdm

import learnpruner

from ...plan import DEFAULT_TOKENS
from .config import ModelArgs, check_model, default_device, load_model, parse_model_args

__all__ = ["LearnPrunerLMM"]

IMAGE_TAG = "<image>"  # where a task's prompt places an image (lmms-eval's convention for every family)
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's HF models' default when a task gives none


class _StopStrings:
    """Stops a row once its generated text holds one of ``stops`` (decoded text, so any tokenizer works;
    transformers' ``stop_strings`` needs a tokenizer whose vocabulary it can parse)."""

    def __init__(self, stops: list[str], tokenizer, start: int):
        self.stops, self.tokenizer, self.start = stops, tokenizer, start
        self.window = max(len(s) for s in stops) + 8  # tokens: each is at least one character, or special

    def __call__(self, input_ids, scores, **kwargs):
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class LearnPrunerLMM(lmms):
    """``--model learnpruner``; see :mod:`learnpruner.integrations.lmms_eval.config` for the model args."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that ``batch_size`` / ``device`` in ``--model_args`` win over ``--batch_size`` /
        ``--device`` (lmms-eval always passes ``--batch_size``, 1 unless given, which would otherwise collide)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key in args and str(args[key]) != str(value) and not (key == "batch_size" and str(value) == "1"):
                eval_logger.warning(f"learnpruner: {key}={args[key]} from --model_args overrides --{key} {value}")
            args.setdefault(key, value)
        return cls(**args)

    def __init__(self, pretrained: str | None = None, **kwargs) -> None:
        super().__init__()
        args: ModelArgs = parse_model_args(pretrained, **kwargs)
        check_model(args)  # unknown family, bad budget, LPM that does not fit: refused before loading weights
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            if accelerator.distributed_type == DistributedType.MULTI_GPU:
                device = f"cuda:{accelerator.local_process_index}"
            elif accelerator.distributed_type == DistributedType.MULTI_CPU:
                device = "cpu"
            else:
                raise ValueError(f"learnpruner runs data parallel only (one model copy per process, "
                                 f"`accelerate launch --num_processes N`); got {accelerator.distributed_type}")
            if args.device is not None and args.device != device and accelerator.is_local_main_process:
                eval_logger.warning(f"learnpruner: device={args.device} ignored; process "
                                    f"{accelerator.process_index} runs on {device}")
        else:
            device = args.device or default_device()
        self.args = args
        self._device = torch.device(device)
        self._model, self.processor = load_model(args, device)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size_per_gpu = args.batch_size
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self._request_stats: list[float] = []
        if accelerator.is_local_main_process:
            where = f"{self._world_size} processes, data parallel" if self._world_size > 1 else str(self._device)
            eval_logger.info(f"learnpruner: {args.pretrained} with {args.describe()} on {where}")

    # --- properties lmms-eval reads --------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def config(self):
        return self._model.config

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    # --- prompts and inputs: the one place that knows about visual kinds and families ------------------
    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """The request's images (PIL, RGB). Videos and audio are not supported yet: a clear error."""
        from PIL import Image

        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        out = []
        for v in visuals:
            if isinstance(v, Image.Image):
                out.append(v if v.mode == "RGB" else v.convert("RGB"))
            else:
                raise NotImplementedError(
                    f"learnpruner's lmms-eval model takes image tasks; {task} gives a {type(v).__name__} visual "
                    f"({str(v)[:80]!r}): video and audio tasks are not supported yet")
        return out

    def _prompt(self, context: str, n_images: int) -> str:
        """The chat-template text for one user turn with ``n_images`` images and ``context`` (its ``<image>``
        tags, if any, place the images; otherwise they come first, as in ``learnpruner eval``)."""
        content: list[dict] = []
        if n_images and IMAGE_TAG in context:
            parts = context.split(IMAGE_TAG)
            if len(parts) - 1 != n_images:
                raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TAG} tags for {n_images} images")
            for i, part in enumerate(parts):
                if i:
                    content.append({"type": "image"})
                    part = part[1:] if part.startswith("\n") else part
                if part:
                    content.append({"type": "text", "text": part})
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        tag = getattr(self.processor, "image_token", None) or IMAGE_TAG
        text = "".join(f"{tag}\n" if c["type"] == "image" else c["text"] for c in content)
        return f"USER: {text} ASSISTANT:"

    def _inputs(self, texts: list[str], images: list[list]):
        flat = [im for ims in images for im in ims]
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if flat:
            kwargs["images"] = flat
        inputs = self.processor(**kwargs).to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    # --- pruning statistics ------------------------------------------------------------------------
    def _record(self, images: list[list], labels: list[str]) -> None:
        """Log what the last forward kept: average visual tokens per LLM layer of each request."""
        n = sum(len(ims) for ims in images)
        if not n:
            return
        st = learnpruner.stats(self._model)
        if st is None or len(st.images) != n:
            eval_logger.warning(f"learnpruner: no pruning statistics for {', '.join(labels)}")
            return
        parts, at = [], 0
        for ims, label in zip(images, labels):
            if not ims:
                continue
            mine = st.images[at:at + len(ims)]
            at += len(ims)
            avg = sum(s.average_tokens for s in mine) / len(mine)
            self._request_stats.append(avg)
            parts.append(f"{label} {avg:.1f}/{'+'.join(str(s.count) for s in mine)}")
        eval_logger.info(f"learnpruner {self.args.method}: visual tokens per layer / per image: {'; '.join(parts)}")

    def _summarize(self, kind: str, elapsed: float, new_tokens: int) -> None:
        values, self._request_stats = self._request_stats, []
        budget = self.args.budget()
        extra = {f"learnpruner_budget_{k}": v if v is not None else DEFAULT_TOKENS for k, v in budget.items()}
        if values:
            mean = sum(values) / len(values)
            extra["learnpruner_visual_tokens_per_layer"] = mean
            eval_logger.info(
                f"learnpruner {kind} (rank {self._rank}): {self.args.describe()}: {len(values)} requests with images "
                f"processed {mean:.2f} visual tokens per LLM layer on average (min {min(values):.2f}, "
                f"max {max(values):.2f})")
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)

    # --- generation --------------------------------------------------------------------------------
    def _generate(self, contexts: list[str], images: list[list], gen_kwargs: dict, labels: list[str]):
        """Answers for one batch; returns ``(texts, generated token count)``."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
        max_new_tokens = int(kw.pop("max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS)
        temperature = float(kw.pop("temperature", 0) or 0)
        do_sample = bool(kw.pop("do_sample", temperature > 0))
        top_p = kw.pop("top_p", None)
        num_beams = int(kw.pop("num_beams", 1) or 1)
        generate = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams,
                    "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            generate["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                generate["top_p"] = float(top_p)
        texts = [self._prompt(c, len(ims)) for c, ims in zip(contexts, images)]
        inputs = self._inputs(texts, images)
        if until:
            generate["stopping_criteria"] = [_StopStrings(until, self.tokenizer, inputs["input_ids"].shape[1])]
        with torch.inference_mode():
            out = self._model.generate(**inputs, **generate)
        self._record(images, labels)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = []
        for text in self.tokenizer.batch_decode(new, skip_special_tokens=True):
            for stop in until:
                text = text.split(stop, 1)[0]
            answers.append(text.strip())
        pad = self.tokenizer.pad_token_id
        return answers, int((new != pad).sum()) if pad is not None else new.numel()

    def _collate(self, requests):
        """lmms-eval's collator (longest context first, grouped by generation arguments) and a progress bar."""

        def order(args):
            return -len(self.tok_encode(args[0])), args[0]

        reorder = lmms_utils.Collator([r.args for r in requests], order, grouping=True)
        return reorder, tqdm(total=len(requests), disable=self._rank != 0, desc="Model Responding")

    def generate_until(self, requests) -> list[str]:
        if not requests:
            return []

        reorder, bar = self._collate(requests)
        res = []
        t0, new_tokens = time.perf_counter(), 0
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            images = [self._visuals(f, t, s, d) for f, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            labels = [f"{t}/{d}" for t, d in zip(tasks, doc_ids)]
            answers, n = self._generate(list(contexts), images, all_kwargs[0], labels)
            new_tokens += n
            for context, kwargs, answer in zip(contexts, all_kwargs, answers):
                self.cache_hook.add_partial("generate_until", (context, kwargs), answer)
            res.extend(answers)
            bar.update(len(chunk))
        bar.close()
        self._summarize("generate_until", time.perf_counter() - t0, new_tokens)
        return reorder.get_original(res)

    def generate_until_multi_round(self, requests) -> list:
        """Multi-round tasks: after each round the task's ``doc_to_text(doc, previous_output=..., round_idx=...,
        previous_round_info=...)`` returns ``(visuals, context, terminal, round_results, info)``; a request
        ends when it says ``terminal`` and answers its last ``round_results``. Active requests share a batch."""
        if not requests:
            return []

        reorder, bar = self._collate(requests)
        res = []
        t0, new_tokens = time.perf_counter(), 0
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_to_text, doc_ids, tasks, splits = zip(*chunk)
            docs = [self.task_dict[t][s][d] for t, s, d in zip(tasks, splits, doc_ids)]
            labels = [f"{t}/{d}" for t, d in zip(tasks, doc_ids)]
            images = [self._visuals(f, t, s, d) for f, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            contexts = list(contexts)
            outputs: list[list] = [[] for _ in chunk]
            infos: list = [None] * len(chunk)
            active = list(range(len(chunk)))
            round_idx = 0
            while active:
                answers, n = self._generate([contexts[i] for i in active], [images[i] for i in active],
                                            all_kwargs[0], [f"{labels[i]}#{round_idx}" for i in active])
                new_tokens += n
                for i, answer in zip(active, answers):
                    outputs[i].append(answer)
                round_idx += 1
                still = []
                for i in active:
                    visuals, context, terminal, round_res, info = doc_to_text[i](
                        docs[i], previous_output=outputs[i], round_idx=round_idx, previous_round_info=infos[i])
                    outputs[i] = list(round_res) if round_res is not None else outputs[i]
                    if not terminal:
                        still.append(i)
                        contexts[i], infos[i] = context, info
                        images[i] = [v if v.mode == "RGB" else v.convert("RGB") for v in (visuals or [])]
                active = still
            res.extend(outputs)
            bar.update(len(chunk))
        bar.close()
        self._summarize("generate_until_multi_round", time.perf_counter() - t0, new_tokens)
        return reorder.get_original(res)

    # --- log-likelihood ----------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(sum of log-probabilities of the continuation, whether greedy decoding gives it)`` per request,
        from the pruned forward (text tokens are never pruned; the returned rows are mapped back to their
        prompt positions through ``stats.kept_positions``)."""
        if not requests:
            return []

        def order(args):
            return -len(self.tok_encode(args[0])), args[0]

        reorder = lmms_utils.Collator([r.args for r in requests], order, grouping=False)
        res = []
        t0 = time.perf_counter()
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc="Model Responding")
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, targets, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            images = [self._visuals(f, t, s, d) for f, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            labels = [f"{t}/{d}" for t, d in zip(tasks, doc_ids)]
            res.extend(self._loglikelihood(contexts, targets, images, tasks, splits, doc_ids, labels))
            bar.update(len(chunk))
        bar.close()
        self._summarize("loglikelihood", time.perf_counter() - t0, 0)
        return reorder.get_original(res)

    def _loglikelihood(self, contexts, targets, images, tasks, splits, doc_ids, labels):
        fulls, lengths = [], []
        for context, target, ims, task, split, doc_id in zip(contexts, targets, images, tasks, splits, doc_ids):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            prompt = self._prompt(context, len(ims))
            n = len(self.tok_encode(prompt + continuation)) - len(self.tok_encode(prompt))
            if n <= 0:
                raise ValueError(f"{task}/{doc_id}: empty continuation {continuation!r}")
            fulls.append(prompt + continuation)
            lengths.append(n)
        inputs = self._inputs(fulls, images)
        with torch.inference_mode():
            logits = self._model(**inputs, use_cache=False).logits.float()
        ids = inputs["input_ids"]
        b, s = ids.shape
        if any(ims for ims in images):
            self._record(images, labels)
            orig = learnpruner.stats(self._model).kept_positions.to(logits.device)
        else:
            orig = torch.arange(s, device=logits.device).expand(b, s)
        out = []
        for i, n in enumerate(lengths):
            row = torch.full((s,), -1, dtype=torch.long, device=logits.device)
            valid = orig[i] >= 0
            row[orig[i][valid]] = torch.arange(orig.shape[1], device=logits.device)[valid]
            want = torch.arange(s - n, s, device=logits.device)
            rows = row[want - 1]
            if bool((rows < 0).any()):
                raise RuntimeError(f"{labels[i]}: a continuation position was pruned (text tokens never are)")
            logprobs = torch.log_softmax(logits[i, rows], dim=-1)
            target = ids[i, want].to(logits.device)
            total = float(logprobs.gather(1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            out.append((total, greedy))
        return out
