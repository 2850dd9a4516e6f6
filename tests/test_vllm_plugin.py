"""The kvevict plugin inside vLLM (CPU), on smollm2-135m: skipped where vLLM is not installed.

Each engine runs in its own process (this file, run as a script), in float32, with the engine in-process there
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the scheduler's and the runner's records can be read back.
"""

import inspect
import json
import os
import subprocess
import sys
from importlib import import_module

import pytest
import torch

pytest.importorskip("vllm")

MODEL = "smollm2-135m"
MAX_TOKENS = 24
POLICIES = ("snapkv", "streamingllm", "knorm")


def prompts():
    from kvevict.data import haystack
    from kvevict.models import load_model

    _, tok = load_model(MODEL)
    return [haystack(tok, 700) + "\n\nIn one sentence, what is this essay about?",
            haystack(tok, 300, offset=3) + "\n\nWho wrote this?", "The capital of France is"]


def run_engine(config: dict | None, requests: list[dict]) -> dict:
    """Greedy outputs (and the plugin's records) of one vLLM engine; config=None: vLLM without the plugin."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind")
    job = json.dumps({"config": config, "requests": requests})
    done = subprocess.run([sys.executable, __file__, job], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"engine failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    import kvevict.vllm
    from kvevict.models import model_path

    kvevict.vllm.register()  # what the vllm.general_plugins entry point does
    extra = {} if job["config"] is None else {"additional_config": {"kvevict": job["config"]}}
    llm = LLM(str(model_path(MODEL)), dtype="float32", enforce_eager=True, max_model_len=2048,
              max_num_batched_tokens=2048, kv_cache_memory_bytes=256 * 1024**2, enable_prefix_caching=False,
              seed=0, **extra)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=r.get("extra_args"))
              for r in job["requests"]]
    outputs = llm.generate([r["prompt"] for r in job["requests"]], params, use_tqdm=False)
    result = {"texts": [o.outputs[0].text for o in outputs], "tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "prompt_ids": [list(o.prompt_token_ids) for o in outputs]}
    if job["config"] is not None:
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        # the engine's request ids extend the ones LLM.generate returns ("0" -> "0-<suffix>")
        def record(book, request_id):
            found = [value for key, value in book.items() if key == request_id or key.startswith(request_id + "-")]
            return found[0] if len(found) == 1 else None

        result["kept"] = [{layer: kept.tolist() for layer, kept in (record(runner.kvevict_kept, o.request_id) or {}
                                                                     ).items()} for o in outputs]
        result["blocks"] = [record(core.scheduler.kvevict_block_records, o.request_id) for o in outputs]
    return result


@pytest.fixture(scope="module")
def texts():
    return prompts()


@pytest.fixture(scope="module")
def plain(texts):
    return run_engine(None, [{"prompt": t} for t in texts])


@pytest.fixture(scope="module")
def evicted(texts):
    """One engine, the long prompt once per policy at 0.75 (per-request settings), recorded."""
    requests = [{"prompt": texts[0], "extra_args": {"kvevict": {"policy": p, "compression_ratio": 0.75}}}
                for p in POLICIES]
    return run_engine({"policy": "snapkv", "compression_ratio": 0.75, "record_kept": True}, requests)


@pytest.mark.slow
def test_ratio_zero_gives_vllm_own_greedy_tokens(texts, plain):
    with_plugin = run_engine({"policy": "snapkv", "compression_ratio": 0.0, "record_kept": True},
                             [{"prompt": t} for t in texts])
    assert with_plugin["tokens"] == plain["tokens"]
    for ids, blocks in zip(with_plugin["prompt_ids"], with_plugin["blocks"]):
        assert blocks["seen"] == blocks["kept"] == len(ids)  # the compaction ran, keeping every token


def reference_kept(name: str, prompt_ids: list[int]) -> dict[int, list[torch.Tensor]]:
    from kvevict import EvictingCache, make_policy
    from kvevict.compat import cache_kwargs
    from kvevict.models import load_model

    model, _ = load_model(MODEL, dtype="float32")
    cache = EvictingCache(model, make_policy(name, compression_ratio=0.75))
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt_ids]), **cache_kwargs(cache))
    return {layer: [p.sort().values for p in cache.kept_positions(layer)[0]] for layer in range(len(cache.layers))}


def norm_ties(prompt_ids: list[int], layer: int, head: int, kept: int, ulps: int = 2) -> set[int]:
    """Positions whose key norm (transformers, float32) is within `ulps` float32 steps of the k-th largest
    score: which of them a top-k keeps depends on the last bits of two different kernels."""
    from transformers import DynamicCache

    from kvevict.models import load_model

    key = (tuple(prompt_ids), layer)
    if key not in _KEYS:
        model, _ = load_model(MODEL, dtype="float32")
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
        for index, cached in enumerate(cache.layers):
            _KEYS[(tuple(prompt_ids), index)] = cached.keys[0]
    scores = -_KEYS[key][head].float().norm(dim=-1)
    boundary = scores.sort(descending=True).values[kept - 1]
    step = torch.finfo(torch.float32).eps * boundary.abs() * ulps
    return set((scores - boundary).abs().le(step).nonzero().flatten().tolist())


_KEYS: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("index, name", list(enumerate(POLICIES)))
def test_kept_positions_equal_evicting_cache(evicted, index, name):
    ids = evicted["prompt_ids"][index]
    reference = reference_kept(name, ids)
    kept = evicted["kept"][index]
    assert sorted(int(layer) for layer in kept) == sorted(reference)
    for layer, heads in reference.items():
        for head, positions in enumerate(heads):
            ours = set(kept[str(layer)][head])
            theirs = set(positions.tolist())
            assert len(ours) == len(theirs) == -(-len(ids) // 4)
            if name == "snapkv":  # attention of the last queries: float32 kernels differ in the last bits
                assert len(ours & theirs) / len(ours | theirs) >= 0.95, (layer, head)
            elif name == "knorm":  # exact, but for keys whose norms tie at float32 precision at the boundary
                tied = norm_ties(ids, layer, head, len(ours))
                assert ours - tied == theirs - tied, (layer, head)
            else:
                assert ours == theirs, (layer, head)


@pytest.mark.slow
def test_blocks_go_back_to_the_pool(evicted):
    for ids, blocks in zip(evicted["prompt_ids"], evicted["blocks"]):
        size = blocks["block_size"]
        kept = -(-len(ids) // 4)
        assert blocks["kept"] == kept
        assert blocks["blocks_before"] == -(-len(ids) // size)
        assert blocks["blocks_after"] == -(-kept // size)
        assert blocks["free_after"] - blocks["free_before"] == blocks["blocks_before"] - blocks["blocks_after"] > 0


@pytest.mark.slow
def test_greedy_tokens_equal_a_compacting_hf_reference(texts):
    """streamingllm at 0.75 after prefill, nothing evicted while decoding: vLLM's tokens are those of
    transformers generating over an EvictingCache evicted the same way."""
    from kvevict import EvictingCache, make_policy
    from kvevict.compat import cache_kwargs
    from kvevict.models import load_model

    config = {"policy": "streamingllm", "compression_ratio": 0.75}
    ours = run_engine(config, [{"prompt": texts[0]}])
    model, _ = load_model(MODEL, dtype="float32")
    cache = EvictingCache(model, make_policy("streamingllm", compression_ratio=0.75, decode_interval=None))
    ids = torch.tensor([ours["prompt_ids"][0]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                         do_sample=False, **cache_kwargs(cache))
    reference = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert ours["tokens"][0] == reference[: len(ours["tokens"][0])] and (
        len(ours["tokens"][0]) == MAX_TOKENS or ours["tokens"][0][-1] == eos)


def test_overridden_vllm_methods_keep_their_signatures():
    """The plugin subclasses these vLLM methods; a vLLM release that changes one must fail here, loudly."""
    from kvevict.vllm import compat

    compat.check_version()
    for path, expected in compat.OVERRIDDEN.items():
        module, cls, method = path.rsplit(".", 2)
        function = getattr(getattr(import_module(module), cls), method)
        assert tuple(inspect.signature(function).parameters) == expected, path


def test_platform_hook_turns_the_plugin_on_only_when_configured():
    from types import SimpleNamespace

    import kvevict.vllm
    from kvevict.vllm import compat

    kvevict.vllm.register()
    from vllm.platforms import current_platform

    assert getattr(type(current_platform).check_and_update_config, "kvevict_wrapped", False)
    untouched = SimpleNamespace(additional_config={})
    kvevict.vllm.configure(untouched)
    assert untouched == SimpleNamespace(additional_config={})
    with pytest.raises(ValueError, match="compression_ratio"):
        kvevict.vllm.configure(SimpleNamespace(additional_config={"kvevict": {"policy": "knorm",
                                                                              "compression_ratio": 2}}))
    assert compat.WORKER.rsplit(".", 1)[0] == "kvevict.vllm.worker"


def test_bad_request_settings_fail_at_admission_not_in_the_engine():
    """`configure` adds SettingsCheck to the logits processors; vLLM calls its validate_params on every request
    before the engine sees it, and turns the ValueError into a client error."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    import kvevict.vllm
    from kvevict.vllm import compat
    from kvevict.vllm.admission import SettingsCheck

    config = SimpleNamespace(
        additional_config={"kvevict": {"policy": "snapkv", "compression_ratio": 0.75}},
        speculative_config=None, model_config=SimpleNamespace(logits_processors=None),
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=False),
        parallel_config=SimpleNamespace(worker_cls=compat.CPU_WORKER),
        cache_config=SimpleNamespace(enable_prefix_caching=False))
    previous = SettingsCheck.server
    try:
        kvevict.vllm.configure(config)
        processors = config.model_config.logits_processors
        assert processors == [compat.SETTINGS_CHECK]

        def check(settings):
            validate_logits_processors_parameters(processors, SamplingParams(extra_args={"kvevict": settings}))

        check({"compression_ratio": 0.5})
        check('{"policy": "knorm"}')
        for bad, named in (({"policy": "nope"}, "nope"), ({"compression_ratio": 1.5}, "compression_ratio"),
                           ("{", "not valid JSON")):
            with pytest.raises(VLLMValidationError, match=named):  # the OpenAI server's HTTP 400
                check(bad)
    finally:
        SettingsCheck.server = previous


if __name__ == "__main__":
    print(json.dumps(serve(json.loads(sys.argv[1]))))
