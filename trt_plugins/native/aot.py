"""Ahead-of-time compilation of the Triton kernels a model needs, for the SMs asked for.

A *variant* is what one plugin instance needs: the router's (s, K, gate) or the experts' (d, N, K,
dtype, activation). `kernel_specs(variant)` lists the kernels its launcher runs, with the same
constexprs and num_warps (`router.topk_kernel_config`, `experts.token_centric_config`,
`experts.expert_tile_config`, grid_row's `*_config`); `compile_variants` compiles each for every SM with `triton.compile`
(no GPU needed) and returns cubins, one PTX fallback per kernel and the launch metadata the C++
side needs (entry name, shared memory, warps, parameter count).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil

from omnimoe.errors import OmniMoEInputError

# What `omnimoe build --plugins native` compiles for unless `--sm` says otherwise (issue 10).
DEFAULT_SMS = (80, 86, 87, 89, 90, 100, 110, 120)
# Targets triton compiles here (probed; cc 101 fails in triton).
SUPPORTED_SMS = (80, 86, 87, 89, 90, 100, 103, 110, 120, 121)
# The PTX every kernel also carries, for GPUs newer than every SM compiled: generic sm_80 code
# (no arch-specific 'a' features) at PTX ISA 8.0, which any CUDA 12.0+ driver can JIT.
PTX_FALLBACK_SM = 80
# PTX ISA version pinned per target: the lowest that has the target, so the output does not
# depend on which ptxas triton ships (its CUDA 13.x ptxas would otherwise emit PTX 9.x).
PTX_VERSION = {80: 80, 86: 80, 87: 80, 89: 80, 90: 80, 100: 86, 103: 88, 110: 90, 120: 87, 121: 88}

DTYPES = ("fp32", "fp16", "bf16")
_TRITON_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclasses.dataclass(frozen=True)
class TopKVariant:
    grid_side: int  # s
    top_k: int
    gate: str


@dataclasses.dataclass(frozen=True)
class ExpertsVariant:
    hidden_size: int  # d
    num_experts: int  # N
    top_k: int
    dtype: str  # fp32 | fp16 | bf16
    activation: str


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel launch of a variant: which @triton.jit function, how it is specialised."""

    role: str  # name the C++ launcher uses (topk, token, token_h, histogram, ...)
    fn: object  # triton JITFunction
    pointer_types: tuple  # ((param name, triton dtype), ...)
    known_ints: tuple  # ((param name, value), ...) fixed per variant: divisibility hints
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int | None = None  # None: triton's default, as a launch that names none gets

    def signature(self) -> tuple[dict, dict, dict]:
        """(triton signature, constexprs, attrs) for ASTSource."""
        pointers, known, consts = dict(self.pointer_types), dict(self.known_ints), dict(self.constexprs)
        sig, attrs = {}, {}
        for i, p in enumerate(self.fn.params):
            if p.is_constexpr:
                if p.name not in consts:
                    raise RuntimeError(f"{self.fn.__name__}: no value for constexpr {p.name}")
                sig[p.name] = "constexpr"
            elif p.name in pointers:
                sig[p.name] = "*" + pointers[p.name]
                attrs[(i,)] = [["tt.divisibility", 16]]  # enqueue checks 16-byte alignment
            else:
                sig[p.name] = "i32"
                if p.name in known and int(known[p.name]) % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, consts, attrs

    def runtime_params(self) -> list[tuple[str, str]]:
        """(name, 'ptr' | 'i32') of the parameters a launch passes, in order."""
        pointers = dict(self.pointer_types)
        return [(p.name, "ptr" if p.name in pointers else "i32") for p in self.fn.params if not p.is_constexpr]


def _split_meta(meta: dict) -> tuple[tuple, int, int | None]:
    """A launcher's config dict -> (constexprs, num_warps, num_stages or None)."""
    meta = dict(meta)
    num_warps = int(meta.pop("num_warps"))
    num_stages = meta.pop("num_stages", None)
    return tuple(sorted(meta.items())), num_warps, None if num_stages is None else int(num_stages)


def grid_reachable(K: int, N: int) -> bool:
    """Whether "auto" (`experts.use_grid_row`) runs the grid-row schedule for some token count at
    this (K, N): N a perfect square and the token / reuse thresholds met below its int32 limit."""
    from omnimoe.kernels import experts, grid_row

    return experts._grid_row_max_tokens(grid_row.max_tokens(K, N), K, N) > 0


