"""OmniMoELayer: shared SwiGLU MLP + product-key-routed atomic experts (SPEC §1)."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .config import OmniMoEConfig
from .errors import OmniMoEInputError


class OmniMoELayer(nn.Module):
    """y = SwiGLU(x) + sum_k act(<up[e_k], x>) * g_k * down[e_k], e_k = product-key top-K.

    Parameter names match the upstream flash-algo/omni-moe module, so its state_dicts load as is.
    `backend`: "reference" (pure PyTorch, differentiable) or "triton" (fused GPU kernels).
    """

    def __init__(self, config: OmniMoEConfig, backend: str = "reference", device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        self.backend = backend
        d, inter, n, s = config.hidden_size, config.intermediate_size, config.num_experts, config.grid_side
        factory = {"device": device, "dtype": dtype}
        if inter > 0:
            self.gate_proj = nn.Linear(d, inter, bias=False, **factory)
            self.up_proj = nn.Linear(d, inter, bias=False, **factory)
            self.down_proj = nn.Linear(inter, d, bias=False, **factory)
        self.router_gate_x = nn.Linear(d, s, bias=False, **factory)
        self.router_gate_y = nn.Linear(d, s, bias=False, **factory)
        if config.router_norm == "batchnorm":
            # Statistics stay float32 whatever the weights' dtype (see _router_log_probs).
            self.router_norm_x = nn.BatchNorm1d(s, eps=config.norm_eps, affine=False, device=device)
            self.router_norm_y = nn.BatchNorm1d(s, eps=config.norm_eps, affine=False, device=device)
        self.up_embed = nn.Embedding(n, d, **factory)
        self.down_embed = nn.Embedding(n, d, **factory)
        nn.init.normal_(self.up_embed.weight, std=d**-0.5)
        nn.init.normal_(self.down_embed.weight, std=d**-0.5)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in ops.BACKENDS:
            raise OmniMoEInputError(f"backend must be one of {ops.BACKENDS}, got {value!r}")
        self._backend = value

    def _router_log_probs(self, lx: torch.Tensor, norm: nn.BatchNorm1d | None) -> torch.Tensor:
        lx = lx.float()
        if norm is not None:
            if self.training:
                lx = norm(lx)
            else:
                lx = (lx - norm.running_mean.float()) * torch.rsqrt(norm.running_var.float() + norm.eps)
        return torch.log_softmax(lx, dim=-1)

    def router_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> per-axis log-probs px, py [T, s] float32 (expert i*s+j scores px[i] + py[j])."""
        px = self._router_log_probs(self.router_gate_x(x), getattr(self, "router_norm_x", None))
        py = self._router_log_probs(self.router_gate_y(x), getattr(self, "router_norm_y", None))
        return px, py

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> gates [T, K] float32, expert indices [T, K] int32."""
        px, py = self.router_log_probs(x)
        return ops.product_key_topk(px, py, self.config.top_k, self.config.gate, backend=self.backend)

    def shared_mlp(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.config.intermediate_size == 0:
            return None
        act = ops.activation(self.config.hidden_act)
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.config.hidden_size
        if x.dim() < 1 or x.shape[-1] != d:
            raise OmniMoEInputError(f"expected input [..., {d}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d)
        gates, indices = self.route(x2)
        y = ops.expert_grouped_matmul(
            x2, self.up_embed.weight, self.down_embed.weight, gates, indices, self.config.hidden_act, backend=self.backend
        )
        shared = self.shared_mlp(x2)
        if shared is not None:
            y = shared + y
        return y.reshape(*lead, d)

    # Checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        from .checkpoint import save_layer

        save_layer(self, directory)

    @classmethod
    def from_pretrained(cls, directory, backend: str = "reference", device=None, dtype=None) -> "OmniMoELayer":
        from .checkpoint import load_layer

        return load_layer(directory, backend=backend, device=device, dtype=dtype)
