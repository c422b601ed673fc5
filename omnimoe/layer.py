"""OmniMoELayer: shared SwiGLU MLP + product-key-routed atomic experts (SPEC §1)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import OmniMoEConfig
from .errors import OmniMoEInputError


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# Fewer tokens than this: the routed path runs on the caller's stream (inference fast path).
_SIDE_STREAM_MIN_TOKENS = 256
# Eval + no-grad Triton inference replays a CUDA graph per token count up to this many tokens
# (decode), keeping at most _GRAPH_CACHE_SIZE graphs per layer.
_GRAPH_MAX_TOKENS = 64
_GRAPH_CACHE_SIZE = 8
# Larger token counts (a fixed batch or prompt size) get a graph once the same count comes twice in
# a row, up to this many tokens: at T = 4096 the host takes longer to launch the ~10 kernels than
# the GPU takes to run them (H200: 0.3-0.45 ms of launches for 0.2 ms of work). At most
# _REPEAT_GRAPHS of them per layer: each holds its own activations (~50 MB at T = 4096, I = 4096).
_REPEAT_GRAPH_MAX_TOKENS = 16384
_REPEAT_GRAPHS = 2


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """One shared side stream per CUDA device (None on CPU)."""
    if device.type != "cuda":
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class OmniMoELayer(nn.Module):
    """y = SwiGLU(x) + sum_k act(<up[e_k], x>) * g_k * down[e_k], e_k = product-key top-K.

    Parameter names match the upstream flash-algo/omni-moe module, so its state_dicts load as is.
    `backend`: "reference" (pure PyTorch, differentiable) or "triton" (fused GPU kernels).
    `decode_cuda_graphs` (triton, eval, no grad, CUDA, <= 64 tokens): replay a CUDA graph per token
    count instead of launching each kernel from Python; set it False on an instance to launch.
    `repeat_cuda_graphs` (same conditions, 65..16384 tokens): the same once a token count comes on
    two calls in a row (at most two such graphs per layer); set it False to launch.
    """

    decode_cuda_graphs = True
    repeat_cuda_graphs = True

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

    def __getstate__(self):
        # Captured CUDA graphs are per process and cannot be copied; copies re-capture on use.
        state = self.__dict__.copy()
        state.pop("_cuda_graphs", None)
        return state

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
        """x [T, d] -> per-axis log-probs px, py [T, s] float32 (expert i*s+j scores px[i] + py[j]).

        Both backends share this code, so they route on identical log-probs."""
        norm_x, norm_y = getattr(self, "router_norm_x", None), getattr(self, "router_norm_y", None)
        weights = (self.router_gate_x.weight, self.router_gate_y.weight)
        if self.training or ops._exporting() or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
            # Per-axis standard ops: what the ONNX graph holds, and what autograd / batch statistics need.
            return (self._router_log_probs(self.router_gate_x(x), norm_x),
                    self._router_log_probs(self.router_gate_y(x), norm_y))
        # Inference: both axes in one GEMM, one normalisation (float32 out) and one log-softmax:
        # 3 kernels, not 14.
        log_probs = self._router_log_probs_fast(x)
        s = self.config.grid_side
        return log_probs[:, :s], log_probs[:, s:]

    def _router_inference_params(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Router weights [2s, d] and the eval batch-norm as float32 (scale, shift) [2s], both axes
        concatenated.

        Cached while no source tensor changes (data pointer and version counter); inference tensors
        track no version, so for them it is rebuilt each call (same values, a few more kernels)."""
        weights = [self.router_gate_x.weight, self.router_gate_y.weight]
        norms = (self.router_norm_x, self.router_norm_y) if self.config.router_norm == "batchnorm" else ()
        srcs = weights + [n.running_mean for n in norms] + [n.running_var for n in norms]
        try:
            w0 = weights[0]
            key = (w0.device, w0.dtype) + tuple((t.data_ptr(), t._version) for t in srcs) + tuple(n.eps for n in norms)
        except RuntimeError:  # an inference tensor: no version counter, so nothing to key a cache on
            key = None
        cache = self.__dict__.get("_router_cache")
        if key is None or cache is None or cache[0] != key:
            with torch.no_grad():
                w = torch.cat(weights)
                affine = None
                if norms:
                    scale = torch.cat([torch.rsqrt(n.running_var.float() + n.eps) for n in norms])
                    affine = (scale, -torch.cat([n.running_mean.float() for n in norms]) * scale)
            cache = (key, w, affine)
            if key is not None:
                self.__dict__["_router_cache"] = cache
        return cache[1], cache[2]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> gates [T, K] float32, expert indices [T, K] int32."""
        if self._fast_inference(x):
            return self._route_fast(x)
        px, py = self.router_log_probs(x)
        return ops.product_key_topk(px, py, self.config.top_k, self.config.gate, backend=self.backend)

    def _fused_inference(self) -> bool:
        # Triton inference fuses the SwiGLU product (kernels/swiglu.py) and the residual add;
        # training (batch statistics) and export (standard ONNX ops) take the plain torch path.
        return self.backend == "triton" and not self.training and not ops._exporting()

    def _swiglu_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(gate_proj x) * up_proj x: [T, I]."""
        if self._fused_inference():
            from .kernels.swiglu import gated_act_triton

            return gated_act_triton(self.gate_proj(x), self.up_proj(x), self.config.hidden_act)
        return ops.activation(self.config.hidden_act)(self.gate_proj(x)) * self.up_proj(x)

    def shared_mlp(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.config.intermediate_size == 0:
            return None
        return self.down_proj(self._swiglu_hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.config.hidden_size
        if x.dim() < 1 or x.shape[-1] != d:
            raise OmniMoEInputError(f"expected input [..., {d}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d)
        if self._fast_inference(x2):
            return self._forward_fast(x2.contiguous()).reshape(*lead, d)
        if self._fused_inference():
            return self._forward_fused(x2).reshape(*lead, d)
        gates, indices = self.route(x2)
        y = ops.expert_grouped_matmul(
            x2, self.up_embed.weight, self.down_embed.weight, gates, indices, self.config.hidden_act, backend=self.backend
        )
        if self.config.intermediate_size > 0:
            y = self.shared_mlp(x2) + y
        return y.reshape(*lead, d)

    def _forward_fused(self, x2: torch.Tensor) -> torch.Tensor:
        """Triton inference. On CUDA the routed path (router + experts, memory-bound) runs on a side
        stream while the shared MLP's GEMMs run on the caller's; the join makes it one stream again
        before returning, and it stays capturable in a CUDA graph."""
        from .kernels import expert_grouped_matmul_triton

        y = x2.new_empty(x2.shape)  # on the caller's stream, so nothing allocated on the side escapes
        side = _side_stream(x2.device) if self.config.intermediate_size > 0 else None
        if side is not None:
            main = torch.cuda.current_stream(x2.device)
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            gates, indices = self.route(x2)
            expert_grouped_matmul_triton(
                x2, self.up_embed.weight, self.down_embed.weight, gates, indices, self.config.hidden_act, out=y
            )
        if self.config.intermediate_size > 0:
            h = self._swiglu_hidden(x2)
            if side is not None:
                main.wait_stream(side)
            y.addmm_(h, self.down_proj.weight.t())  # the residual add rides in the GEMM
        return y

    # Inference hot path (backend="triton", eval, no autograd) --------------------------------
    def _fast_inference(self, x: torch.Tensor) -> bool:
        """Triton inference with autograd off: the launch-lean path (_forward_fast). With autograd
        on (the shared MLP and router stay differentiable) or while exporting, _forward_fused."""
        return (self._backend == "triton" and not self.training and not torch.is_grad_enabled()
                and not ops._exporting())

    def _route_fast(self, x2: torch.Tensor, sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Router GEMM (both axes) + for K <= 64 one Triton launch for batch-norm, log-softmax,
        top-K and gates; larger K keeps addcmul + log-softmax + product_key_topk_triton
        (sort=False: each token's K pairs in no particular order, for the routed sum)."""
        from .kernels import router as kr

        cfg = self.config
        s, K, T = cfg.grid_side, cfg.top_k, x2.shape[0]
        if K > kr.SMALL_K_MAX or T == 0:
            log_probs = self._router_log_probs_fast(x2)
            return kr.product_key_topk_triton(log_probs[:, :s], log_probs[:, s:], K, cfg.gate, sort=sort)
        w, norm_affine = self._router_inference_params()
        logits = F.linear(x2, w)
        gates = torch.empty((T, K), dtype=torch.float32, device=x2.device)
        indices = torch.empty((T, K), dtype=torch.int32, device=x2.device)
        scale, shift = norm_affine if norm_affine is not None else (None, None)
        kr._router_logits_topk_launch(logits, scale, shift, s, K, cfg.gate, gates, indices)
        return gates, indices

    def _router_log_probs_fast(self, x2: torch.Tensor) -> torch.Tensor:
        """[T, 2s] float32: px then py of router_log_probs' inference path, from one router GEMM."""
        w, norm_affine = self._router_inference_params()
        logits = F.linear(x2, w)
        if norm_affine is not None:
            scale, shift = norm_affine  # (l - mean) / sqrt(var + eps) = l * scale + shift
            logits = torch.addcmul(shift, logits, scale)
        else:
            logits = logits.float()
        s = self.config.grid_side
        return torch.log_softmax(logits.view(x2.shape[0], 2, s), dim=-1).view(x2.shape[0], 2 * s)

    def _forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        """Eval + no-grad Triton inference. On CUDA, up to _GRAPH_MAX_TOKENS tokens (decode), and
        up to _REPEAT_GRAPH_MAX_TOKENS once a token count repeats on consecutive calls, the forward
        replays a CUDA graph captured per token count (see _forward_graphed): one copy, one replay
        and one clone of host work instead of ~10 launches. Otherwise _forward_launch."""
        T = x2.shape[0]
        if x2.is_cuda and T > 0 and not torch.cuda.is_current_stream_capturing() and not torch.is_autocast_enabled():
            key = (T, x2.dtype, x2.device)
            repeated = self.__dict__.get("_last_call_key") == key
            self.__dict__["_last_call_key"] = key
            if ((self.decode_cuda_graphs and T <= _GRAPH_MAX_TOKENS)
                    or (self.repeat_cuda_graphs and _GRAPH_MAX_TOKENS < T <= _REPEAT_GRAPH_MAX_TOKENS
                        and (repeated or key in self.__dict__.get("_cuda_graphs", ())))):
                y = self._forward_graphed(x2)
                if y is not None:
                    return y
        return self._forward_launch(x2)

    def _forward_graphed(self, x2: torch.Tensor) -> torch.Tensor | None:
        """Replay of a CUDA graph of _forward_launch for this token count, dtype and device.

        A graph reads fixed addresses: the entry is re-captured when any tensor it reads moved
        (a parameter replaced, the cached router weights rebuilt after an in-place update); an
        in-place update at the same address needs nothing. The graph replays on the caller's
        current stream; a call from another stream than the previous one first waits for it.
        Returns None if the parameters are inference tensors (nothing to key a graph on), and
        turns graphs off for this layer if capture fails."""
        w, affine = self._router_inference_params()
        cache = self.__dict__.get("_router_cache")
        if cache is None or cache[1] is not w:
            # Inference-tensor parameters: the router weights are rebuilt (at a new address) each
            # call, so a graph would be re-captured each call. Launch instead.
            return None
        srcs = [w, self.up_embed.weight, self.down_embed.weight]
        if affine is not None:
            srcs += affine
        if self.config.intermediate_size > 0:
            srcs += [self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight]
        sig = tuple(t.data_ptr() for t in srcs)
        graphs = self.__dict__.setdefault("_cuda_graphs", {})
        key = (x2.shape[0], x2.dtype, x2.device)
        entry = graphs.get(key)
        stream = torch.cuda.current_stream(x2.device)
        if entry is None or entry[0] != sig:
            graphs.pop(key, None)
            if len(graphs) >= _GRAPH_CACHE_SIZE:
                graphs.pop(next(iter(graphs)))  # oldest first
            if key[0] > _GRAPH_MAX_TOKENS:
                repeats = [k for k in graphs if k[0] > _GRAPH_MAX_TOKENS]
                for old in repeats[: max(0, len(repeats) - _REPEAT_GRAPHS + 1)]:
                    graphs.pop(old)  # oldest first: their activations are large
            try:
                entry = (sig, *self._capture_graph(x2), stream)
            except RuntimeError:
                self.decode_cuda_graphs = self.repeat_cuda_graphs = False
                return None
            graphs[key] = entry
        _, static_x, static_y, graph, last = entry
        if last != stream:
            stream.wait_stream(last)
            graphs[key] = entry[:4] + (stream,)
        static_x.copy_(x2)
        graph.replay()
        return static_y.clone()

    def _capture_graph(self, x2: torch.Tensor):
        static_x = x2.clone()
        main = torch.cuda.current_stream(x2.device)
        warm = torch.cuda.Stream(x2.device)
        warm.wait_stream(main)
        with torch.cuda.stream(warm):
            self._forward_launch(static_x)  # compiles kernels, creates cuBLAS handles/workspaces
        main.wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_y = self._forward_launch(static_x)
        return static_x, static_y, graph

    def _grid_from_rule(self, x2: torch.Tensor) -> bool:
        """Whether the routed experts run as grid_row.rule_launch: where the op's "auto" would run
        the grid-line schedule, and the router's top-K is a rule (product gates, K > 64) over
        whole-line panels."""
        from .kernels import dense_rule, grid_row
        from .kernels import experts as ke

        cfg, T = self.config, x2.shape[0]
        return (dense_rule.rule_applies(cfg.top_k, cfg.gate) and ke.use_grid_row(T, cfg.top_k, cfg.num_experts)
                and grid_row.rule_supported(T, cfg.top_k, cfg.num_experts) and grid_row.fits_device(x2.device))

    def _forward_launch(self, x2: torch.Tensor) -> torch.Tensor:
        """As _forward_fused, with fewer launches: the router tail in one kernel (K <= 64), no
        argument re-checks between our own kernels, and the side stream only from
        _SIDE_STREAM_MIN_TOKENS tokens (below, the stream switches cost more host time than the
        overlap saves) or under graph capture."""
        from .kernels import dense_rule, grid_row, swiglu
        from .kernels import experts as ke
        from .kernels import router as kr

        cfg = self.config
        T = x2.shape[0]
        y = torch.empty_like(x2)
        if T == 0:
            return y
        up, down = self.up_embed.weight, self.down_embed.weight
        act = ke.ACT_IDS[cfg.hidden_act]
        # Schedule: dense GEMMs at high routing density, else token-centric or the expert-centric
        # one `expert_grouped_matmul_triton` picks (it also states what is wrong with odd inputs).
        plain = up.dtype == x2.dtype and down.dtype == x2.dtype and up.is_contiguous() and down.is_contiguous()
        dense = plain and ke.use_dense(T, cfg.top_k, cfg.num_experts)
        token = plain and not dense and not ke.use_expert_centric(T, cfg.top_k, cfg.num_experts)
        shared = cfg.intermediate_size > 0
        # While a CUDA graph is captured the switch costs nothing at replay: the two paths become
        # parallel branches of the graph (decode's replays), whatever T is.
        overlap = T >= _SIDE_STREAM_MIN_TOKENS or (x2.is_cuda and torch.cuda.is_current_stream_capturing())
        side = _side_stream(x2.device) if shared and overlap else None
        if side is not None:
            main = torch.cuda.current_stream(x2.device)
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if dense and dense_rule.rule_applies(cfg.top_k, cfg.gate):
                # The router's top-K as a per-token rule, applied by one pass over X Up^T.
                s = cfg.grid_side
                log_probs = self._router_log_probs_fast(x2)
                theta, e_star = kr.product_key_threshold_triton(log_probs[:, :s], log_probs[:, s:], cfg.top_k)
                dense_rule.dense_rule_launch(x2, up, down, log_probs, theta, e_star, act, y)
            elif plain and not dense and self._grid_from_rule(x2):
                # Grid lines with their slots and gates from the router's rule: no pair list.
                grid_row.rule_launch(x2, up, down, self._router_log_probs_fast(x2), cfg.top_k, act, y)
            else:
                gates, indices = self._route_fast(x2, sort=False)  # the routed sum ignores their order
                if dense:
                    ke._dense_launch(x2, up, down, gates, indices, act, y)
                elif token:
                    ke.token_centric_fast(x2, up, down, gates, indices, y, act)
                else:
                    ke.expert_grouped_matmul_triton(x2, up, down, gates, indices, cfg.hidden_act, out=y)
        if shared:
            wg, wu = self.gate_proj.weight, self.up_proj.weight
            if swiglu.gated_mlp_fusable(x2, wg, wu):
                # gate and up stay fp32 until h is rounded; tiles chosen by what runs beside it
                h = swiglu.gated_mlp_fast(x2, wg, wu, act, swiglu.gated_mlp_config(cfg.grid_side))
            else:
                g, u = F.linear(x2, wg), F.linear(x2, wu)
                h = swiglu.gated_act_fast(g, u, act) if g.dtype == u.dtype else ops.activation(cfg.hidden_act)(g) * u
            if side is not None:
                main.wait_stream(side)
            y.addmm_(h, self.down_proj.weight.t())  # the residual add rides in the GEMM
        return y

    # Checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        from .checkpoint import save_layer

        save_layer(self, directory)

    @classmethod
    def from_pretrained(cls, directory, backend: str = "reference", device=None, dtype=None) -> "OmniMoELayer":
        from .checkpoint import load_layer

        return load_layer(directory, backend=backend, device=device, dtype=dtype)
