"""High-level entry points: generate() for batches of prompts, answer() for one context and many questions."""

from __future__ import annotations

import torch

from .cache import EvictingCache
from .chat import has_template, user_turn
from .compat import cache_kwargs
from .policies import Policy, make_policy

QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"


def _check_texts(name: str, texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: give at least one")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} contains an empty text")
    return texts


def _use_chat(tokenizer, chat_template: bool | None) -> bool:
    if chat_template and not has_template(tokenizer):
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return has_template(tokenizer) if chat_template is None else chat_template


def _render(tokenizer, text: str, chat: bool) -> str:
    return user_turn(tokenizer, text) if chat else text


def greedy_kwargs(tokenizer, max_new_tokens: int, extra: dict | None = None) -> dict:
    """`generate()` arguments for greedy decoding of up to `max_new_tokens` tokens (whatever the model's generation
    config samples with), updated with `extra`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tokenizer.pad_token_id)
    kwargs.update(extra or {})
    return kwargs


def prefill(model, cache: EvictingCache, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int | None) -> None:
    """Run `input_ids` through the model into `cache`, `chunk` tokens per forward (eviction after each)."""
    length = input_ids.shape[1]
    chunk = chunk or length
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    with torch.no_grad(), cache.prompt():
        for start in range(cache.seen, length, chunk):
            stop = min(length, start + chunk)
            model(
                input_ids=input_ids[:, start:stop], attention_mask=attention_mask[:, :stop],
                position_ids=positions[:, start:stop], **cache_kwargs(cache), use_cache=True, logits_to_keep=1,
            )


def generate(
    model,
    tokenizer,
    prompts,
    policy: Policy | str | None = None,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    return_cache: bool = False,
    **generate_kwargs,
):
    """Greedy generation for a batch of prompts with an evicting cache. Returns the new texts (list[str]).

    The prompt (question included) is compressed after prefill; decoding evicts every
    `policy.decode_interval` tokens. With `return_cache=True` returns (texts, cache).
    """
    prompts = _check_texts("prompts", prompts)
    policy = make_policy("full" if policy is None else policy) if not isinstance(policy, Policy) else policy
    chat = _use_chat(tokenizer, chat_template)
    texts = [_render(tokenizer, p, chat) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",  # the caller's setting stays
                    add_special_tokens=not chat).to(model.device)
    cache = EvictingCache(model, policy, tokenizer=tokenizer)
    if policy.prefill_chunk and enc.input_ids.shape[1] > 1:
        prefill(model, cache, enc.input_ids[:, :-1], enc.attention_mask[:, :-1], policy.prefill_chunk)
    with torch.no_grad():
        out = model.generate(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, **cache_kwargs(cache),
            **greedy_kwargs(tokenizer, max_new_tokens, generate_kwargs),
        )
    decoded = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return (decoded, cache) if return_cache else decoded


def encode_context_question(tokenizer, context: str, question: str, chat_template: bool | None = None,
                            question_template: str = QUESTION_TEMPLATE, answer_prefix: str = ""):
    """Token ids of the prompt split where the context ends: (context_ids, question_ids), lists of ints.

    The context part does not depend on the question, so a context compressed once serves every question.
    `answer_prefix` is appended after the question (after the chat template's assistant turn when there is one).
    """
    chat = _use_chat(tokenizer, chat_template)
    full = _render(tokenizer, context + question_template.format(question=question), chat)
    if answer_prefix:
        full = full + (answer_prefix if chat else " " + answer_prefix)
    cut = full.index(context) + len(context)
    context_ids = tokenizer(full[:cut], add_special_tokens=not chat).input_ids
    question_ids = tokenizer(full[cut:], add_special_tokens=False).input_ids
    return context_ids, question_ids


def compress_context(model, tokenizer, context: str, policy: Policy | None = None, chat_template: bool | None = None,
                     question_template: str = QUESTION_TEMPLATE):
    """Prefill and compress `context` alone (query-agnostic). Returns (cache, context_ids, render) where
    render(question) gives the token ids that follow the context for that question."""
    context = _check_texts("context", context)[0]
    policy = make_policy("full") if policy is None else policy
    ids, _ = encode_context_question(tokenizer, context, "?", chat_template, question_template)
    context_ids = torch.tensor([ids], device=model.device)
    cache = EvictingCache(model, policy, tokenizer=tokenizer)
    prefill(model, cache, context_ids, torch.ones_like(context_ids), policy.prefill_chunk)

    def render(question: str) -> torch.Tensor:
        _, question_ids = encode_context_question(tokenizer, context, question, chat_template, question_template)
        return torch.tensor([question_ids], device=model.device)

    return cache, context_ids, render


def answer(
    model,
    tokenizer,
    context: str,
    questions,
    policy: Policy | str | None = None,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    question_template: str = QUESTION_TEMPLATE,
    return_cache: bool = False,
    **generate_kwargs,
):
    """Compress `context` once, before any question is seen, then answer each question from it (list[str]).

    Each question and its answer are appended to the compressed context and removed afterwards.
    """
    questions = _check_texts("questions", questions)
    policy = make_policy(policy) if isinstance(policy, str) else policy
    cache, context_ids, render = compress_context(model, tokenizer, context, policy, chat_template, question_template)
    answers = []
    for question in questions:
        ids = torch.cat([context_ids, render(question)], dim=1)
        with cache.frozen_tokens(), torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache),
                **greedy_kwargs(tokenizer, max_new_tokens, generate_kwargs),
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return (answers, cache) if return_cache else answers
