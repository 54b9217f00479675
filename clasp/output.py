"""A request's output: emitted token ids, their text (detokenized incrementally), and the limits
that end it (EOS, max new tokens, stop strings)."""

from __future__ import annotations

import dataclasses

from clasp.config import SamplingParams


@dataclasses.dataclass
class Chunk:
    """What one round adds to the output; the final chunk carries the result."""

    token_ids: list[int]
    text: str
    result: "object | None" = None  # clasp.decoding.GenerationResult on the final chunk


class OutputText:
    """Accumulates emitted tokens and applies EOS, max-token and stop-string limits."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: frozenset[int], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._prefix = 0  # detokenization window: tokens [_prefix, _read) are already in text
        self._read = 0

    def add(self, new_ids: list[int]) -> Chunk:
        before = len(self.token_ids)
        for t in new_ids:
            self.token_ids.append(t)
            if t in self.eos_ids:
                self.finish_reason = "stop"
                break
            if len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        previous = len(self.text)
        self._detokenize()
        cuts = [c for stop in self.params.stop if (c := self.text.find(stop, max(0, previous - len(stop) + 1))) >= 0]
        if cuts:
            self.text, self.finish_reason = self.text[:min(cuts)], "stop_string"
            self._trim_to_stop(before)
        # Hold back what could be the start of a stop string.
        end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - self._hold)
        delta, self.sent = self.text[self.sent:end], end
        return Chunk(self.token_ids[before:], delta)

    def _detokenize(self) -> None:
        """Append the new tokens' text, decoding a short window instead of the whole output.

        The window starts a few tokens back so that merges and leading spaces decode as they
        would in context. Text ending in a partial UTF-8 character waits for the next tokens.
        """
        window = self.token_ids[self._prefix:]
        known = self.tokenizer.decode(window[:self._read - self._prefix], skip_special_tokens=True)
        full = self.tokenizer.decode(window, skip_special_tokens=True)
        if full.endswith("\ufffd") and self.finish_reason is None:
            return
        self.text += full[len(known):]
        self._prefix, self._read = self._read, len(self.token_ids)

    def _trim_to_stop(self, first_new: int) -> None:
        """Drop the tokens after the one that completed a stop string (once, at the end)."""
        for n in range(first_new + 1, len(self.token_ids) + 1):
            text = self.tokenizer.decode(self.token_ids[:n], skip_special_tokens=True)
            if any(stop in text for stop in self.params.stop):
                del self.token_ids[n:]
                return


