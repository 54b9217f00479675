"""Static-shape forward passes: the model's math on buffers allocated once, ready for CUDA graphs.

A `StaticForward` runs `rows` consecutive tokens for each slot of a fixed tuple of KV-cache slots,
through the layers one skip set keeps, on one weight set. Token ids and start positions are read
from device buffers, and logits (and optionally hidden states) are written into buffers, so every
call launches the same kernels on the same addresses: what a CUDA graph captures. On CUDA,
`StaticSteps(capture=True)` (installed by clasp.backends.cuda) captures each one once and replays
it; elsewhere it runs eagerly, which is how the CPU tests check it against the eager forward pass.

Rules:
- Positions live on the device. Attention reads the slot's whole capacity, masking keys past each
  query's position, so no shape depends on the position (the cost grows with the capacity, not
  the position; clasp.backends.cuda rounds capacities to powers of two).
- The projections, rotary embedding, norms and MLP are the runner's own functions
  (`_attention_inputs`, `_mlp_block`, `runner.norm`, the matrices' `__call__`), so the static and
  eager passes differ only in how attention is summed.
- A drafting loop (`StaticDraft`) feeds each step's greedy token back on the device and records
  tokens and top probabilities in buffers: K draft tokens are K replays and one read to the host
  (StaticSteps.propose), instead of one sync per token.
- Entries are keyed by the cache's storage (not the KVCache object), slots, rows, skip set,
  weight set and whether hidden states are kept; an entry holds references to the tensors it
  reads, so a captured graph never reads freed memory. At most `max_entries` are kept (LRU).
"""

from __future__ import annotations

import collections
import math
import time
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

from clasp.kv_cache import KVCache
from clasp.model_runner import ModelRunner, Segment
from clasp.proposers import DraftSlot, Proposal, Proposals

MAX_ROWS = 16  # rows per slot a static pass covers: one token, or a verification of up to 15 drafts
MAX_ENTRIES = 48  # static passes kept (each holds its buffers and, on CUDA, a graph's memory)
MAX_DRAFT_STEPS = 64  # config.MAX_DRAFT_LENGTH: the drafting loop's record buffers


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_positions: torch.Tensor,
                     key_positions: torch.Tensor) -> torch.Tensor:
    """q [n, heads, hd] at query_positions [n] over one slot's keys, values [kv_heads, capacity, hd]
    (key_positions [capacity] = 0..capacity-1): each query sees the keys at or before its position.
    Returns [n, heads * hd]. GQA by grouping the queries (no K/V copies); softmax in fp32 as in
    Hugging Face's eager attention; the scale is SDPA's default 1/sqrt(hd)."""
    n, heads, hd = q.shape
    kv_heads, capacity = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    qg = q.view(n, kv_heads, group, hd).permute(1, 2, 0, 3).reshape(kv_heads, group * n, hd)
    scores = torch.matmul(qg, keys.transpose(1, 2)).float() * (1.0 / math.sqrt(hd))  # [kv_heads, group*n, capacity]
    visible = key_positions[None, :] <= query_positions[:, None]  # [n, capacity]
    scores = scores.view(kv_heads, group, n, capacity).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kv_heads, group * n, capacity)
    out = torch.matmul(probs, values)  # [kv_heads, group*n, hd]
    return out.view(kv_heads, group, n, hd).permute(2, 0, 1, 3).reshape(n, heads * hd)


