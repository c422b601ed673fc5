"""Train TinyOmniLM on a corpus generated deterministically, on CPU, in well under a minute."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .config import OmniMoEConfig
from .models import TinyOmniLM, TinyOmniLMConfig

_SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the robot", "a child", "the teacher", "an engineer"]
_VERBS = ["sees", "likes", "builds", "finds", "paints", "moves", "counts", "opens"]
_OBJECTS = ["the red box", "a small tree", "the old door", "a blue kite", "the big map", "a new lamp", "the warm bread"]
_PLACES = ["at home", "in the park", "on the hill", "by the sea", "in the lab", "near the gate"]


def generate_corpus(num_sentences: int = 4000, seed: int = 0) -> str:
    """Simple sentences plus additions: structure a tiny model can learn quickly, reproducible bit for bit."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        if rng.random() < 0.75:
            lines.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}.")
        else:
            a, b = rng.randrange(10), rng.randrange(10)
            lines.append(f"{a} plus {b} is {a + b}.")
    return "\n".join(lines) + "\n"


def tiny_config(alphabet: str) -> TinyOmniLMConfig:
    moe = OmniMoEConfig(hidden_size=64, intermediate_size=128, num_experts=256, top_k=8, hidden_act="silu")
    return TinyOmniLMConfig(
        vocab_size=len(alphabet), hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64, moe=moe, alphabet=alphabet
    )


@dataclass
class TrainResult:
    model: TinyOmniLM
    loss_before: float
    loss_after: float
    steps: int
    seconds: float


def _batches(data: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def _eval_loss(model: TinyOmniLM, data: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n = (data.numel() - 1) // seq_len
    n = min(n, 64)
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1 : n * seq_len + 1].view(n, seq_len)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    model.train()
    return float(loss)


def train_tiny(steps: int = 250, batch: int = 32, seed: int = 0, log=print) -> TrainResult:
    """A fixed number of steps (not a time budget), so the result is the same on any machine."""
    torch.manual_seed(seed)
    text = generate_corpus(seed=seed)
    alphabet = "".join(sorted(set(text)))
    model = TinyOmniLM(tiny_config(alphabet))
    data = model.encode(text)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    seq_len = model.config.max_seq_len
    loss_before = _eval_loss(model, val_data, seq_len)
    log(f"validation loss before training: {loss_before:.3f}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    step = 0
    for step, (x, y) in enumerate(_batches(train_data, seq_len, batch, gen), start=1):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"step {step}/{steps}  train loss {loss.item():.3f}")
        if step >= steps:
            break
    seconds = time.perf_counter() - start
    loss_after = _eval_loss(model, val_data, seq_len)
    log(f"validation loss after {step} steps ({seconds:.1f} s): {loss_after:.3f}")
    return TrainResult(model.eval(), loss_before, loss_after, step, seconds)
