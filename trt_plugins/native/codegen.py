"""The generated half of libomnimoe_trt_plugins.so: op contract, constants, kernels, launch wrappers.

Everything the C++ plugins (plugins.cpp) must agree on with the Python side is written here from
its one source: op names, namespace, version and fields from export/schemas.py; workspace and
schedule constants from omnimoe/kernels; one typed launch wrapper per kernel from the kernel's own
parameter list (a changed kernel signature fails the C++ compile instead of launching wrong);
entry names, shared memory, warps and parameter counts from triton's compiler output.
"""
from __future__ import annotations

import json
from pathlib import Path

from export.schemas import DOMAIN, EXPERT_GROUPED_MATMUL, OPSET_VERSION, PRODUCT_KEY_TOPK

from . import aot

HANDWRITTEN = Path(__file__).with_name("plugins.cpp")
MARKER = "// @GENERATED@"


def _launched_kernels():
    """The @triton.jit functions plugins.cpp launches (each gets a typed wrapper)."""
    from omnimoe.kernels import experts, grid_row, router

    return (
        router._product_key_topk_small_kernel,
        router._product_key_topk_kernel,
        experts._token_centric_kernel,
        experts._histogram_kernel,
        experts._scan_blocks_kernel,
        experts._scan_top_kernel,
        experts._scatter_kernel,
        experts._expert_tile_kernel,
        grid_row._gr_line_count_kernel,
        grid_row._gr_histogram_kernel,
        grid_row._gr_scan_blocks_kernel,
        grid_row._gr_scatter_kernel,
        grid_row._gr_blocks_kernel,
        grid_row._gr_panel_kernel,
        grid_row._gr_cast_kernel,
    )


# Kernel sets of an ExpertsVariant row, in plugins.cpp's struct order; the grid-row ones are empty
# ({nullptr, 0}) where the variant cannot take that schedule (gr_cast also for fp32).
_EXPERT_ROLES = ("token", "token_h", "token_many", "token_h_many", "histogram", "scan_blocks", "scan_top", "scatter", "tile")
_GRID_ROLES = ("gr_line_count", "gr_histogram", "gr_scan_blocks", "gr_scatter", "gr_blocks", "gr_panel", "gr_cast")


def _grid_constants() -> list[str]:
    """What plugins.cpp needs to choose the grid-row schedule, size its workspace and launch it."""
    from omnimoe.kernels import experts, grid_row
    from omnimoe.kernels._launch import MANY_TOKENS

    hist, scan, scatter, cast = (grid_row.histogram_config(), grid_row.scan_blocks_config(),
                                 grid_row.scatter_config(), grid_row.cast_config())
    if not (hist["BLOCK"] == scatter["BLOCK"] == grid_row.GR_SORT_BLOCK and scan["BLOCK"] == grid_row.GR_SCAN_BLOCK
            and scatter["SCAN_BLOCK"] == grid_row.GR_SCAN_BLOCK):
        raise RuntimeError("grid_row's sort / scan configs disagree with its workspace sizes")
    from .capi import SCHEDULES

    return [
        *(f"static constexpr int32_t kSchedule{name.capitalize()} = {SCHEDULES.index(name)};"
          for name in ("token", "hybrid", "grid")),
        f"static constexpr int64_t kGridRowMinTokens = {experts.GRID_ROW_MIN_TOKENS};",
        f"static constexpr int64_t kManyTokens = {MANY_TOKENS};",
        f"static constexpr int64_t kGrChunkExperts = {grid_row.GR_BC};",
        f"static constexpr int64_t kGrMaxChunks = {grid_row._MAX_CHUNKS};",
        f"static constexpr int64_t kGrMaxLineBins = {grid_row.GR_MAX_LINE_BINS};",
        f"static constexpr int64_t kGrPrograms = {grid_row.GR_PROGRAMS};",
        f"static constexpr int64_t kGrTileRows = {grid_row._tile_rows()};",
        f"static constexpr int64_t kGrSortBlock = {hist['BLOCK']};",
        f"static constexpr int64_t kGrScanBlock = {scan['BLOCK']};",
        f"static constexpr int64_t kGrCastBlock = {cast['BLOCK']};",
    ]


def _param_kind(name: str) -> str:
    # Every pointer parameter of these kernels is named *_ptr; every other runtime one is an int.
    return "ptr" if name.endswith("_ptr") else "i32"


def _c_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid C string literal for ASCII text


def _wrapper(fn) -> str:
    params = [p.name for p in fn.params if not p.is_constexpr]
    c_type = {"ptr": "CUdeviceptr", "i32": "int32_t"}
    args = ", ".join(f"{c_type[_param_kind(n)]} {n}" for n in params)
    refs = ", ".join(f"&{n}" for n in params)
    return (
        f"static CUresult launch_{fn.__name__}(KernelSet const& kernel, uint32_t gridX, CUstream stream, {args})\n"
        f"{{\n    void* args[] = {{{refs}}};\n"
        f"    return launchKernel(kernel, gridX, stream, args, {len(params)});\n}}\n"
    )


