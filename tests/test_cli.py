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
        assert re.search(rf"^\| {re.escape(name)} \|", out, re.M)


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


def test_help_version_and_usage_errors_import_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys\nfrom learnpruner.cli import main\n"
            "for argv in (['--help'], ['--version'], ['eval'], ['train', '--help'], ['bench', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "heavy: []" in out.stdout, out.stdout + out.stderr
    assert "learnpruner 0.1.0" in out.stdout


def test_env_reports_what_a_bug_report_needs(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("learnpruner", "python", "torch", "transformers", "vllm", "lmms-eval", "device", "threads",
                "built-in models"):
        assert re.search(rf"^{key}\s+\S", out, re.M), key
    assert "shapes-tiny-full" in out


def test_generate_prints_the_question_and_the_reference_answer(capsys, tmp_path):
    from PIL import Image

    rc = main(["generate", "--model", "shapes-tiny", "--image", "shapesvqa:3", "--tokens", "32",
               "--max-new-tokens", "2", "--overlay", str(tmp_path / "o.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"^question: \S.*\?$", out, re.M)
    assert re.search(r"^reference answer: \S+ \((right|wrong)\)$", out, re.M)
    assert Image.open(tmp_path / "o.png").size[0] >= 500  # large enough to read


def test_accuracy_plot_has_error_bars_a_title_and_every_method(tmp_path):
    from unittest import mock

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    from learnpruner import viz

    recs = [{"method": "none", "tokens": 64, "accuracy": 0.9, "ci": [0.85, 0.94], "n": 50, "status": "ok",
             "model": {"model": "/x/shapes-tiny"}, "run": {"data_name": "shapesvqa"}}]
    for m in ("a", "b", "c"):  # three tied methods
        recs += [{"method": m, "tokens": t, "accuracy": 0.7, "ci": [0.6, 0.8], "n": 50, "status": "ok",
                  "model": {"model": "/x/shapes-tiny"}, "run": {"data_name": "shapesvqa"}} for t in (32, 64)]
    calls = []
    real = matplotlib.axes.Axes.errorbar
    with mock.patch.object(matplotlib.axes.Axes, "errorbar", autospec=True,
                           side_effect=lambda ax, *a, **k: calls.append((a, k)) or real(ax, *a, **k)):
        viz.plot_accuracy(recs, tmp_path / "acc.png")
    assert [k["label"] for _, k in calls] == ["a", "b", "c"]
    xs = [tuple(a[0]) for a, _ in calls]
    assert len(set(xs)) == 3  # ties drawn side by side, not on top of each other
    assert all(abs(v - 10.0) < 1e-9 for _, k in calls for row in k["yerr"] for v in row)  # the 95% intervals
    assert len({k["marker"] for _, k in calls}) == 3
    assert viz._accuracy_title(recs) == "shapes-tiny · data shapesvqa · 50 items"
    assert (tmp_path / "acc.png").stat().st_size > 10_000


def test_methods_opens_with_one_table_and_explains_budgets_once(capsys):
    import learnpruner
    from learnpruner.methods import ABLATIONS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted({*learnpruner.METHODS, *ABLATIONS})
    assert out.count("Budgets: tokens=T") == 1 and len(out) < 6000
    assert main(["methods", "learnpruner-set"]) == 0
    one = capsys.readouterr().out
    assert "gamma = 0.5" in one and "served in vLLM: yes" in one and "families: " in one
    assert main(["methods", "learnpruner"]) == 0
    assert "served in vLLM: as lpm-only (stage 1 only)" in capsys.readouterr().out


def test_serve_builds_the_server_command_from_the_method_and_refuses_what_vllm_cannot_run(capsys):
    import json
    import shlex

    assert main(["serve", "shapes-tiny", "--method", "divprune", "--tokens", "32", "--dry-run", "--", "--port",
                 "8001", "--dtype", "float32"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and cmd[-4:] == ["--port", "8001", "--dtype",
                                                                                      "float32"]
    hf = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert hf["architectures"] == ["LearnPrunerLlavaForConditionalGeneration"]
    assert hf["learnpruner"]["method"] == "divprune" and hf["learnpruner"]["tokens"] == 32
    # the unpruned baseline goes through the plugin's architecture too (it loads the transformers-5 key layout)
    assert main(["serve", "shapes-tiny", "--method", "none", "--dry-run"]) == 0
    assert '"method": "none"' in capsys.readouterr().out
    assert main(["serve", "shapes-tiny", "--method", "fastv", "--tokens", "32", "--dry-run"]) == 2
    assert "vLLM cannot run" in capsys.readouterr().err
    assert main(["serve", "shapes-tiny", "--method", "divprune", "--dry-run"]) == 2
    assert "needs --tokens T or --ratio R" in capsys.readouterr().err
    assert main(["serve", "shapes-tiny", "--method", "divprune", "--tokens", "8", "--dry-run", "--", "--model",
                 "x"]) == 2


def test_vllm_bench_percentiles_interpolate_as_numpy_does():
    from learnpruner.integrations.vllm.bench import percentiles

    p = percentiles("x", [4.0, 1.0, 3.0, 2.0, 5.0])
    assert p == {"x_p50": 3.0, "x_p90": 4.6, "x_p99": pytest.approx(4.96)}
    assert percentiles("x", []) == {} and percentiles("x", [7.0])["x_p99"] == 7.0