class StaticForward:
    """One static pass: `rows` tokens for each slot in `slots` of one cache storage."""

    def __init__(self, runner: ModelRunner, cache: KVCache, slots: tuple[int, ...], rows: int,
                 skip_set: frozenset[int], draft: bool, with_hidden: bool) -> None:
        self.runner = runner
        self.slots, self.rows, self.skip_set, self.draft, self.with_hidden = slots, rows, skip_set, draft, with_hidden
        num_rows = len(slots) * rows
        self.weights = runner.draft_weights if draft else runner.full_weights(num_rows)  # as forward_batch chooses
        self.keys, self.values = list(cache.keys), list(cache.values)  # the storage (not the KVCache object)
        self.capacity = cache.max_length
        self.cos, self.sin = runner._rope_cos, runner._rope_sin  # kept: a graph reads these addresses
        device, s = runner.device, runner.spec
        self.token_ids = torch.zeros(num_rows, dtype=torch.long, device=device)  # [slots * rows]
        self.starts = torch.zeros(len(slots), dtype=torch.long, device=device)  # [slots]
        self.offsets = torch.arange(rows, device=device)  # [rows]
        self.key_positions = torch.arange(self.capacity, device=device)  # [capacity]
        self.logits = torch.zeros(num_rows, s.vocab_size, dtype=torch.float32, device=device)
        self.hidden = (torch.zeros(s.num_layers + 1, num_rows, s.hidden_size, dtype=runner.dtype, device=device)
                       if with_hidden else None)  # [L+1, slots * rows, hidden]
        self.graph = None  # a torch.cuda.CUDAGraph once captured

    def load(self, token_ids: torch.Tensor, starts: Sequence[int]) -> None:
        """Set the inputs: token_ids [slots * rows] (any device), each slot's first position."""
        self.token_ids.copy_(token_ids, non_blocking=True)
        # From pageable host memory: staged at once, no wait for the device's queue.
        self.starts.copy_(torch.tensor(list(starts), dtype=torch.long), non_blocking=True)

    def compute(self) -> None:
        """The pass: reads token_ids and starts, writes the slots' KV, logits (and hidden)."""
        runner, s, n = self.runner, self.runner.spec, self.rows
        positions = (self.starts[:, None] + self.offsets[None, :]).reshape(-1)  # [slots * rows]
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        x = F.embedding(self.token_ids, runner.embed)  # [N, hidden]
        if self.hidden is not None:
            self.hidden[0].copy_(x)
        for i, lw in enumerate(self.weights.layers):
            if i not in self.skip_set:
                q, k, v = runner._attention_inputs(x, lw, cos, sin)  # [N, heads, hd], [N, kv_heads, hd] x2
                outputs = []
                for b, slot in enumerate(self.slots):
                    rows = slice(b * n, (b + 1) * n)
                    keys, values = self.keys[i][slot], self.values[i][slot]  # [kv_heads, capacity, hd]
                    keys.index_copy_(1, positions[rows], k[rows].transpose(0, 1))
                    values.index_copy_(1, positions[rows], v[rows].transpose(0, 1))
                    outputs.append(masked_attention(q[rows], keys, values, positions[rows], self.key_positions))
                x = runner._mlp_block(x, outputs[0] if len(outputs) == 1 else torch.cat(outputs), lw)
            if self.hidden is not None:
                self.hidden[i + 1].copy_(x)
        head = self.weights.lm_head if self.draft else runner.full_weights(x.shape[0]).lm_head
        self.logits.copy_(head(runner.norm(x, self.weights.final_norm, s.rms_norm_eps)).float())

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.compute()


class StaticDraft(StaticForward):
    """A one-token draft pass that feeds its greedy token back: each run drafts the next token of
    every slot, advancing positions on the device, and records the token and its top probability
    (what LayerSkipProposer's exit rule reads) at the run's index."""

    def __init__(self, runner: ModelRunner, cache: KVCache, slots: tuple[int, ...], skip_set: frozenset[int],
                 draft: bool) -> None:
        super().__init__(runner, cache, slots, 1, skip_set, draft, with_hidden=False)
        device = runner.device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.drafted = torch.zeros(MAX_DRAFT_STEPS, len(slots), dtype=torch.long, device=device)  # [step, slot]
        self.confidence = torch.zeros(MAX_DRAFT_STEPS, len(slots), dtype=torch.float32, device=device)

    def load(self, token_ids: torch.Tensor, starts: Sequence[int]) -> None:
        super().load(token_ids, starts)
        self.step.zero_()

    def compute(self) -> None:
        super().compute()
        confidence, token = torch.softmax(self.logits, dim=-1).max(dim=-1)  # [slots] each, as LayerSkipProposer
        self.drafted.index_copy_(0, self.step, token[None])
        self.confidence.index_copy_(0, self.step, confidence[None])
        self.token_ids.copy_(token)
        self.starts.add_(1)
        self.step.add_(1)


