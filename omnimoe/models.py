"""TinyOmniLM: a small causal LM whose feed-forward blocks are OmniMoE layers.

Token embedding -> L x [RMSNorm -> causal self-attention -> RMSNorm -> OmniMoELayer] -> RMSNorm ->
tied head. Written with plain ops (no SDPA, no nn.RMSNorm) so every runtime exports it the same way.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .config import OmniMoEConfig, dataclass_kwargs
from .errors import OmniMoEInputError
from .layer import OmniMoELayer


@dataclasses.dataclass
class TinyOmniLMConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_seq_len: int
    moe: OmniMoEConfig
    alphabet: str = ""  # character-level vocabulary; token id i is alphabet[i]

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = OmniMoEConfig.from_dict(self.moe)
        if not isinstance(self.moe, OmniMoEConfig):
            raise OmniMoEInputError(f"moe must be an OmniMoE layer config, got {type(self.moe).__name__}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise OmniMoEInputError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise OmniMoEInputError("hidden_size must be divisible by num_heads")
        if self.moe.hidden_size != self.hidden_size:
            raise OmniMoEInputError("moe.hidden_size must equal hidden_size")
        if self.alphabet and len(self.alphabet) != self.vocab_size:
            raise OmniMoEInputError("alphabet length must equal vocab_size")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["moe"] = self.moe.to_dict()
        return {"model_type": "tiny_omni_lm", **data}

    @classmethod
    def from_dict(cls, data: dict) -> "TinyOmniLMConfig":
        return cls(**dataclass_kwargs(cls, data))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D // self.num_heads))
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, config: TinyOmniLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config.hidden_size, config.num_heads)
        self.moe_norm = RMSNorm(config.hidden_size)
        self.moe = OmniMoELayer(config.moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))


class TinyOmniLM(nn.Module):
    def __init__(self, config: TinyOmniLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    def omnimoe_layers(self) -> list[OmniMoELayer]:
        return [block.moe for block in self.layers]

    def set_backend(self, backend: str) -> None:
        for layer in self.omnimoe_layers():
            layer.backend = backend

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] int64 -> logits [B, S, vocab]."""
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)
        for block in self.layers:
            x = block(x)
        return self.final_norm(x) @ self.embed.weight.T  # tied head

    def encode(self, text: str) -> torch.Tensor:
        lookup = {c: i for i, c in enumerate(self.config.alphabet)}
        missing = sorted(set(text) - set(lookup))
        if missing:
            raise OmniMoEInputError(f"characters not in the model's alphabet: {missing!r}")
        return torch.tensor([lookup[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.config.alphabet[int(i)] for i in ids)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int) -> str:
        ids = self.encode(prompt)[None]
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_seq_len :])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return self.decode(ids[0])

    def save_pretrained(self, directory) -> None:
        from .checkpoint import save_module

        save_module(self, self.config.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> "TinyOmniLM":
        from .checkpoint import load_checkpoint

        model = load_checkpoint(directory, device=device, dtype=dtype)
        if not isinstance(model, cls):
            raise OmniMoEInputError(f"{directory} is not a TinyOmniLM checkpoint")
        return model
