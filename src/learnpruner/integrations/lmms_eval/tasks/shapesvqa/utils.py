"""lmms-eval functions of the ShapesVQA task written by ``learnpruner lmms-task``.

Each record of the task's JSONL: ``{"id", "image" (relative to this folder), "question", "answers", "qtype"}``,
the format ``learnpruner eval --data FILE.jsonl`` reads too. Scoring is ``learnpruner.evaluation.is_correct``
(exact match after lowercasing and dropping punctuation; any of ``answers`` counts), so the accuracy equals
``learnpruner eval``'s on the same items.
"""

from pathlib import Path

from PIL import Image

from learnpruner.evaluation import is_correct

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    prediction = results[0] if results else ""
    correct = float(is_correct(prediction, doc["answers"]))
    return {"exact_match": correct, f"exact_match_{doc['qtype']}": correct}
