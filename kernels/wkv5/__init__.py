"""WKV5 (RWKV v5.2) recurrence: y_t = r_t (diag(u) k_t^T v_t + S_{t-1}), S_t = diag(w) S_{t-1} + k_t^T v_t.

All variants share one signature: `(r, k, v, w, u, state=None) -> (y, final_state)` with r, k, v
`[B, T, H, N]`, w = time_decay and u = time_faaaa `[H, N]`, state `[B, H, N, N]` in float32.
"""

from kernels.wkv5.chunk import chunk_wkv5
from kernels.wkv5.naive import naive_wkv5

__all__ = ["naive_wkv5", "chunk_wkv5"]
