"""Text as a chat model's user turn: the one place kvevict applies a tokenizer's chat template."""

from __future__ import annotations


def has_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def user_turn(tokenizer, text: str) -> str:
    """`text` as the user's turn, followed by the opening of the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)
