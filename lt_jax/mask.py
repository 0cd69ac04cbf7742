"""The one mask rule (DESIGN.md section 3), used by training, prefill, decode and tests.

A query at position q may see a key at position k iff
    k >= 0  and  k <= q  and  (k < sink or q - k < window).
Positions are each token's index in its own sequence; -1 marks padding and empty cache slots. Full causal
attention is sink=0, window=FULL; Mistral's native window is sink=0, window=sliding_window. Masks are always built
from stored positions, never from slot order, so the same rule serves contiguous buffers and ring caches.
"""

FULL = 2**30  # a window no sequence reaches: plain causal attention


def attention_mask(q_pos, k_pos, sink, window):
    """q_pos [B, T], k_pos [B, S] int; sink, window int scalars (static or traced) -> bool [B, T, S]."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    return (k >= 0) & (k <= q) & ((k < sink) | (q - k < window))
