"""Configuration dataclasses for the CLaSp engine, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

MODES = ("ar", "clasp", "static")
# The ClaspConfig fields a request may set (the proto's Speculation message has exactly these; every
# other field is fixed when the server starts, and draft_dtype when the model is loaded).
REQUEST_FIELDS = ("mode", "replan_interval", "num_skip_layers", "max_draft_length", "adaptive", "ngram_size",
                  "adaptive_skip")
# The draft's weight copy. auto: int8 on CPU (cheaper per draft token than fp16 for nearly the same
# acceptance: docs/performance.md, "Defaults"; float16 where this torch build has no int8 kernel),
# float16 elsewhere; a float copy is made only when smaller than the model's dtype. None: the
# draft shares the full weights.
DRAFT_DTYPES = ("auto", "int8", "float16", "bfloat16", "float32", None)
DRAFT_DTYPE_CHOICES = tuple(d or "none" for d in DRAFT_DTYPES)  # as command lines spell them
PACK_WEIGHTS = {"auto": None, "on": True, "off": False}  # command-line spelling of Engine.load's pack_weights
PACK_WEIGHTS_HELP = ("keep a oneDNN-prepacked copy of fp32 CPU weights for products of 3+ rows (verification, "
                     "prefill, DP), for the weights' bytes again in memory (what it saves: docs/performance.md); "
                     "auto: on where available and it fits in a quarter of RAM")

# Upper bounds on what one request may ask for: each sizes memory or work per round, so an
# unbounded value lets one request take the process (max_draft_length 1e8 took 2.2 GB more).
MAX_DRAFT_LENGTH = 64
MAX_REPLAN_INTERVAL = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_TOP_K = 1 << 20
# Temperatures below this decode greedily: dividing fp32 logits by ~1e-38 overflows to inf and
# the softmax to NaN, and at 1e-5 sampling already is the argmax (vLLM's _SAMPLING_EPS).
MIN_SAMPLING_TEMPERATURE = 1e-5
MAX_SAMPLING_TEMPERATURE = 1e4
PREFILL_CHUNK_TOKENS = 512

FUSED_DRAFT = {"auto": None, "on": True, "off": False}  # command-line spelling of Engine.load's fused_draft
FUSED_DRAFT_HELP = ("which int8 CPU draft kernels may be chosen: on: the one-call C++ draft (clasp/cpu_draft.cpp, "
                    "AVX-512 VNNI, AVX2 or portable code, compiled once by make setup); off: torch ops (fbgemm); "
                    "auto: either. The fastest candidate that passes an accuracy check against the full model is "
                    "chosen by timing at load")
# The int8 CPU draft's kernels (clasp.draft_kernels): the fused C++ draft in each instruction set,
# then torch ops over fbgemm with 8-bit or 7-bit activations.
FUSED_DRAFT_KERNELS = ("fused-avx512-vnni", "fused-avx2", "fused-portable")
TORCH_DRAFT_KERNELS = ("torch-fbgemm", "torch-fbgemm-7bit")
DRAFT_KERNELS = FUSED_DRAFT_KERNELS + TORCH_DRAFT_KERNELS
# The fp32 CPU model's few-row products (clasp.fp32_kernels): torch's own, or the blocked C++ kernel
# in one instruction set.
FP32_KERNELS = ("torch", "clasp-avx512", "clasp-avx2", "clasp-portable")
FP32_KERNEL_HELP = ("the fp32 CPU model's products of 1-32 rows (decoding, verification) and its plain step: "
                    "auto: chosen at load by timing against torch and an accuracy check, recorded per machine; "
                    "torch: torch's own; clasp-<isa>: the blocked C++ kernel (clasp/cpu_draft.cpp) in that "
                    "instruction set for every few-row product, with plain steps in one call")
DRAFT_KERNEL_HELP = ("force one int8 CPU draft kernel instead of choosing by measurement at load ("
                     + ", ".join(DRAFT_KERNELS) + "); auto: measure")


@dataclasses.dataclass
class ClaspConfig:
    """Speculation settings. Every field has the measured default documented in the README."""

    mode: str = "clasp"  # ar: plain decoding; clasp: DP skip sets; static: fixed skip set
    num_skip_layers: int | None = None  # M; None -> a ratio of the layers, below
    # Default M as a fraction of the layers, measured (README, "Defaults"): a draft that shares
    # the full weights needs skipping to be cheaper (the paper's 40-60%); a draft with its own
    # half-precision copy is already ~3x cheaper, and on the embedded model skipping layers
    # on top of it cost more acceptance than it saved (M=0: 1.46x, M=3: 1.31x, M=6: 1.18x).
    shared_draft_skip_ratio: float = 0.5
    copied_draft_skip_ratio: float = 0.0
    max_draft_length: int = 8  # K, tokens drafted per round at most
    # Stop drafting when the draft's top probability falls below this: with a draft as cheap as the
    # fused int8 one, long drafts pay, so the threshold is low (sweep: README, "Defaults, and why").
    draft_exit_threshold: float = 0.25
    replan_interval: int = 32  # LOI, in rounds that draft with the model (a plan serves only those)
    static_skip_set: tuple[int, ...] | None = None  # static mode; None -> evenly spread middle layers
    draft_dtype: str | None = "auto"  # weights of the draft copy (DRAFT_DTYPES); None -> share the full weights
    # Choose each round's draft source and length from measured acceptance and costs, and stop
    # drafting while it does not pay (clasp.controller). False: always draft up to K with the model.
    adaptive: bool = True
    # Adaptive M (with adaptive and M > 0): each round drafts with M, 3M/4, M/2 or M/4 layers
    # skipped (0 too with a draft copy), whichever is expected to emit the most tokens per second.
    # Off by default: in the shared-weight regime on the embedded model it measured 1.04x ar
    # against 1.17x for a fixed M (2 per category), its tries and probes costing more than they
    # found; with an int8 copy and M=6 through the services it gave 1.17x gRPC ar (fixed: 1.05x).
    adaptive_skip: bool = False
    ngram_size: int = 3  # longest context n-gram looked up for prompt-lookup drafts; 0 disables them
    # The prompt is run in pieces of at most this many tokens, and the stream yields (an empty
    # chunk) between pieces, so one long prompt holds a shared torch thread for one piece at a time.
    prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.num_skip_layers is not None and self.num_skip_layers < 0:
            raise ValueError(f"num_skip_layers must be >= 0, got {self.num_skip_layers}")
        for name in ("shared_draft_skip_ratio", "copied_draft_skip_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 1 <= self.max_draft_length <= MAX_DRAFT_LENGTH:
            raise ValueError(f"max_draft_length must be in [1, {MAX_DRAFT_LENGTH}], got {self.max_draft_length}")
        if not 0.0 <= self.draft_exit_threshold <= 1.0:
            raise ValueError(f"draft_exit_threshold must be in [0, 1], got {self.draft_exit_threshold}")
        if not 1 <= self.replan_interval <= MAX_REPLAN_INTERVAL:
            raise ValueError(f"replan_interval must be in [1, {MAX_REPLAN_INTERVAL}], got {self.replan_interval}")
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")
        if not 0 <= self.ngram_size <= 16 or self.ngram_size == 1:
            raise ValueError(f"ngram_size must be 0 (off) or in [2, 16], got {self.ngram_size}")
        if self.draft_dtype not in DRAFT_DTYPES:
            raise ValueError(f"draft_dtype must be one of {', '.join(map(str, DRAFT_DTYPES))}, "
                             f"got {self.draft_dtype!r}")
        if self.static_skip_set is not None:
            self.static_skip_set = tuple(sorted(set(int(i) for i in self.static_skip_set)))

    def draft_torch_dtype(self, device_type: str) -> "torch.dtype | None":
        """The dtype of the draft copy to make at load on a device of this type (None: no copy)."""
        import torch

        name = self.draft_dtype
        if name == "auto":
            name = "int8" if device_type == "cpu" else "float16"
        return None if name is None else getattr(torch, name)

    def skip_count(self, num_layers: int, draft_has_copy: bool = False) -> int:
        """M for a model of num_layers layers (at most num_layers - 1: one layer always runs)."""
        m = self.num_skip_layers
        if m is None:
            ratio = self.copied_draft_skip_ratio if draft_has_copy else self.shared_draft_skip_ratio
            m = round(ratio * num_layers)
        if m >= num_layers:
            raise ValueError(f"num_skip_layers must be < the model's {num_layers} layers, got {m}")
        return m

    def static_skips(self, num_layers: int, draft_has_copy: bool = False) -> frozenset[int]:
        """The static mode's skip set: the given one, or M layers spread over the middle of the stack."""
        if self.static_skip_set is not None:
            bad = [i for i in self.static_skip_set if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"static_skip_set has layers outside [0, {num_layers}): {bad}")
            return frozenset(self.static_skip_set)
        m = self.skip_count(num_layers, draft_has_copy)
        # Keep the first and last layers, which matter most for every token.
        inner = list(range(1, num_layers - 1))
        if m == 0 or not inner:
            return frozenset()
        step = len(inner) / m
        return frozenset(inner[math.floor(k * step + step / 2)] for k in range(min(m, len(inner))))


@dataclasses.dataclass
class SamplingParams:
    """How tokens are chosen. temperature 0 means greedy (exact argmax)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.top_p):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_SAMPLING_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_SAMPLING_TEMPERATURE:g}], got {self.temperature}")
        if self.temperature < MIN_SAMPLING_TEMPERATURE:
            self.temperature = 0.0
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings of at most {MAX_STOP_LENGTH} characters")
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
