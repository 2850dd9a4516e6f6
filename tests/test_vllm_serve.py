"""The kvevict plugin in vLLM's OpenAI server, started as a real process (API server, engine core and worker in
their own processes), found through the `vllm.general_plugins` entry point: skipped where vLLM is not installed.

The server is started as `python -m vllm.entrypoints.openai.api_server`, which takes the same arguments as
`vllm serve`: vllm-cpu's `vllm` command looks up the version of a distribution named "vllm" and fails before
parsing them.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

MODEL = "smollm2-135m"
CONFIG = {"policy": "snapkv", "compression_ratio": 0.75}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from importlib.metadata import entry_points

    from kvevict.models import model_path

    if not any(e.value == "kvevict.vllm:register" for e in entry_points(group="vllm.general_plugins")):
        pytest.fail("the kvevict vllm.general_plugins entry point is not installed (pip install -e .)")
    path = str(model_path(MODEL))
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
               "--kv-cache-memory-bytes", str(256 * 1024**2), "--no-enable-prefix-caching", "--seed", "0",
               "--additional-config", json.dumps({"kvevict": CONFIG})]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{log.read_text()[-6000:]}")
                time.sleep(2)
        yield {"url": base, "model": path, "log": log}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server's own group: API server, engine core, worker
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def long_prompt() -> str:
    from kvevict.data import haystack
    from kvevict.models import load_model

    _, tok = load_model(MODEL)
    return haystack(tok, 900) + "\n\nIn one sentence, what is this essay about?"


@pytest.mark.slow
def test_completion_is_served_and_the_worker_evicted_it(server):
    from kvevict.vllm import kept_tokens, parse

    status, body = post(server["url"] + "/v1/completions", {
        "model": server["model"], "prompt": long_prompt(), "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["text"].strip()
    # the worker process logs its first eviction: the request's id, and the kept count the scheduler planned
    prompt_tokens = body["usage"]["prompt_tokens"]
    found = re.search(r"kvevict: request (\S+) evicted after its prefill: kept (\d+) of (\d+) tokens, (\d+) of (\d+) "
                      r"blocks", server["log"].read_text())
    assert found, server["log"].read_text()[-4000:]
    request_id, kept, seen, blocks_kept, blocks_held = found.groups()
    assert request_id.startswith(body["id"])
    assert int(seen) == prompt_tokens
    assert int(kept) == kept_tokens(parse(CONFIG).policy, prompt_tokens) < prompt_tokens // 2
    assert int(blocks_kept) < int(blocks_held)


@pytest.mark.slow
@pytest.mark.parametrize("settings, named", [({"policy": "nope"}, "nope"),
                                             ({"compression_ratio": 1.5}, "compression_ratio"),
                                             ("{not json", "not valid JSON")])
def test_bad_request_settings_are_a_client_error_and_the_server_lives(server, settings, named):
    # vllm_xargs values are strings or numbers in the OpenAI API: the settings travel as JSON text
    xargs = {"kvevict": settings if isinstance(settings, str) else json.dumps(settings)}
    status, body = post(server["url"] + "/v1/completions", {
        "model": server["model"], "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
        "vllm_xargs": xargs})
    assert status == 400, body
    assert named in body["error"]["message"]
    status, body = post(server["url"] + "/v1/completions", {
        "model": server["model"], "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
        "vllm_xargs": {"kvevict": json.dumps({"policy": "knorm", "compression_ratio": 0.5})}})
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