class CachePool:
    """KV-cache storage that ModelRunner.new_cache hands out (runner.cache_pool): capacities rounded
    up to a power of two (at least MIN_CAPACITY, at most the context window) and storage reused by
    a later cache once the cache that held it is dropped, so static passes captured over it keep
    their addresses from request to request. At most `keep_free` unused storages per shape are
    kept; the others are released, with the static passes over them. New storage is allocated
    only where `check_memory(bytes)` (a backend's free-memory check, raising ValueError) allows."""

    MIN_CAPACITY = 256

    def __init__(self, keep_free: int = 2, check_memory=None, on_release=None) -> None:
        self.keep_free, self.check_memory, self.on_release = keep_free, check_memory, on_release
        self._free: dict[tuple, list[KVCache]] = {}
        self.num_allocated = 0

    def capacity(self, runner: ModelRunner, max_length: int) -> int:
        return min(runner.spec.max_context, max(self.MIN_CAPACITY, 1 << (max(max_length, 1) - 1).bit_length()))

    def new_cache(self, runner: ModelRunner, max_length: int, num_slots: int = 1) -> KVCache:
        s = runner.spec
        key = (self.capacity(runner, max_length), num_slots, runner.dtype, str(runner.device))
        free = self._free.get(key)
        if free:
            storage = free.pop()
        else:
            capacity = key[0]
            if self.check_memory is not None:
                item = torch.empty(0, dtype=runner.dtype).element_size()
                self.check_memory(2 * s.num_layers * num_slots * s.num_kv_heads * capacity * s.head_dim * item,
                                  f"a KV cache of {num_slots} slot(s) x {capacity} positions")
            storage = KVCache(s.num_layers, s.num_kv_heads, s.head_dim, capacity, runner.dtype, runner.device,
                              num_slots)
            self.num_allocated += 1
        cache = storage.share()
        weakref.finalize(cache, self._release, key, storage)
        return cache

    def _release(self, key: tuple, storage: KVCache) -> None:
        free = self._free.setdefault(key, [])
        if len(free) < self.keep_free:
            free.append(storage)
        elif self.on_release is not None:
            self.on_release(storage)


