"""`kvevict serve` as a real process on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import kvevict  # noqa: E402
from kvevict.models import tiny_model, tiny_tokenizer  # noqa: E402
from kvevict.serve.engine import Engine  # noqa: E402
from kvevict.serve.loadgen import parse_metrics, wait_until_healthy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*protected tokens.*:UserWarning")

POLICY = {"compression_ratio": 0.5, "decode_interval": 4, "window": 4}
CHUNK = 16
PROMPT_CHARS = 90  # the tiny tokenizer is byte-level: one token per character


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(n, chars=PROMPT_CHARS, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta", "lambda", "zeta"]
    out = []
    for _ in range(n):
        picks = torch.randint(0, len(words), (chars,), generator=g).tolist()
        out.append(" ".join(words[i] for i in picks)[:chars])
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok = kvevict.load_model(str(folder))
    policy = kvevict.make_policy("snapkv", **POLICY)
    probe = Engine(model, tok, kv_budget=10**12, prefill_chunk=CHUNK)
    effective = probe.effective_policy(policy)
    peak = probe.estimate(effective, PROMPT_CHARS + 1, 24).peak
    budget = 3 * peak + peak // 2  # three of the concurrent requests fit at once, not eight
    port = free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvevict.cli", "serve", "--model", str(folder), "--policy", "snapkv",
         "--policy-args", json.dumps(POLICY), "--kv-budget", str(budget), "--port", str(port), "--prefill-chunk",
         str(CHUNK)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_healthy(url, proc, timeout=180):
        proc.kill()
        raise RuntimeError(f"the server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
    yield dict(url=url, model=model, tok=tok, policy=effective, budget=budget, name=str(folder), proc=proc)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0, timeout=300)


def alone(served, prompt, max_tokens, chat=False):
    return kvevict.generate(served["model"], served["tok"], [prompt], policy=served["policy"],
                            max_new_tokens=max_tokens, chat_template=chat)[0]


def metrics(served):
    return parse_metrics(httpx.get(served["url"] + "/metrics", timeout=30).text)


def aborted(served) -> float:
    text = httpx.get(served["url"] + "/metrics", timeout=30).text
    return float(re.search(r'request_success_total\{finished_reason="abort"[^}]*\} (\S+)', text).group(1))


def test_completions_and_chat_streaming_and_not_give_what_generate_gives(served):
    c = client(served)
    prompt = texts(1, seed=1)[0]
    expected = alone(served, prompt, 12)
    out = c.completions.create(model=served["name"], prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens == len(served["tok"](prompt).input_ids)
    pieces, usage = [], None
    for chunk in c.completions.create(model=served["name"], prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                      stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == expected and usage.total_tokens == out.usage.total_tokens

    expected_chat = alone(served, prompt, 10, chat=True)
    messages = [{"role": "user", "content": prompt}]
    chat = c.chat.completions.create(model=served["name"], messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == expected_chat and chat.choices[0].message.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
        model=served["name"], messages=messages, max_tokens=10, temperature=0, stream=True) if chunk.choices)
    assert streamed == expected_chat
    assert [m.id for m in c.models.list().data] == [served["name"]]


def test_eight_concurrent_requests_equal_generate_alone_within_the_kv_budget(served):
    c = client(served)
    prompts = texts(8, seed=2)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(metrics(served))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda p: c.completions.create(model=served["name"], prompt=p, max_tokens=24,
                                                                temperature=0).choices[0].text, prompts))
    finally:
        stop.set()
        sampler.join()
    assert outs == [alone(served, p, 24) for p in prompts]
    assert samples and all(s["kvevict:kv_cache_bytes"] <= served["budget"] for s in samples)
    assert max(s["kvevict:num_requests_waiting"] for s in samples) >= 1  # the budget made some wait
    final = metrics(served)
    assert final["kvevict:kv_cache_bytes_peak"] <= served["budget"]
    assert 2 <= final["kvevict:num_requests_running_peak"] <= 4
    assert final["kvevict:evicted_tokens_total"] > 0


def test_a_client_leaving_mid_stream_frees_its_request(served):
    before, aborted_before = metrics(served), aborted(served)
    with httpx.stream("POST", served["url"] + "/v1/completions", timeout=60,
                      json={"prompt": texts(1, seed=3)[0], "max_tokens": 3000, "temperature": 0, "stream": True,
                            # a fixed budget: a long generation that fits the server's KV budget
                            "kvevict": {"policy": "window", "budget": 8, "decode_interval": 4}}) as r:
        assert r.status_code == 200
        lines, during = 0, None
        for line in r.iter_lines():
            lines += line.startswith("data: ")
            if lines >= 3:
                during = metrics(served)
                break  # leaving the iterator closes the connection: the client is gone
    assert during["kvevict:kv_cache_bytes"] > 0 and during["kvevict:num_requests_running"] == 1
    deadline = time.monotonic() + 60
    while True:
        now = metrics(served)
        if now["kvevict:kv_cache_bytes"] == 0 and now["kvevict:num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert now["kvevict:request_success_total"] == before["kvevict:request_success_total"] + 1
    assert aborted(served) == aborted_before + 1
    assert now["kvevict:generation_tokens_total"] - before["kvevict:generation_tokens_total"] < 3000


BAD = [
    ("not json", b"{bad", 400, "JSON"),
    ("unknown policy", {"prompt": "hi", "kvevict": {"policy": "nope"}}, 400, "unknown policy"),
    ("unknown policy parameter", {"prompt": "hi", "kvevict": {"policy": "snapkv", "speed": 3}}, 400, "speed"),
    ("unknown field", {"prompt": "hi", "temprature": 0}, 400, "temprature"),
    ("ratio 1", {"prompt": "hi", "kvevict": {"compression_ratio": 1.0}}, 400, "compression_ratio"),
    ("ratio negative", {"prompt": "hi", "kvevict": {"policy": "h2o", "compression_ratio": -0.1}}, 400, "compression_ratio"),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("empty prompt", {"prompt": "   "}, 400, "empty"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("past the window", {"prompt": "x" * 4100, "max_tokens": 4}, 400, "context window"),
    ("past the window with max_tokens", {"prompt": "hi", "max_tokens": 5000}, 400, "context window"),
    ("never fits", {"prompt": "y" * 3000, "max_tokens": 900, "kvevict": {"policy": "full"}}, 413, "budget"),
    ("wrong model", {"model": "gpt-9", "prompt": "hi"}, 404, "not served"),
    ("n > 1", {"prompt": "hi", "n": 2}, 400, "n=2"),
]


@pytest.mark.parametrize("body,status,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_stays_healthy(served, body, status, words):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(served["url"] + path, timeout=60, headers={"content-type": "application/json"}, **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    assert httpx.get(served["url"] + "/health", timeout=10).status_code == 200


def test_openai_client_surfaces_errors(served):
    with pytest.raises(openai.BadRequestError, match="compression_ratio"):
        client(served).completions.create(model=served["name"], prompt="hi", max_tokens=2,
                                          extra_body={"kvevict": {"compression_ratio": 1.5}})