def _blob(data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 48):
        lines.append('    "' + "".join(f"\\x{b:02x}" for b in data[i : i + 48]) + '"')
    return "\n".join(lines) or '    ""'


def _fields(prefix: str, op) -> list[str]:
    kind = {"int": "PluginFieldType::kINT32", "string": "PluginFieldType::kCHAR"}
    out = []
    entries = []
    for a in op.attributes:
        allowed = "nullptr"
        if a.allowed:
            name = f"k{prefix}_{a.name}_allowed"
            out.append(f"static char const* const {name}[] = {{{', '.join(_c_string(v) for v in a.allowed)}}};")
            allowed = name
        entries.append(f"{{{_c_string(a.name)}, {kind[a.kind]}, {allowed}, {len(a.allowed)}}}")
    out.append(f"static FieldDecl const k{prefix}Fields[] = {{{', '.join(entries)}}};")
    out.append(f"static constexpr int32_t kNum{prefix}Fields = {len(op.attributes)};")
    return out


def _variant_summary(library: aot.CompiledLibrary) -> str:
    parts = []
    for variant, _ in library.variants:
        if isinstance(variant, aot.TopKVariant):
            parts.append(f"top-k s={variant.grid_side} K={variant.top_k} {variant.gate}")
        else:
            parts.append(
                f"experts d={variant.hidden_size} N={variant.num_experts} K={variant.top_k} "
                f"{variant.dtype} {variant.activation}"
            )
    return "; ".join(parts) or "no variants"


def info(library: aot.CompiledLibrary) -> dict:
    """What the library holds (embedded as JSON; also written beside the engine by `omnimoe build`)."""
    import dataclasses

    cubin_bytes: dict[str, int] = {}
    seen = set()
    for _, kernels in library.variants:
        for _, images in kernels:
            for image in images:
                if id(image) in seen:
                    continue
                seen.add(id(image))
                key = f"sm_{image.sm}" if image.sm else f"ptx_sm_{aot.PTX_FALLBACK_SM}"
                cubin_bytes[key] = cubin_bytes.get(key, 0) + len(image.data)
    return {
        "sms": list(library.sms),
        "ptx_fallback": {"sm": aot.PTX_FALLBACK_SM, "ptx_version": aot.PTX_VERSION[aot.PTX_FALLBACK_SM] / 10},
        "triton": library.triton_version,
        "ptxas": library.ptxas,
        "variants": [
            {"op": (PRODUCT_KEY_TOPK if isinstance(v, aot.TopKVariant) else EXPERT_GROUPED_MATMUL).op_type,
             **dataclasses.asdict(v)}
            for v, _ in library.variants
        ],
        "kernel_bytes": cubin_bytes,
    }


