"""OmniMoELayer and the exact product-key top-K against the naive implementation (issue 2)."""
import itertools

import pytest
import torch

from naive import naive_layer, naive_topk
from omnimoe import OmniMoEConfig, OmniMoEInputError, OmniMoELayer
from omnimoe.ops import product_key_topk_reference, product_key_topk_scores, routing_near_ties


def random_log_probs(T, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(T, s, generator=g) * 3, -1), torch.log_softmax(torch.randn(T, s, generator=g) * 3, -1)


@pytest.mark.parametrize(
    "N,K", [(16, 1), (16, 4), (16, 10), (16, 16), (64, 7), (64, 8), (64, 9), (100, 37), (256, 256), (1024, 40)]
)
@pytest.mark.parametrize("gate", ["product", "softmax"])
def test_topk_equals_brute_force(N, K, gate):
    s = int(N**0.5)
    px, py = random_log_probs(13, s, seed=N + K)
    gates, idx = product_key_topk_reference(px, py, K, gate)
    ref_gates, ref_idx = naive_topk(px, py, K, gate)
    assert idx.dtype == torch.int32 and gates.dtype == torch.float32
    assert torch.equal(idx.long(), ref_idx)
    torch.testing.assert_close(gates, ref_gates, rtol=1e-6, atol=1e-7)


def test_topk_ties_prefer_smaller_expert_index():
    # All scores equal: the top-K must be experts 0..K-1 in order.
    px = torch.log_softmax(torch.zeros(2, 8), -1)
    gates, idx = product_key_topk_reference(px, px.clone(), 10, "softmax")
    assert idx.tolist() == [list(range(10))] * 2
    torch.testing.assert_close(gates, torch.full((2, 10), 0.1))


def test_topk_one_million_experts_small_T():
    s, K = 1024, 16
    px, py = random_log_probs(3, s, seed=7)
    _, idx = product_key_topk_reference(px, py, K, "product")
    full = (px[:, :, None] + py[:, None, :]).flatten(1)  # [3, 1M]: brute force over all N
    ref = torch.sort(full, dim=-1, descending=True, stable=True).indices[:, :K]
    assert torch.equal(idx.long(), ref)


def test_topk_wrong_is_detected():
    # The comparison above must be able to fail: a shifted index table differs from brute force.
    px, py = random_log_probs(4, 8)
    _, idx = product_key_topk_reference(px, py, 5, "product")
    _, ref = naive_topk(px, py, 5, "product")
    assert not torch.equal((idx.long() + 1) % 64, ref)


def test_routing_near_ties_accepts_only_boundary_swaps_within_tolerance():
    px, py = random_log_probs(3, 8, seed=3)
    scores, ref = product_key_topk_scores(px, py, 6)  # ranks 0..4 kept, rank 5 = the (K+1)-th
    ref, nxt = ref[:, :5], ref[:, 5]
    gap = scores[:, 4] - scores[:, 5]
    swapped = ref.clone()
    swapped[:, 4] = nxt  # the K-th expert replaced by the (K+1)-th, in another order
    swapped = swapped.flip(1)
    differs, near = routing_near_ties(px, py, ref, ref.flip(1), 1e-4)
    assert not differs.any() and not near.any()  # order does not matter
    differs, near = routing_near_ties(px, py, ref, swapped, float(gap.max()) + 1e-6)
    assert differs.all() and near.all()
    differs, near = routing_near_ties(px, py, ref, swapped, float(gap.min()) / 2)
    assert differs.all() and not near.any()  # gap above tolerance: a real mismatch
    bad = ref.clone()
    bad[:, 0] = 64  # out of range
    assert routing_near_ties(px, py, ref, bad, 1e9)[0].all() and not routing_near_ties(px, py, ref, bad, 1e9)[1].any()


CONFIGS = list(
    itertools.product(["product", "softmax"], ["batchnorm", "none"], ["silu", "gelu", "gelu_tanh", "relu"])
)


