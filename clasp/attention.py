"""Attention of a run of new tokens over a KV-cache slot: the forms the eager forward pass uses.

A verification (or a prefill piece after the first) runs n > 1 queries at positions
start..start+n-1 over the keys of positions 0..start+n-1. Query t sees every earlier position and
itself: a causal mask aligned to the lower right of the [n, start+n] score matrix. Rules:

- On CUDA it is given to SDPA as torch's lower-right causal bias (`causal_lower_right`), not as
  a materialized boolean mask. With a boolean mask and `enable_gqa=True` CUDA has one backend,
  MATH, which repeats K/V over the context in every layer and computes the scores in separate
  kernels; with the lower-right bias 16-bit inputs go to the flash kernel, which takes GQA
  (fewer K/V heads) natively and aligns its causal mask to the lower right.
- On CUDA in a dtype the flash kernel does not take (fp32), K/V heads are repeated explicitly and
  the memory-efficient kernel applies the lower-right mask itself (it has no GQA).
- On CPU the boolean mask is built directly: there the bias only becomes the same mask inside
  SDPA (same kernel, same result), through a few more Python calls per layer, which measured
  ~1-2 ms slower on a 5-row verification (docs/performance.md).
- A prefill piece at start 0 is plainly causal (`is_causal`: the kernel's causal path is much
  faster than an explicit mask, 0.7 s of a 2.4 s 1200-token CPU prefill otherwise), and one query
  needs no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what the CUDA flash kernel takes


def span_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [1, heads, n, hd] at positions start..start+n-1 over keys, values [1, kv_heads, start+n, hd]
    (positions 0..start+n-1); returns [1, heads, n, hd]."""
    n = q.shape[2]
    if n == 1 or start == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=n > 1, enable_gqa=True)
    if not q.is_cuda:
        return boolean_mask_attention(q, keys, values, start)
    return lower_right_attention(q, keys, values, start, expand_heads=q.dtype not in FLASH_DTYPES)


def lower_right_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                          expand_heads: bool = False) -> torch.Tensor:
    """span_attention's CUDA form for n > 1 queries at start > 0: the lower-right causal bias, with
    K/V heads repeated to the query heads first when expand_heads (for the memory-efficient
    kernel, which has no GQA). Runs on any device (the CPU tests check it there)."""
    from torch.nn.attention.bias import causal_lower_right  # here: importing it imports torch._dynamo (~1.5 s)

    n = q.shape[2]
    bias = causal_lower_right(n, start + n)
    group = q.shape[1] // keys.shape[1]
    if expand_heads and group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=True)


def boolean_mask_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """An explicit boolean [n, start+n] mask: span_attention's CPU form, and the reference the CUDA
    form is checked against."""
    n = q.shape[2]
    key_pos = torch.arange(start + n, device=q.device)
    query_pos = torch.arange(start, start + n, device=q.device)
    mask = key_pos[None, :] <= query_pos[:, None]  # [n, start+n]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
