"""The `learnpruner` command, end to end on the built-in random model (no network)."""

from __future__ import annotations

import re

import pytest

from learnpruner.cli import main


def test_generate_prints_answer_kept_tokens_and_time(capsys):
    rc = main(["generate", "--model", "tiny-random-llava", "--image", "shapesvqa:1", "--method", "learnpruner",
               "--tokens", "64", "--option", "lpm=random", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^answer: \S", out, re.M)
    assert "stage 1 (after the vision encoder): kept 111 of 576" in out
    assert "LLM drop before layer 3: kept 37" in out
    assert re.search(r"wall time: [\d.]+ ms for 2 new tokens", out)


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0"], "tokens must be a positive integer"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--image", "/nonexistent.png", "--prompt", "x"], "cannot read image '/nonexistent.png'"),
    (["--image", "shapesvqa:x"], "shapesvqa:N takes a non-negative integer"),
    (["--option", "lpm=/nonexistent"], "no LPM at '/nonexistent'"),
])
def test_generate_bad_input_fails_clearly(capsys, argv, message):
    base = ["generate", "--model", "tiny-random-llava", "--image", "shapesvqa:0", "--method", "learnpruner"]
    rc = main(base + argv)
    assert rc == 2
    assert message in capsys.readouterr().err


def test_methods_lists_every_registered_method(capsys):
    import learnpruner

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in learnpruner.METHODS:
        assert re.search(rf"^{re.escape(name)}$", out, re.M)


def test_eval_all_methods(capsys, tmp_path):
    import json

    import learnpruner

    rc = main(["eval", "--model", "tiny-random-llava", "--methods", "all", "--tokens", "32", "--limit", "1",
               "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert rc == 0
    recs = json.load(open(tmp_path / "results.json"))
    assert sorted({r["method"] for r in recs}) == sorted(learnpruner.METHODS)
    assert re.search(r"^\| none \(all tokens\) \| [\d.]+ \[[\d.]+, [\d.]+\] \(100%\)", capsys.readouterr().out, re.M)


def test_eval_method_options(tmp_path, capsys):
    import json

    from learnpruner.options import option_value

    assert option_value("false") is False and option_value("2,8,16") == (2, 8, 16)
    assert option_value("0.5") == 0.5 and option_value("x") == "x"
    base = ["eval", "--model", "tiny-random-llava", "--methods", "fastv", "--tokens", "96", "--limit", "1",
            "--max-new-tokens", "1", "--out"]
    # at its paper layer FastV cannot average 96 tokens in 8 layers; --option moves the drop
    assert main([*base, str(tmp_path / "a")]) == 0
    assert json.load(open(tmp_path / "a" / "results.json"))[0]["status"] == "unreachable"
    assert main([*base, str(tmp_path / "b"), "--option", "fastv:layer=1"]) == 0
    rec = json.load(open(tmp_path / "b" / "results.json"))[0]
    assert rec["status"] == "ok" and abs(rec["avg_tokens"] - 96) < 1
    for bad, msg in ((["--option", "fastv:depth=1"], "no option 'depth'; accepted: layer, r2"),
                     (["--option", "dart:layer=1"], "not among --methods"),
                     (["--option", "layer=1"], "METHOD:KEY=VALUE")):
        assert main([*base, str(tmp_path / "c"), *bad]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before any work
