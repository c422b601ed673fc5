"""A deliberately naive OmniMoE forward: all N scores materialised, brute-force top-K, per-token loops.

Independent of omnimoe.ops on purpose: tests compare the real implementations against this.
"""
import torch
import torch.nn.functional as F

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def naive_topk(px: torch.Tensor, py: torch.Tensor, top_k: int, gate: str):
    """px, py [T, s] fp32 -> gates [T,K], indices [T,K] (int64), brute force over all N."""
    T, s = px.shape
    gates, indices = [], []
    for t in range(T):
        scores = torch.empty(s * s)
        for i in range(s):
            scores[i * s : (i + 1) * s] = px[t, i] + py[t]
        order = torch.sort(scores, descending=True, stable=True).indices[:top_k]
        sc = scores[order]
        gates.append(torch.exp(sc) if gate == "product" else torch.softmax(sc, dim=0))
        indices.append(order)
    if T == 0:
        return torch.zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.long)
    return torch.stack(gates), torch.stack(indices)


def naive_layer(layer, x: torch.Tensor) -> torch.Tensor:
    cfg = layer.config
    act = ACT[cfg.hidden_act]
    lead = x.shape[:-1]
    x = x.reshape(-1, cfg.hidden_size)
    sd = {k: v.detach() for k, v in layer.state_dict().items()}

    def log_probs(axis):
        logits = F.linear(x, sd[f"router_gate_{axis}.weight"]).float()
        if cfg.router_norm == "batchnorm":
            mean = sd[f"router_norm_{axis}.running_mean"].float()
            var = sd[f"router_norm_{axis}.running_var"].float()
            logits = (logits - mean) / torch.sqrt(var + cfg.norm_eps)
        return torch.log_softmax(logits, dim=-1)

    gates, indices = naive_topk(log_probs("x"), log_probs("y"), cfg.top_k, cfg.gate)
    up, down = sd["up_embed.weight"].float(), sd["down_embed.weight"].float()
    routed = torch.zeros(x.shape[0], cfg.hidden_size)
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            e = int(indices[t, k])
            h = act(torch.dot(up[e], x[t].float())) * gates[t, k]
            routed[t] += h * down[e]
    y = routed.to(x.dtype)
    if cfg.intermediate_size:
        shared = F.linear(act(F.linear(x, sd["gate_proj.weight"])) * F.linear(x, sd["up_proj.weight"]), sd["down_proj.weight"])
        y = shared + y
    return y.reshape(*lead, cfg.hidden_size)
