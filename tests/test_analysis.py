"""The pruning-loss analysis on ShapesVQA: survival of the referred objects' patches, and its summary."""

from __future__ import annotations

import numpy as np
import torch

from recipes.testbed.analysis import summarize, survival


def test_survival_counts_the_referred_objects_patches():
    ids = np.zeros((4, 4), dtype=np.int64)
    ids[0, :2] = 1  # object 0: patches 0, 1
    ids[3, 3] = 2  # object 1: patch 15
    assert survival(ids, [0, 1], None) == (1.0, True)
    assert survival(ids, [0, 1], torch.tensor([1, 15])) == (2 / 3, True)
    assert survival(ids, [0, 1], torch.tensor([0, 1, 7])) == (2 / 3, False)
    assert survival(ids, [1], torch.tensor([0, 1])) == (0.0, False)
    assert survival(ids, [], torch.tensor([0])) is None


def test_summary_separates_stage1_losses_from_later_ones():
    base = {"method": "m", "tokens": 32, "qtype": "color", "objects": 3, "average_tokens": 32.0,
            "stage1_share": 1.0, "final_share": 1.0}
    records = [
        {**base, "index": 0, "correct": True, "stage1_all": True, "final_all": True},
        {**base, "index": 1, "correct": False, "stage1_all": False, "final_all": False},
        {**base, "index": 2, "correct": False, "stage1_all": True, "final_all": False},
        {**base, "index": 3, "correct": True, "stage1_all": None, "final_all": None, "objects": 5},
    ]
    s = summarize(records)["m@32"]
    assert s["accuracy"] == 0.5 and s["n"] == 4
    assert s["lost_in_stage1"] == 1 / 3 and s["lost_after_stage1"] == 1 / 3
    assert s["accuracy_if_survived"] == 1.0 and s["accuracy_if_lost"] == 0.0
    assert s["by_objects"]["3"]["accuracy"] == 1 / 3 and s["by_objects"]["5"]["final_all"] is None
