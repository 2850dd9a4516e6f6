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
POLICIES = ("snapkv", "streamingllm", "knorm", "h2o", "ahakv")
NEEDLE = "The secret password for the vault is tangerine."
NEEDLE_ANSWER = "tangerine"
NEEDLE_CONFIG = {"policy": "fastkvzip", "compression_ratio": 0.5, "allocation": "uniform"}


def prompts():
    from kvevict.data import haystack
    from kvevict.models import load_model

    _, tok = load_model(MODEL)
    return [haystack(tok, 700) + "\n\nIn one sentence, what is this essay about?",
            haystack(tok, 300, offset=3) + "\n\nWho wrote this?", "The capital of France is"]


def run_engine(config: dict | None, requests: list[dict], **engine) -> dict:
    """Greedy outputs (and the plugin's records) of one vLLM engine; config=None: vLLM without the plugin.
    A request gives a "prompt" (text) or its "prompt_token_ids"; `engine` may set max_num_batched_tokens."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind")
    job = json.dumps({"config": config, "requests": requests, **engine})
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
    # max_num_batched_tokens: the tokens of one step, so a longer prompt is prefilled in chunks of that size
    llm = LLM(str(model_path(MODEL)), dtype="float32", enforce_eager=True, max_model_len=2048,
              max_num_batched_tokens=job.get("max_num_batched_tokens", 2048),
              kv_cache_memory_bytes=256 * 1024**2, enable_prefix_caching=False, seed=0, **extra)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=r.get("extra_args"))
              for r in job["requests"]]
    prompts = [r["prompt"] if "prompt" in r else {"prompt_token_ids": r["prompt_token_ids"]} for r in job["requests"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
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


def reference_kept(name: str, prompt_ids: list[int], **params) -> dict[int, list[torch.Tensor]]:
    """What an EvictingCache keeps per layer and KV head after the prompt in one forward (ratio 0.75 unless
    `params` say otherwise)."""
    from kvevict import EvictingCache, make_policy
    from kvevict.compat import cache_kwargs
    from kvevict.models import load_model

    model, _ = load_model(MODEL, dtype="float32")
    cache = EvictingCache(model, make_policy(name, **{"compression_ratio": 0.75, **params}))
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt_ids]), **cache_kwargs(cache))
    return {layer: [p.sort().values for p in cache.kept_positions(layer)[0]] for layer in range(len(cache.layers))}


def jaccards(kept: dict[str, list[list[int]]], reference: dict[int, list[torch.Tensor]], count: int) -> list[float]:
    """Jaccard index of the kept positions of every (layer, KV head), vLLM's against the reference's, after
    checking that both keep `count` tokens in every layer and head."""
    assert sorted(int(layer) for layer in kept) == sorted(reference)
    values = []
    for layer, heads in reference.items():
        for head, positions in enumerate(heads):
            ours, theirs = set(kept[str(layer)][head]), set(positions.tolist())
            assert len(ours) == len(theirs) == count, (layer, head)
            values.append(len(ours & theirs) / len(ours | theirs))
    return values


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
def test_kept_positions_equal_evicting_cache(evicted, index, name, record_property):
    ids = evicted["prompt_ids"][index]
    reference = reference_kept(name, ids)
    kept = evicted["kept"][index]
    overlaps = jaccards(kept, reference, -(-len(ids) // 4))
    record_property("jaccard_min", min(overlaps))
    record_property("jaccard_mean", sum(overlaps) / len(overlaps))
    for layer, heads in reference.items():
        for head, positions in enumerate(heads):
            ours = set(kept[str(layer)][head])
            theirs = set(positions.tolist())
            if name in ("snapkv", "h2o", "ahakv"):
                # attention of the queries (h2o: all of them, ahakv and snapkv: the last ones): vLLM's float32
                # kernels and transformers' differ in the last bits
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


def needle_prompt(tok) -> str:
    from kvevict.data import haystack

    return haystack(tok, 900, needle=NEEDLE, depth=0.4) + "\n\nWhat is the secret password for the vault?"


@pytest.fixture(scope="module")
def needle():
    """The needle prompt through kvevict's HF path (`kvevict.generate`, fastkvzip at 0.5) and through vLLM with
    the plugin, prefilled there in chunks of 256 tokens; one more request evicts it with h2o at 0.75."""
    import kvevict
    from kvevict.chat import user_turn
    from kvevict.models import load_model

    model, tok = load_model(MODEL, dtype="float32")
    prompt = needle_prompt(tok)
    policy = kvevict.make_policy(NEEDLE_CONFIG["policy"], **{k: v for k, v in NEEDLE_CONFIG.items() if k != "policy"})
    # decoding evicts every decode_interval (128) tokens there, after MAX_TOKENS: as in vLLM, once, after prefill
    texts, cache = kvevict.generate(model, tok, [prompt], policy=policy, max_new_tokens=MAX_TOKENS, return_cache=True)
    ids = tok(user_turn(tok, prompt), add_special_tokens=False).input_ids  # what kvevict.generate ran
    hf_kept = {layer: [p[p < len(ids)] for p in cache.kept_positions(layer)[0]] for layer in range(len(cache.layers))}
    requests = [{"prompt_token_ids": ids},
                {"prompt_token_ids": ids, "extra_args": {"kvevict": {"policy": "h2o", "compression_ratio": 0.75}}}]
    ours = run_engine({**NEEDLE_CONFIG, "record_kept": True}, requests, max_num_batched_tokens=256)
    return {"ids": ids, "hf_text": texts[0], "hf_kept": hf_kept, "vllm": ours}


@pytest.mark.slow
def test_needle_at_half_with_fastkvzip_gives_the_hf_answer(needle, record_property):
    """A needle prompt at 0.5 with fastkvzip gives the same answer as kvevict's HF path, keeping the same tokens
    (gate scores from hidden states that vLLM's kernels and transformers' compute to the last bits)."""
    ids, ours = needle["ids"], needle["vllm"]
    assert len(ids) > 3 * 256  # prefilled in four chunks: hidden states and K/V arrive chunk by chunk
    assert ours["prompt_ids"][0] == ids
    record_property("hf_answer", needle["hf_text"])
    record_property("vllm_answer", ours["texts"][0])
    assert NEEDLE_ANSWER in needle["hf_text"]
    assert ours["texts"][0] == needle["hf_text"]
    overlaps = jaccards(ours["kept"][0], needle["hf_kept"], -(-len(ids) // 2))
    record_property("jaccard_min", min(overlaps))
    record_property("jaccard_mean", sum(overlaps) / len(overlaps))
    assert min(overlaps) >= 0.95
    assert ours["blocks"][0]["kept"] == -(-len(ids) // 2)


@pytest.mark.slow
def test_h2o_sums_attention_over_chunks_as_one_forward(needle, record_property):
    """h2o accumulates the attention of every prompt query: prefilled by vLLM in chunks of 256 tokens, the kept
    positions are those of an EvictingCache that saw the prompt in one forward."""
    ids = needle["ids"]
    overlaps = jaccards(needle["vllm"]["kept"][1], reference_kept("h2o", ids), -(-len(ids) // 4))
    record_property("jaccard_min", min(overlaps))
    record_property("jaccard_mean", sum(overlaps) / len(overlaps))
    assert min(overlaps) >= 0.95


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

    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.config import CompilationMode
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    import kvevict.vllm
    from kvevict.models import model_path
    from kvevict.vllm import compat
    from kvevict.vllm.admission import SettingsCheck

    config = SimpleNamespace(
        additional_config={"kvevict": {"policy": "snapkv", "compression_ratio": 0.75}},
        speculative_config=None,
        model_config=SimpleNamespace(logits_processors=None, hf_config=AutoConfig.from_pretrained(model_path(MODEL)),
                                     dtype=torch.float32),
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=False),
        parallel_config=SimpleNamespace(worker_cls=compat.CPU_WORKER),
        cache_config=SimpleNamespace(enable_prefix_caching=False),
        compilation_config=SimpleNamespace(mode=CompilationMode.DYNAMO_TRACE_ONCE))
    previous = SettingsCheck.server, SettingsCheck.vllm_config
    try:
        kvevict.vllm.configure(config)
        processors = config.model_config.logits_processors
        assert processors == [compat.SETTINGS_CHECK]

        def check(settings):
            validate_logits_processors_parameters(processors, SamplingParams(extra_args={"kvevict": settings}))

        check({"compression_ratio": 0.5})
        check('{"policy": "knorm"}')
        check({"policy": "h2o"})
        fastkvzip = {"policy": "fastkvzip", "compression_ratio": 0.5, "allocation": "uniform"}
        for bad, named in (({"policy": "nope"}, "nope"), ({"compression_ratio": 1.5}, "compression_ratio"),
                           ("{", "not valid JSON"), ({"policy": "fastkvzip"}, "allocation must be 'uniform'"),
                           ({**fastkvzip, "gates": "/tmp"}, "server's kvevict settings only"),
                           (fastkvzip, "--enforce-eager")):  # a compiled model runs no hooks
            with pytest.raises(VLLMValidationError, match=named):  # the OpenAI server's HTTP 400
                check(bad)
        config.compilation_config.mode = CompilationMode.NONE
        check(fastkvzip)  # eager: the gates shipped for the model are found by its folder's name, and load
    finally:
        SettingsCheck.server, SettingsCheck.vllm_config = previous


def test_a_layer_input_policy_for_the_server_needs_an_eager_model():
    from types import SimpleNamespace

    from transformers import AutoConfig
    from vllm.config import CompilationMode

    import kvevict.vllm
    from kvevict.models import model_path

    config = SimpleNamespace(
        additional_config={"kvevict": {"policy": "fastkvzip", "allocation": "uniform"}},
        model_config=SimpleNamespace(hf_config=AutoConfig.from_pretrained(model_path(MODEL)), dtype=torch.float32),
        compilation_config=SimpleNamespace(mode=CompilationMode.DYNAMO_TRACE_ONCE))
    with pytest.raises(ValueError, match="--enforce-eager"):  # before any process starts
        kvevict.vllm.configure(config)


if __name__ == "__main__":
    print(json.dumps(serve(json.loads(sys.argv[1]))))