def _grid_specs(variant) -> list:
    """The grid-row schedule's kernels (grid_row.launch), for a variant where "auto" may pick it."""
    from omnimoe.kernels import experts, grid_row

    d, N, K, t = variant.hidden_size, variant.num_experts, variant.top_k, _TRITON_DTYPE[variant.dtype]
    fp32 = variant.dtype == "fp32"
    act = experts.ACT_IDS[variant.activation]
    s, P, pwr, _ = grid_row.panel_geometry(N)
    npanels = grid_row.num_panels(N)
    i32 = "i32"
    # Ints fixed per variant (divisibility hints only, as triton's launcher specialises them).
    geo = (("K", K), ("N", N), ("S", s), ("P", P), ("PWR", pwr))
    specs = []

    def spec(role, fn, ptrs, known, meta):
        consts, warps, stages = _split_meta(meta)
        specs.append(KernelSpec(role, fn, ptrs, known, consts, warps, stages))

    spec("gr_line_count", grid_row._gr_line_count_kernel, (("idx_ptr", i32), ("lcounts_ptr", i32)), geo,
         grid_row.line_count_config(N, K))
    spec("gr_histogram", grid_row._gr_histogram_kernel,
         (("idx_ptr", i32), ("lcounts_ptr", i32), ("counts_ptr", i32), ("rank_ptr", i32)), geo, grid_row.histogram_config())
    spec("gr_scan_blocks", grid_row._gr_scan_blocks_kernel,
         tuple((name, i32) for name in ("counts_ptr", "offsets_ptr", "slotoff_ptr", "bsums_ptr", "bslots_ptr")), (),
         grid_row.scan_blocks_config())
    sorted_ptrs = (("scol_ptr", i32), ("sgate_ptr", "fp32"), ("sslot_ptr", i32), ("slot_tok_ptr", i32),
                   ("slot_pair_ptr", i32))
    scans = (("offsets_ptr", i32), ("slotoff_ptr", i32), ("bsums_ptr", i32), ("bslots_ptr", i32))
    spec("gr_scatter", grid_row._gr_scatter_kernel,
         (("idx_ptr", i32), ("g_ptr", "fp32"), ("lcounts_ptr", i32), ("rank_ptr", i32)) + scans + sorted_ptrs, geo,
         grid_row.scatter_config())
    spec("gr_blocks", grid_row._gr_blocks_kernel, (("slotoff_ptr", i32), ("bslots_ptr", i32), ("blkoff_ptr", i32)),
         (("NP", npanels),), grid_row.blocks_config(N, fp32))
    panel_ptrs = (("x_ptr", t), ("up_ptr", t), ("down_ptr", t)) + sorted_ptrs + scans + (
        ("blkoff_ptr", i32), ("gscr_ptr", "fp32"), ("hscr_ptr", "fp32"), ("y_ptr", "fp32"),
        # the rule-driven slots' arguments (RULE=False here: passed, never read)
        ("wsf_ptr", "fp32"), ("wsi_ptr", i32), ("rule_ptr", i32), ("pcount_ptr", i32), ("pslot_ptr", i32),
        ("pspan_ptr", i32))
    panel_known = (("D", d), ("S", s), ("P", P), ("PWR", pwr), ("NP", npanels), ("NSTEPS", grid_row.panel_steps(N)))
    spec("gr_panel", grid_row._gr_panel_kernel, panel_ptrs, panel_known, grid_row.panel_config(N, fp32, act))
    if not fp32:
        spec("gr_cast", grid_row._gr_cast_kernel, (("src_ptr", "fp32"), ("dst_ptr", t)), (), grid_row.cast_config())
    return specs


