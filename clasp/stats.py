"""Decoding statistics as data. Exporters (logs, Prometheus) read these; nothing here prints."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DecodeStats:
    num_rounds: int = 0  # verification steps (in ar mode: decoding steps)
    num_drafts: int = 0  # rounds that drafted at least one token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0  # tau summed over rounds (never counts resampled/bonus tokens)
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)  # [k]: rounds accepting draft k
    accepted_lengths: list[int] = dataclasses.field(default_factory=list)  # tau per round
    num_plain_rounds: int = 0  # rounds the controller decoded without drafting (speculative modes)
    num_ngram_drafts: int = 0  # rounds that drafted from the context (n-gram lookup)
    num_ngram_draft_tokens: int = 0
    num_ngram_accepted_tokens: int = 0
    num_model_draft_tokens: int = 0  # drafted by the layer-skip model (not the n-gram lookup)
    num_skipped_layers_drafted: int = 0  # layers skipped, summed over the model's drafted tokens
    num_replans: int = 0
    plan_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    plan_io_seconds: float = 0.0  # decode-thread time spent submitting plan requests and polling for plans

    def observe_round(self, num_drafted: int, accepted_length: int) -> None:
        self.num_rounds += 1
        if num_drafted:
            self.num_drafts += 1
            self.num_draft_tokens += num_drafted
            self.num_accepted_tokens += accepted_length
            while len(self.accepted_per_position) < num_drafted:
                self.accepted_per_position.append(0)
            for k in range(accepted_length):
                self.accepted_per_position[k] += 1
        self.accepted_lengths.append(accepted_length)

    def observe_plan(self, seconds: float) -> None:
        self.num_replans += 1
        self.plan_seconds += seconds

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification round (tau + 1), the paper's 'mean accepted length'."""
        return (sum(self.accepted_lengths) + self.num_rounds) / self.num_rounds if self.num_rounds else 0.0

    @property
    def mean_skipped_layers(self) -> float:
        """Layers skipped per model-drafted token (with adaptive M, the skip count varies by round)."""
        return self.num_skipped_layers_drafted / self.num_model_draft_tokens if self.num_model_draft_tokens else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean_accepted_length"] = self.mean_accepted_length
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_skipped_layers"] = self.mean_skipped_layers
        return d