class StaticSteps:
    """The runner's static passes (runner.static_steps), built on first use and, with capture,
    captured as CUDA graphs. forward() and propose() return None for what they do not cover (the
    caller then runs eagerly): more than MAX_ROWS rows per slot, a prefill at position 0, segments
    of different lengths or skip sets, a slot twice, sampling drafts, or a cache too short."""

    def __init__(self, runner: ModelRunner, capture: bool, max_entries: int = MAX_ENTRIES,
                 max_rows: int = MAX_ROWS) -> None:
        self.runner, self.capture, self.max_entries, self.max_rows = runner, capture, max_entries, max_rows
        self._entries: collections.OrderedDict[tuple, StaticForward] = collections.OrderedDict()
        self.num_built = 0
        self.build_seconds = 0.0  # building and capturing, all entries so far
        self.graph_pool = None  # on CUDA: one memory pool for every graph (they never run concurrently)
        self._stream = None  # on CUDA: the stream graphs are captured on

    def __len__(self) -> int:
        return len(self._entries)

    def forget(self, cache_or_keys) -> None:
        """Drop every entry over this cache's storage (a KVCache or its keys list)."""
        keys = cache_or_keys.keys if isinstance(cache_or_keys, KVCache) else cache_or_keys
        for key in [k for k, e in self._entries.items() if e.keys[0] is keys[0]]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    # ------------------------------------------------------------------ entries
    def _entry(self, cls, cache: KVCache, slots: tuple[int, ...], rows: int, skip_set: frozenset[int], draft: bool,
               with_hidden: bool, token_ids: torch.Tensor, starts: Sequence[int]) -> StaticForward:
        """The entry for this configuration with its inputs loaded (built and captured if new)."""
        runner = self.runner
        weights = runner.draft_weights if draft else runner.full_weights(len(slots) * rows)
        key = (cls.__name__, id(cache.keys[0]), slots, rows, skip_set, draft, with_hidden, id(weights),
               id(runner._rope_cos))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.load(token_ids, starts)
            return entry
        t0 = time.perf_counter()
        entry = (cls(runner, cache, slots, skip_set, draft) if cls is StaticDraft
                 else cls(runner, cache, slots, rows, skip_set, draft, with_hidden))
        entry.load(token_ids, starts)
        if self.capture:
            self._capture(entry)
            entry.load(token_ids, starts)  # warming up advanced a draft loop's state
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self.num_built += 1
        self.build_seconds += time.perf_counter() - t0
        return entry

    def _capture(self, entry: StaticForward) -> None:
        """Capture entry.compute() as a CUDA graph. It runs once first on the capture stream (lazy
        set-ups such as cuBLAS workspaces must not happen during capture); that run writes the same
        KV the first replay writes. capture_begin/end rather than torch.cuda.graph(), which also
        runs gc.collect() and empties the allocator's cache at every capture. Thread-local capture
        mode: another thread's CUDA work (a planner) does not invalidate it."""
        device = self.runner.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
            self.graph_pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            entry.compute()
            graph.capture_begin(pool=self.graph_pool, capture_error_mode="thread_local")
            try:
                entry.compute()
            finally:
                graph.capture_end()
        current.wait_stream(self._stream)
        entry.graph = graph

    # ------------------------------------------------------------------ the runner's passes
    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment], cache: KVCache, draft: bool, last_only: bool,
                hidden_states: list | None) -> torch.Tensor | None:
        """ModelRunner.forward_batch through a static pass, or None where not covered."""
        first = segments[0]
        n = first.num_tokens
        slots = tuple(s.slot for s in segments)
        if (n > self.max_rows or len(set(slots)) != len(slots)
                or any(s.num_tokens != n or s.skip_set != first.skip_set for s in segments)
                or (n > 1 and any(s.start == 0 for s in segments))):
            return None
        token_ids = first.token_ids if len(segments) == 1 else torch.cat([s.token_ids for s in segments])
        entry = self._entry(StaticForward, cache, slots, n, first.skip_set, draft, hidden_states is not None,
                            token_ids, [s.start for s in segments])
        entry.run()
        for s in segments:
            cache.lengths[s.slot] = s.start + n
        rows = slice(None) if not last_only else (slice(n - 1, n) if len(segments) == 1
                                                  else [(b + 1) * n - 1 for b in range(len(segments))])
        if hidden_states is not None:
            hidden_states.extend(entry.hidden[:, rows].clone().unbind(0))  # clone: the buffer is rewritten next run
        return entry.logits[rows].clone()

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftSlot], cache: KVCache, exit_threshold: float) -> Proposals | None:
        """LayerSkipProposer.propose for greedy requests with one skip set and one weight choice: all
        of them draft up to the longest request's max_tokens in one loop of replays with no host
        sync, then one read gives every token and confidence, and each request keeps the prefix the
        proposer's exit rule would have drafted (the same tokens: each token depends only on those
        before it). None where not covered."""
        active = [r for r in requests if r.max_tokens > 0]
        if not active:
            return None
        first = active[0]
        slots = tuple(r.slot for r in active)
        num_steps = max(r.max_tokens for r in active)
        if (num_steps > MAX_DRAFT_STEPS or len(set(slots)) != len(slots)
                or (first.use_copy and self.runner.fused_draft is not None)  # the CPU's one-call draft is faster
                or any(not r.params.greedy or r.skip_set != first.skip_set or r.use_copy != first.use_copy
                       for r in active)
                or any(r.position + num_steps > cache.max_length for r in active)):
            return None
        token_ids = torch.tensor([r.token_id for r in active], dtype=torch.long)
        entry = self._entry(StaticDraft, cache, slots, 1, first.skip_set, first.use_copy, False, token_ids,
                            [r.position for r in active])
        for _ in range(num_steps):
            entry.run()
        drafted = entry.drafted[:num_steps].clone()  # [steps, slots]: the proposals' tokens stay on the device
        confidence = entry.confidence[:num_steps].tolist()  # [steps][slots]: the round's one read of the draft
        by_slot = {}
        for b, r in enumerate(active):
            length = 0
            while length < r.max_tokens:
                length += 1
                c = confidence[length - 1][b]
                if not c >= exit_threshold:  # NaN stops too
                    break
            by_slot[r.slot] = Proposal(drafted[:length, b].clone(), None)
            cache.lengths[r.slot] = r.position + length
        return Proposals([by_slot.get(r.slot) if r.max_tokens > 0 else None for r in requests])

    def describe(self) -> dict:
        return {"captured": self.capture, "entries": len(self._entries), "built": self.num_built,
                "build_seconds": round(self.build_seconds, 3)}