def kernel_specs(variant) -> list[KernelSpec]:
    """The kernels `variant`'s launcher may run, specialised exactly as the Python launcher does."""
    from omnimoe.kernels import experts, router

    if isinstance(variant, TopKVariant):
        s, K = variant.grid_side, variant.top_k
        ptrs = (("px_ptr", "fp32"), ("py_ptr", "fp32"), ("gates_ptr", "fp32"), ("idx_ptr", "i32"),
                ("wsf_ptr", "fp32"), ("wsi_ptr", "i32"))
        known = (("s", s), ("K", K), ("KA", min(K, s)), ("stride_px", s), ("stride_py", s))
        specs = []
        # topk_many: what product_key_topk_triton launches from _launch.MANY_TOKENS tokens on.
        for role, many in (("topk", False), ("topk_many", True)):
            kernel, meta = router.topk_kernel_config(s, K, variant.gate, many_tokens=many)
            consts, warps, stages = _split_meta(meta)
            specs.append(KernelSpec(role, kernel, ptrs, known, consts, warps, stages))
        return specs

    if not isinstance(variant, ExpertsVariant):
        raise TypeError(variant)
    d, N, K, t = variant.hidden_size, variant.num_experts, variant.top_k, _TRITON_DTYPE[variant.dtype]
    act = experts.ACT_IDS[variant.activation]
    if experts.EXPERT_CENTRIC_SCHEDULE != "hybrid":
        # The C++ launcher mirrors the hybrid (and grid-row) schedules only; fail here rather than run another.
        raise RuntimeError(f"native plugins implement the hybrid schedule, auto is {experts.EXPERT_CENTRIC_SCHEDULE!r}")
    dkn = (("D", d), ("K", K), ("N", N))
    table = (("x_ptr", t), ("up_ptr", t), ("down_ptr", t), ("g_ptr", "fp32"), ("idx_ptr", "i32"))
    specs = []
    # *_many: the token-centric launches from _launch.MANY_TOKENS tokens on (experts._launch_token_centric).
    for role, h_given, many in (("token", False, False), ("token_h", True, False), ("token_many", False, True),
                                ("token_h_many", True, True)):
        consts, warps, stages = _split_meta(experts.token_centric_config(d, K, act, h_given, many))
        specs.append(KernelSpec(role, experts._token_centric_kernel, table + (("y_ptr", t),), dkn, consts, warps, stages))
    i32 = "i32"
    sort_block = (("BLOCK", experts._SORT_BLOCK),)
    specs += [
        KernelSpec("histogram", experts._histogram_kernel, (("idx_ptr", i32), ("counts_ptr", i32), ("rank_ptr", i32)),
                   (("N", N),), sort_block, 4),
        KernelSpec("scan_blocks", experts._scan_blocks_kernel,
                   (("counts_ptr", i32), ("offsets_ptr", i32), ("block_sums_ptr", i32)), (("N1", N + 1),),
                   (("BLOCK", experts._SCAN_BLOCK),), 4),
        KernelSpec("scan_top", experts._scan_top_kernel, (("block_sums_ptr", i32),), (),
                   (("BLOCK", experts._SCAN_TOP_BLOCK),), 4),
        KernelSpec("scatter", experts._scatter_kernel,
                   (("idx_ptr", i32), ("rank_ptr", i32), ("offsets_ptr", i32), ("block_sums_ptr", i32), ("sorted_ptr", i32)),
                   (("N", N),), (("SCAN_BLOCK", experts._SCAN_BLOCK),) + sort_block, 4),
    ]
    consts, warps, stages = _split_meta(experts.expert_tile_config(variant.dtype == "fp32", act, True))
    tile_ptrs = table + (("sorted_ptr", i32), ("offsets_ptr", i32), ("block_sums_ptr", i32), ("y_ptr", "fp32"))
    specs.append(KernelSpec("tile", experts._expert_tile_kernel, tile_ptrs, dkn, consts, warps, stages))
    if grid_reachable(K, N):
        # grid_row.launch runs experts._scan_top_kernel too: the "scan_top" spec above (same BLOCK).
        specs += _grid_specs(variant)
    return specs


@dataclasses.dataclass(frozen=True)
class KernelImage:
    sm: int  # 0 for the PTX fallback
    name: str  # entry point
    data: bytes  # cubin, or NUL-terminated PTX text
    shared: int
    num_warps: int
    num_params: int  # entry parameters, the scratch pointers triton appends included


@dataclasses.dataclass
class CompiledLibrary:
    sms: tuple
    variants: list  # [(variant, [(KernelSpec, [KernelImage, ...]), ...]), ...]
    triton_version: str
    ptxas: str