def render(library: aot.CompiledLibrary) -> str:
    """The complete C++ source of the library (hand-written plugins.cpp + the generated half)."""
    from omnimoe.kernels import experts, grid_row, router
    from omnimoe.kernels._launch import ALIGN

    launched = {fn.__name__ for fn in _launched_kernels()}
    g = ["namespace omnimoe_native", "{", "namespace gen", "{"]
    g.append(f"static constexpr char kPluginNamespace[] = {_c_string(DOMAIN)};")
    g.append(f"static constexpr char kPluginVersion[] = {_c_string(str(OPSET_VERSION))};")
    g.append(f"static constexpr char kTopKOpType[] = {_c_string(PRODUCT_KEY_TOPK.op_type)};")
    g.append(f"static constexpr char kExpertsOpType[] = {_c_string(EXPERT_GROUPED_MATMUL.op_type)};")
    g += _fields("TopK", PRODUCT_KEY_TOPK)
    g += _fields("Experts", EXPERT_GROUPED_MATMUL)
    acts = sorted(experts.ACT_IDS, key=experts.ACT_IDS.get)
    g.append(f"static char const* const kActivationNames[] = {{{', '.join(_c_string(a) for a in acts)}}};")
    g.append(f"static constexpr int32_t kNumActivations = {len(acts)};")
    g.append(f"static char const* const kDtypeNames[] = {{{', '.join(_c_string(d) for d in aot.DTYPES)}}};")
    g += [
        f"static constexpr int64_t kAlign = {ALIGN};",
        f"static constexpr int64_t kSmallKMax = {router.SMALL_K_MAX};",
        f"static constexpr int64_t kTopKWorkspaceRows = {router._WS_ROWS};",
        f"static constexpr int64_t kScanBlock = {experts._SCAN_BLOCK};",
        f"static constexpr int64_t kSortBlock = {experts._SORT_BLOCK};",
        f"static constexpr int64_t kTileExperts = {experts._EC_BE};",
        f"static constexpr int64_t kExpertCentricMinTokens = {experts.EXPERT_CENTRIC_MIN_TOKENS};",
        f"static constexpr double kExpertCentricMinReuse = {float(experts.EXPERT_CENTRIC_MIN_REUSE)!r};",
        *_grid_constants(),
        f"static constexpr int32_t kSms[] = {{{', '.join(map(str, library.sms))}}};",
        f"static constexpr int32_t kNumSms = {len(library.sms)};",
        f"static constexpr int32_t kMaxSm = {max(library.sms)};",
    ]
    for fn in _launched_kernels():
        g.append(_wrapper(fn))

    blobs: dict[int, str] = {}
    sets: dict[tuple, str] = {}
    for _, kernels in library.variants:
        for spec, images in kernels:
            if spec.fn.__name__ not in launched:
                raise RuntimeError(f"{spec.fn.__name__} has no launch wrapper")
            for name, kind in spec.runtime_params():
                if kind != _param_kind(name):
                    raise RuntimeError(f"{spec.fn.__name__}.{name}: {kind} but named like a {_param_kind(name)}")
            key = tuple(id(i) for i in images)
            if key in sets:
                continue
            rows = []
            for image in images:
                if id(image) not in blobs:
                    blobs[id(image)] = f"kBlob{len(blobs)}"
                    g.append(f"static unsigned char const {blobs[id(image)]}[] =\n{_blob(image.data)};")
                rows.append(
                    f"{{{image.sm}, {_c_string(image.name)}, {blobs[id(image)]}, {len(image.data)}, "
                    f"{image.shared}, {image.num_warps}, {image.num_params}}}"
                )
            sets[key] = f"kImages{len(sets)}"
            g.append(f"static KernelImage const {sets[key]}[] = {{\n    " + ",\n    ".join(rows) + "};")

    def kset(images) -> str:
        if images is None:
            return "{nullptr, 0}"
        name = sets[tuple(id(i) for i in images)]
        return f"{{{name}, {len(images)}}}"

    topk_rows, expert_rows = [], []
    for variant, kernels in library.variants:
        by_role = {spec.role: images for spec, images in kernels}
        if isinstance(variant, aot.TopKVariant):
            softmax = int(variant.gate == "softmax")
            topk_rows.append(f"{{{variant.grid_side}, {variant.top_k}, {softmax}, {kset(by_role['topk'])}, "
                             f"{kset(by_role['topk_many'])}}}")
        else:
            sets_c = ", ".join(kset(by_role[r]) for r in _EXPERT_ROLES)
            fp32 = variant.dtype == "fp32"
            has_grid = "gr_panel" in by_role
            if has_grid != aot.grid_reachable(variant.top_k, variant.num_experts):
                raise RuntimeError(f"{variant}: grid-row kernels compiled iff the schedule is reachable")
            # BM of the panel kernel (and of the work list's blocks): sizes the panel kernel's grid.
            gr_bm = grid_row.panel_config(variant.num_experts, fp32, 0)["BM"] if has_grid else 0
            grid_c = ", ".join(kset(by_role.get(r)) for r in _GRID_ROLES)
            expert_rows.append(
                f"{{{variant.hidden_size}, {variant.num_experts}, {variant.top_k}, {aot.DTYPES.index(variant.dtype)}, "
                f"{experts.ACT_IDS[variant.activation]}, {sets_c}, {gr_bm}, {grid_c}}}"
            )
    # Zero-length arrays are not C++: keep one unused row when a library has no variant of an op.
    g.append(f"static TopKVariant const kTopKVariants[] = {{{', '.join(topk_rows) or '{}'}}};")
    g.append(f"static constexpr int32_t kNumTopKVariants = {len(topk_rows)};")
    g.append(f"static ExpertsVariant const kExpertsVariants[] = {{{', '.join(expert_rows) or '{}'}}};")
    g.append(f"static constexpr int32_t kNumExpertsVariants = {len(expert_rows)};")
    g.append(f"static char const kVariantSummary[] = {_c_string(_variant_summary(library))};")
    g.append(f"static char const kInfoJson[] = {_c_string(json.dumps(info(library), sort_keys=True))};")
    g += ["} // namespace gen", "} // namespace omnimoe_native"]

    handwritten = HANDWRITTEN.read_text()
    if handwritten.count(MARKER) != 1:
        raise RuntimeError(f"{HANDWRITTEN.name} must hold exactly one {MARKER} line")
    header = "// Generated by trt_plugins/native/codegen.py from plugins.cpp + the model's kernels. Do not edit.\n"
    return header + handwritten.replace(MARKER, "\n".join(g))
