"""torch.library custom ops `omnimoe::product_key_topk` and `omnimoe::expert_grouped_matmul`.

They are what torch.export / ONNX export see (SPEC §3). CPU runs the reference math, CUDA runs the
Triton kernels. Autograd recomputes through the reference (differentiable) implementation.
Importing this module registers the ops once.
"""
from __future__ import annotations

import torch

from . import ops


def _cuda_kernels():
    from . import kernels

    return kernels


@torch.library.custom_op("omnimoe::product_key_topk", mutates_args=())
def product_key_topk(
    log_probs_x: torch.Tensor, log_probs_y: torch.Tensor, top_k: int, gate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if log_probs_x.is_cuda:
        return _cuda_kernels().product_key_topk_triton(log_probs_x, log_probs_y, top_k, gate)
    return ops.product_key_topk_reference(log_probs_x, log_probs_y, top_k, gate)


@product_key_topk.register_fake
def _(log_probs_x, log_probs_y, top_k, gate):
    T = log_probs_x.shape[0]
    return (
        log_probs_x.new_empty((T, top_k), dtype=torch.float32),
        log_probs_x.new_empty((T, top_k), dtype=torch.int32),
    )


@torch.library.custom_op("omnimoe::expert_grouped_matmul", mutates_args=())
def expert_grouped_matmul(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, activation: str
) -> torch.Tensor:
    if x.is_cuda:
        return _cuda_kernels().expert_grouped_matmul_triton(x, up, down, gates, indices, activation)
    return ops.expert_grouped_matmul_reference(x, up, down, gates, indices, activation)


@expert_grouped_matmul.register_fake
def _(x, up, down, gates, indices, activation):
    return x.new_empty(x.shape)


def _topk_setup(ctx, inputs, output):
    log_probs_x, log_probs_y, top_k, gate = inputs
    ctx.save_for_backward(log_probs_x, log_probs_y)
    ctx.top_k, ctx.gate = top_k, gate


def _topk_backward(ctx, grad_gates, grad_indices):
    log_probs_x, log_probs_y = ctx.saved_tensors
    with torch.enable_grad():
        px = log_probs_x.detach().requires_grad_()
        py = log_probs_y.detach().requires_grad_()
        gates, _ = ops.product_key_topk_reference(px, py, ctx.top_k, ctx.gate)
        gx, gy = torch.autograd.grad(gates, (px, py), grad_gates)
    return gx, gy, None, None


def _experts_setup(ctx, inputs, output):
    x, up, down, gates, indices, activation = inputs
    ctx.save_for_backward(x, up, down, gates, indices)
    ctx.activation = activation


def _experts_backward(ctx, grad_y):
    x, up, down, gates, indices = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, up, down, gates)]
        y = ops.expert_grouped_matmul_reference(*leaves, indices, ctx.activation)
        grads = torch.autograd.grad(y, leaves, grad_y)
    return (*grads, None, None)


product_key_topk.register_autograd(_topk_backward, setup_context=_topk_setup)
expert_grouped_matmul.register_autograd(_experts_backward, setup_context=_experts_setup)