def make_layer(gate="product", norm="batchnorm", act="silu", d=24, N=36, K=7, inter=40, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = OmniMoEConfig(
        hidden_size=d, num_experts=N, top_k=K, intermediate_size=inter, hidden_act=act, router_norm=norm, gate=gate
    )
    layer = OmniMoELayer(cfg)
    if norm == "batchnorm":  # non-trivial eval statistics
        layer.router_norm_x.running_mean.normal_(0, 0.3)
        layer.router_norm_x.running_var.uniform_(0.5, 2.0)
        layer.router_norm_y.running_mean.normal_(0, 0.3)
        layer.router_norm_y.running_var.uniform_(0.5, 2.0)
    return layer.to(dtype).eval()


@pytest.mark.parametrize("gate,norm,act", CONFIGS)
def test_layer_matches_naive_fp32(gate, norm, act):
    layer = make_layer(gate, norm, act)
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, naive_layer(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate,act", [("product", "silu"), ("softmax", "gelu")])
def test_layer_matches_naive_bf16(gate, act):
    layer = make_layer(gate, "batchnorm", act, dtype=torch.bfloat16)
    x = torch.randn(17, 24).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), naive_layer(layer, x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("K,N", [(10, 16), (16, 16), (1, 16)])
def test_layer_k_above_grid_side_and_k_equals_n(K, N):
    layer = make_layer(N=N, K=K, inter=0)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_layer(layer, x), rtol=1e-5, atol=1e-5)


def test_shared_mlp_disabled_has_no_shared_weights():
    layer = make_layer(inter=0)
    assert not any(k.startswith(("gate_proj", "up_proj", "down_proj")) for k in layer.state_dict())


def test_inference_router_matches_per_axis_and_follows_weight_updates():
    # Eval inference concatenates both axes' router weights (cached); it must equal the per-axis
    # ops autograd uses, and notice in-place weight and statistics updates.
    layer = make_layer().eval()
    x = torch.randn(9, 24)
    per_axis = lambda: [t.detach() for t in layer.router_log_probs(x)]  # noqa: E731 (grad on: per-axis path)
    with torch.no_grad():
        fused = layer.router_log_probs(x)
    for a, b in zip(fused, per_axis()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        layer.router_gate_y.weight.mul_(2)
        layer.router_norm_x.running_var.mul_(3)
        fused = layer.router_log_probs(x)
    for a, b in zip(fused, per_axis()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():  # inference tensors carry no version counter: rebuilt, same values
        frozen = make_layer()
        frozen.load_state_dict(layer.state_dict())
        frozen.eval()
        for a, b in zip(frozen.router_log_probs(x), fused):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_empty_and_single_token():
    layer = make_layer()
    with torch.no_grad():
        assert layer(torch.randn(0, 24)).shape == (0, 24)
        assert layer(torch.randn(2, 0, 24)).shape == (2, 0, 24)
        x = torch.randn(1, 24)
        torch.testing.assert_close(layer(x), naive_layer(layer, x), rtol=1e-5, atol=1e-5)


def test_perturbed_expert_row_is_detected():
    layer = make_layer()
    x = torch.randn(4, 24)
    with torch.no_grad():
        y = layer(x)
        _, idx = layer.route(x)
        layer.down_embed.weight[idx[0, 0]] += 0.5
        assert not torch.allclose(y, layer(x), rtol=1e-5, atol=1e-5)


def test_autograd_reference_path():
    layer = make_layer().train()
    x = torch.randn(3, 5, 24, requires_grad=True)
    layer(x).square().sum().backward()
    for name in ["up_embed.weight", "down_embed.weight", "router_gate_x.weight", "gate_proj.weight"]:
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_custom_op_autograd_matches_reference():
    # The torch.library ops (used under export / torch.compile) give the same gradients.
    import omnimoe.custom_ops  # noqa: F401
    from omnimoe import ops

    px, py = [t.requires_grad_() for t in random_log_probs(5, 6)]
    g1, i1 = torch.ops.omnimoe.product_key_topk(px, py, 9, "softmax")
    (g1 * torch.arange(9.0)).sum().backward()
    grads_op = px.grad.clone(), py.grad.clone()
    px.grad = py.grad = None
    g2, i2 = ops.product_key_topk_reference(px, py, 9, "softmax")
    (g2 * torch.arange(9.0)).sum().backward()
    assert torch.equal(i1, i2)
    torch.testing.assert_close(grads_op, (px.grad, py.grad))


def test_bad_configs_and_inputs():
    with pytest.raises(OmniMoEInputError, match="perfect square"):
        OmniMoEConfig(hidden_size=8, num_experts=15, top_k=2)
    with pytest.raises(OmniMoEInputError, match="top_k"):
        OmniMoEConfig(hidden_size=8, num_experts=16, top_k=17)
    with pytest.raises(OmniMoEInputError, match="hidden_act"):
        OmniMoEConfig(hidden_size=8, num_experts=16, top_k=2, hidden_act="tanh")
    with pytest.raises(OmniMoEInputError, match="backend"):
        OmniMoELayer(OmniMoEConfig(hidden_size=8, num_experts=16, top_k=2), backend="cuda")
    with pytest.raises(OmniMoEInputError, match="expected input"):
        make_layer()(torch.randn(3, 5))
