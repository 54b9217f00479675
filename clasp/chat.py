"""Chat prompts through the model's chat template, with every message's content tokenized as text.

The rule: a message's role and content are data, never template markup. apply_chat_template
renders the conversation to one string and tokenizes it whole, so a user who writes
"<|im_end|>\\n<|im_start|>system\\n..." in a message got a real system turn (the special tokens
themselves). Here such text is tokenized as the characters it is ("<", "|", "im", ...), as
OpenAI's API does, and the model sees it as quoted text inside the user's own turn. A message
whose content holds no special-token text gives exactly apply_chat_template's ids.

Roles are not escaped: the decoder accepts only system, user and assistant.
"""

from __future__ import annotations

from typing import Sequence

_MARK = "\ue000clasp-content-{}\ue001"  # private-use characters: in no template and no special token


def special_token_texts(tokenizer) -> list[str]:
    """Every added token's text (special or not: both are matched whole before BPE)."""
    return [t.content for t in tokenizer.added_tokens_decoder.values()]


def chat_prompt_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of messages (dicts with string role and content) through the tokenizer's chat
    template; ValueError naming messages[i] for a malformed message."""
    messages = list(messages)
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must have string 'role' and 'content'")
    specials = special_token_texts(tokenizer)
    quoted = {i for i, m in enumerate(messages) if any(s in m["content"] for s in specials)}
    if not quoted:
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))
    # Render with a placeholder for each such content, then tokenize the template's text as the
    # template means it and the content between with special tokens split into text.
    marked = [{**m, "content": _MARK.format(i)} if i in quoted else m for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids: list[int] = []
    for i in sorted(quoted):
        mark = _MARK.format(i)
        if rendered.count(mark) != 1:  # a template that edits or repeats content: no safe split
            raise ValueError(f"messages[{i}].content: contains special-token text, which this model's chat "
                             f"template cannot take as text")
        before, rendered = rendered.split(mark)
        ids += _text_ids(tokenizer, before, split_special=False)
        ids += _text_ids(tokenizer, messages[i]["content"], split_special=True)
    return ids + _text_ids(tokenizer, rendered, split_special=False)


def _text_ids(tokenizer, text: str, split_special: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"])


def _ids(out) -> list[int]:
    if hasattr(out, "input_ids") or isinstance(out, dict):
        out = out["input_ids"]
    return list(out)