def _ptxas_tools():
    """Prefer the system ptxas (CUDA 13.0 here) over the wheel's newer one when present."""
    from triton import knobs

    system = os.environ.get("OMNIMOE_PTXAS") or shutil.which("ptxas")
    if system:
        for attr in ("ptxas", "ptxas_blackwell"):
            tool = getattr(knobs.nvidia, attr, None)
            if tool is not None:
                os.environ.setdefault(f"TRITON_{attr.upper()}_PATH", system)
    return system or "triton's bundled ptxas"


def _compile_one(spec: KernelSpec, cc: int, *, ptx_only: bool = False) -> KernelImage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = spec.signature()
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": spec.num_warps, "ptx_version": PTX_VERSION[cc], "enable_fp_fusion": True}
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # noqa: BLE001 - triton raises many types; name the kernel and target
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OmniMoEInputError(f"triton could not compile {spec.fn.__name__} for sm_{cc}: {first}") from None
    md = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(md, scratch, 0) or 0) > 0:
            raise RuntimeError(f"{spec.fn.__name__} for sm_{cc} needs {scratch}: not supported by the native launcher")
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    num_params = entry.group(2).count(".param")
    n_args = len(spec.runtime_params())
    if not n_args <= num_params <= n_args + 2:
        raise RuntimeError(f"{spec.fn.__name__}: entry has {num_params} params for {n_args} arguments")
    data = (ptx.encode() + b"\0") if ptx_only else bytes(compiled.asm["cubin"])
    return KernelImage(0 if ptx_only else cc, entry.group(1), data, int(md.shared), int(md.num_warps), num_params)


def parse_sms(text) -> tuple[int, ...]:
    """'87,90' (or an iterable of ints) -> sorted unique supported compute capabilities."""
    items = text.split(",") if isinstance(text, str) else list(text)
    sms = set()
    for item in items:
        item = str(item).strip().lower().removeprefix("sm_").removeprefix("sm")
        if not item:
            continue
        try:
            sm = int(item)
        except ValueError:
            raise OmniMoEInputError(f"--sm takes compute capabilities like 87,90; got {text!r}") from None
        if sm not in SUPPORTED_SMS:
            raise OmniMoEInputError(f"--sm {sm} is not supported (choose from {', '.join(map(str, SUPPORTED_SMS))})")
        sms.add(sm)
    if not sms:
        raise OmniMoEInputError(f"--sm names no compute capability: {text!r}")
    return tuple(sorted(sms))


# Jobs of the running compile_variants, read by forked workers (JIT functions do not pickle).
_JOBS: list = []


def _compile_job(i: int) -> KernelImage:
    spec, cc, ptx_only = _JOBS[i]
    return _compile_one(spec, cc, ptx_only=ptx_only)


def _run_jobs(jobs: list, log=None) -> list:
    """Compile in forked worker processes (triton's compiler holds the GIL); serially without fork."""
    import concurrent.futures
    import multiprocessing

    global _JOBS
    workers = min(len(jobs), os.cpu_count() or 1)
    if log:
        log(f"compiling {len(jobs)} kernel images with {workers} processes")
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_compile_one(spec, cc, ptx_only=p) for spec, cc, p in jobs]
    _JOBS = jobs
    try:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return list(pool.map(_compile_job, range(len(jobs))))
    finally:
        _JOBS = []


def compile_variants(variants, sms=DEFAULT_SMS, *, log=None) -> CompiledLibrary:
    """Compile every kernel of every variant for every SM (+ the PTX fallback), deduplicated."""
    import triton

    ptxas = _ptxas_tools()
    sms = parse_sms(sms)
    keys: dict = {}  # compile key -> job index
    jobs, plan = [], []
    for variant in dict.fromkeys(variants):  # keep order, drop repeats
        kernels = []
        for spec in kernel_specs(variant):
            idx = []
            for cc, ptx_only in [(cc, False) for cc in sms] + [(PTX_FALLBACK_SM, True)]:
                key = (spec.fn.__name__, repr(spec.signature()), spec.num_warps, spec.num_stages, cc, ptx_only)
                if key not in keys:
                    keys[key] = len(jobs)
                    jobs.append((spec, cc, ptx_only))
                idx.append(keys[key])
            kernels.append((spec, idx))
        plan.append((variant, kernels))
    images = _run_jobs(jobs, log)
    out = [(v, [(spec, [images[i] for i in idx]) for spec, idx in kernels]) for v, kernels in plan]
    return CompiledLibrary(sms, out, triton.__version__, ptxas)
