"""A conversation as the prompt a model was trained to answer: the checkpoint's chat template
(``tokenizer.apply_chat_template``), or, for a tokenizer without one (the demo model is a
plain text model), the messages' texts one per line, continued as plain text."""

from __future__ import annotations

__all__ = ["chat_ids", "has_template"]


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids for ``messages`` (``[{"role": ..., "content": str}, ...]``),
    ready for the assistant's reply."""
    if has_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens itself (a BOS among them): none added twice.
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode("".join(m["content"] + "\n" for m in messages)))
