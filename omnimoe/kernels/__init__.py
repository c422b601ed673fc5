"""Triton kernels for the two OmniMoE ops (SPEC §1, §4): the product-key router and the experts.

Launcher contract (also used by the TensorRT plugins' enqueue): with the output tensors and a
workspace of at least `*_workspace_bytes(...)` given, a launcher allocates nothing, never syncs
the host and launches only on torch.cuda.current_stream(). Under TRITON_INTERPRET=1 the same
launchers run on CPU tensors.
"""
from . import experts, router
from .experts import expert_grouped_matmul_triton, expert_workspace_bytes, use_expert_centric
from .router import product_key_topk_triton, topk_workspace_bytes

__all__ = [
    "product_key_topk_triton",
    "expert_grouped_matmul_triton",
    "topk_workspace_bytes",
    "expert_workspace_bytes",
    "use_expert_centric",
]
