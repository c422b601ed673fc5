// Native (Python-free) TensorRT IPluginV3 plugins for the two omnimoe ops (SPEC §3, §4).
//
// This file is the hand-written half of libomnimoe_trt_plugins.so. `trt_plugins/native/codegen.py`
// inserts the generated half at the @GENERATED@ line: the op contract from export/schemas.py
// (names, namespace, version, fields), the launch constants of omnimoe/kernels, the ahead-of-time
// compiled Triton cubins/PTX of the model's kernel variants and one typed launch wrapper per
// kernel (from the kernel's own parameter list). Nothing here restates the math: enqueue carves the
// workspace and launches those kernels in the order omnimoe/kernels' Python launchers do.
//
// The library links neither libnvinfer nor libcuda: TensorRT's plugin interfaces are header-only
// and the CUDA driver is reached with dlopen("libcuda.so.1"). It exports getCreators (loaded with
// IPluginRegistry::loadLibrary / trtexec --dynamicPlugins) and setLoggerFinder, plus a small C ABI
// (omnimoe_native_*) that the GPU tests call with raw pointers: the launch functions enqueue uses
// and a TensorRT-free harness that drives the plugins' own enqueue.
#include <NvInferRuntime.h>
#include <cuda.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

using namespace nvinfer1;

namespace omnimoe_native
{

// ------------------------------------------------------------------------------------------------
// Kernel images and variants (filled in by the generated half)
// ------------------------------------------------------------------------------------------------
struct KernelImage
{
    int32_t sm; // 0: the PTX fallback
    char const* name;
    unsigned char const* data;
    size_t size;
    uint32_t shared;
    uint32_t numWarps;
    uint32_t numParams; // entry parameters, triton's scratch pointers included
};

struct KernelSet
{
    KernelImage const* images;
    int32_t count;
};

struct FieldDecl
{
    char const* name;
    PluginFieldType type;
    char const* const* allowed;
    int32_t numAllowed;
};

struct TopKVariant
{
    int32_t s, k, softmax;
    KernelSet topk, topkMany; // topkMany: from kManyTokens tokens on (router.topk_kernel_config)
};

struct ExpertsVariant
{
    int32_t d, n, k, dtype, act;
    // tokenMany / tokenHMany: the token-centric launches from kManyTokens tokens on.
    KernelSet token, tokenH, tokenMany, tokenHMany, histogram, scanBlocks, scanTop, scatter, tile;
    // Grid-row schedule (grid_row.py): the panel kernel's BM and the kernels, empty ({nullptr, 0})
    // where "auto" never picks it for this (K, N); grCast is empty for fp32 too.
    int32_t grBm;
    KernelSet grLineCount, grHistogram, grScanBlocks, grScatter, grBlocks, grPanel, grCast;
};

// ------------------------------------------------------------------------------------------------
// Errors: one message, to TensorRT's logger when it gave us one, else stderr
// ------------------------------------------------------------------------------------------------
static ILoggerFinder* gLoggerFinder = nullptr;
// The last message, for callers without a TensorRT logger (omnimoe build reads it through the C ABI).
static char gLastError[1024];

static void report(char const* fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = std::snprintf(gLastError, sizeof(gLastError), "omnimoe native plugins: ");
    std::vsnprintf(gLastError + n, sizeof(gLastError) - n, fmt, ap);
    va_end(ap);
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    char const* quiet = std::getenv("OMNIMOE_NATIVE_QUIET");
    if (logger)
        logger->log(ILogger::Severity::kERROR, gLastError);
    else if (!quiet || std::strcmp(quiet, "1") != 0)
        std::fprintf(stderr, "%s\n", gLastError);
}

// ------------------------------------------------------------------------------------------------
// CUDA driver, reached through dlopen (the library does not link libcuda)
// ------------------------------------------------------------------------------------------------
struct Driver
{
    CUresult (*ctxGetCurrent)(CUcontext*);
    CUresult (*ctxGetDevice)(CUdevice*);
    CUresult (*deviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
    CUresult (*moduleLoadData)(CUmodule*, void const*);
    CUresult (*moduleGetFunction)(CUfunction*, CUmodule, char const*);
    CUresult (*funcGetAttribute)(int*, CUfunction_attribute, CUfunction);
    CUresult (*funcSetAttribute)(CUfunction, CUfunction_attribute, int);
    CUresult (*launchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
        CUstream, void**, void**);
    CUresult (*memsetD32Async)(CUdeviceptr, unsigned, size_t, CUstream);
    CUresult (*getErrorString)(CUresult, char const**);
    bool ok = false;
};

static Driver const& driver()
{
    static Driver d = [] {
        Driver r{};
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib)
            return r;
        bool ok = true;
        auto sym = [&](char const* name) {
            void* p = dlsym(lib, name);
            ok = ok && p != nullptr;
            return p;
        };
        r.ctxGetCurrent = reinterpret_cast<decltype(r.ctxGetCurrent)>(sym("cuCtxGetCurrent"));
        r.ctxGetDevice = reinterpret_cast<decltype(r.ctxGetDevice)>(sym("cuCtxGetDevice"));
        r.deviceGetAttribute = reinterpret_cast<decltype(r.deviceGetAttribute)>(sym("cuDeviceGetAttribute"));
        r.moduleLoadData = reinterpret_cast<decltype(r.moduleLoadData)>(sym("cuModuleLoadData"));
        r.moduleGetFunction = reinterpret_cast<decltype(r.moduleGetFunction)>(sym("cuModuleGetFunction"));
        r.funcGetAttribute = reinterpret_cast<decltype(r.funcGetAttribute)>(sym("cuFuncGetAttribute"));
        r.funcSetAttribute = reinterpret_cast<decltype(r.funcSetAttribute)>(sym("cuFuncSetAttribute"));
        r.launchKernel = reinterpret_cast<decltype(r.launchKernel)>(sym("cuLaunchKernel"));
        r.memsetD32Async = reinterpret_cast<decltype(r.memsetD32Async)>(sym("cuMemsetD32Async"));
        r.getErrorString = reinterpret_cast<decltype(r.getErrorString)>(sym("cuGetErrorString"));
        r.ok = ok;
        return r;
    }();
    return d;
}

static char const* errorName(CUresult status)
{
    char const* text = nullptr;
    if (driver().getErrorString)
        driver().getErrorString(status, &text);
    return text ? text : "unknown CUDA error";
}

// Compute capability of the current context's device (major*10 + minor), or -1.
static int32_t currentSm(CUcontext* ctxOut = nullptr)
{
    Driver const& d = driver();
    if (!d.ok)
    {
        report("cannot load the CUDA driver (libcuda.so.1)");
        return -1;
    }
    CUcontext ctx = nullptr;
    CUdevice dev = 0;
    if (d.ctxGetCurrent(&ctx) != CUDA_SUCCESS || ctx == nullptr || d.ctxGetDevice(&dev) != CUDA_SUCCESS)
    {
        report("no current CUDA context");
        return -1;
    }
    int major = 0, minor = 0;
    d.deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    d.deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (ctxOut)
        *ctxOut = ctx;
    return major * 10 + minor;
}

// Defined below; the generated launch wrappers call it.
static CUresult launchKernel(KernelSet const& set, uint32_t gridX, CUstream stream, void** args, int32_t numArgs);

} // namespace omnimoe_native

// @GENERATED@

namespace omnimoe_native
{

// ------------------------------------------------------------------------------------------------
// Which image runs on this GPU: its own cubin, else PTX when the GPU is newer than every SM built
// ------------------------------------------------------------------------------------------------
static KernelImage const* pickImage(KernelSet const& set, int32_t sm)
{
    KernelImage const* ptx = nullptr;
    for (int32_t i = 0; i < set.count; ++i)
    {
        if (set.images[i].sm == sm)
            return &set.images[i];
        if (set.images[i].sm == 0)
            ptx = &set.images[i];
    }
    return sm > gen::kMaxSm ? ptx : nullptr;
}

static std::string smList()
{
    std::string out;
    for (int32_t i = 0; i < gen::kNumSms; ++i)
        out += (i ? ", sm_" : "sm_") + std::to_string(gen::kSms[i]);
    return out + " (PTX for GPUs newer than sm_" + std::to_string(gen::kMaxSm) + ")";
}

static bool smSupported(int32_t sm)
{
    if (sm < 0)
        return false;
    for (int32_t i = 0; i < gen::kNumSms; ++i)
        if (gen::kSms[i] == sm)
            return true;
    return sm > gen::kMaxSm;
}

struct LoadedFunction
{
    CUfunction fn;
    KernelImage const* image;
    bool fits; // its shared memory fits this GPU (the driver accepted the opt-in)
};

static std::mutex gModulesMutex;
static std::map<std::pair<CUcontext, KernelSet const*>, LoadedFunction> gFunctions;

// Loads `set` for the current context once; afterwards a lookup (no allocation, no sync).
static LoadedFunction const* resolve(KernelSet const& set)
{
    CUcontext ctx = nullptr;
    int32_t sm = currentSm(&ctx);
    if (sm < 0)
        return nullptr;
    std::lock_guard<std::mutex> lock(gModulesMutex);
    auto key = std::make_pair(ctx, &set);
    auto it = gFunctions.find(key);
    if (it != gFunctions.end())
        return &it->second;
    KernelImage const* image = pickImage(set, sm);
    if (!image)
    {
        report("this GPU is sm_%d; the library has kernels for %s", sm, smList().c_str());
        return nullptr;
    }
    Driver const& d = driver();
    CUmodule module = nullptr;
    CUfunction fn = nullptr;
    CUresult status = d.moduleLoadData(&module, image->data);
    if (status == CUDA_SUCCESS)
        status = d.moduleGetFunction(&fn, module, image->name);
    if (status != CUDA_SUCCESS)
    {
        report("cannot load kernel %s for sm_%d (%s): %s", image->name, sm, image->sm ? "cubin" : "PTX",
            errorName(status));
        return nullptr;
    }
    bool fits = true;
    if (image->shared > 49152)
    {
        // As triton's own launcher does: opt in to more than 48 KiB of dynamic shared memory. A GPU
        // that allows less (sm_86/89/120 allow ~99 KiB) refuses; the caller picks another schedule.
        int staticShared = 0;
        d.funcGetAttribute(&staticShared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn);
        fits = d.funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(image->shared) - staticShared)
            == CUDA_SUCCESS;
    }
    return &gFunctions.emplace(key, LoadedFunction{fn, image, fits}).first->second;
}

// Called by the generated launch wrappers: args in the kernel's parameter order; triton's scratch
// pointers (when the entry has them) are passed as null, their sizes having been checked to be 0.
static CUresult launchKernel(KernelSet const& set, uint32_t gridX, CUstream stream, void** args, int32_t numArgs)
{
    LoadedFunction const* f = resolve(set);
    if (!f)
        return CUDA_ERROR_NO_BINARY_FOR_GPU;
    static CUdeviceptr const kNoScratch = 0;
    void* params[64];
    int32_t total = int32_t(f->image->numParams);
    if (total > 64 || total < numArgs)
        return CUDA_ERROR_INVALID_VALUE;
    for (int32_t i = 0; i < total; ++i)
        params[i] = i < numArgs ? args[i] : const_cast<CUdeviceptr*>(&kNoScratch);
    if (gridX == 0)
        return CUDA_SUCCESS;
    return driver().launchKernel(
        f->fn, gridX, 1, 1, 32 * f->image->numWarps, 1, 1, f->image->shared, stream, params, nullptr);
}

// ------------------------------------------------------------------------------------------------
// Workspaces and launches: the same layout and order as omnimoe/kernels (router.py, experts.py)
// ------------------------------------------------------------------------------------------------
static int64_t alignUp(int64_t n)
{
    return (n + gen::kAlign - 1) / gen::kAlign * gen::kAlign;
}

static int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

static int64_t topkWorkspaceBytes(int64_t maxTokens, int64_t s, int64_t k)
{
    if (k <= gen::kSmallKMax)
        return 0;
    return maxTokens * gen::kTopKWorkspaceRows * std::min(k, s) * 4;
}

// Sorted-pairs (hybrid) schedule: experts.pairs_workspace_bytes.
static int64_t pairsWorkspaceBytes(int64_t maxTokens, int64_t k, int64_t n, int64_t d)
{
    int64_t tk = maxTokens * k, n1 = n + 1, nb = cdiv(n1, gen::kScanBlock);
    return alignUp(n1 * 4) * 2 + alignUp(nb * 4) + alignUp(tk * 4) * 2 + alignUp(maxTokens * d * 4);
}

// Grid-line schedule geometry (grid_row.grid_side / panel_geometry): N = s*s experts in s rows and
// s columns, each line in P panels of PWR experts, NCH chunks of kGrChunkExperts per panel.
struct GridGeometry
{
    int64_t s, p, pwr, nch;
};

static bool gridGeometry(int64_t n, GridGeometry& g)
{
    if (n <= 0)
        return false;
    int64_t s = int64_t(std::sqrt(double(n)));
    while (s > 0 && s * s > n)
        --s;
    while ((s + 1) * (s + 1) <= n)
        ++s;
    if (s <= 0 || s * s != n)
        return false;
    g.s = s;
    g.p = std::max<int64_t>(1, cdiv(s, gen::kGrMaxChunks * gen::kGrChunkExperts));
    g.pwr = cdiv(s, g.p);
    g.nch = cdiv(g.pwr, gen::kGrChunkExperts);
    return true;
}

// grid_row.max_tokens: the most tokens whose keys (2*s*P*T + 1) and pairs (T*K) fit int32; 0 if N
// is no square or has too many panels for the line-count histograms.
static int64_t gridMaxTokens(int64_t k, int64_t n)
{
    GridGeometry g;
    if (!gridGeometry(n, g) || k <= 0 || g.s * g.p + 1 > gen::kGrMaxLineBins)
        return 0;
    return std::min((int64_t(INT32_MAX) - 1) / (2 * g.s * g.p), int64_t(INT32_MAX) / k);
}

// experts.use_grid_row
static bool useGridRow(int64_t t, int64_t k, int64_t n)
{
    return t >= gen::kGridRowMinTokens && double(t * k) >= gen::kExpertCentricMinReuse * double(n) && t > 0
        && t <= gridMaxTokens(k, n);
}

// experts.use_expert_centric
static bool useExpertCentric(int64_t t, int64_t k, int64_t n)
{
    return t >= gen::kExpertCentricMinTokens && double(t * k) >= gen::kExpertCentricMinReuse * double(n);
}

// What expert_grouped_matmul_triton(schedule="auto") runs (the hybrid is EXPERT_CENTRIC_SCHEDULE,
// which aot.py checks), as the C ABI's schedule code (capi.SCHEDULES).
static int32_t expertsSchedule(int64_t t, int64_t k, int64_t n)
{
    if (useGridRow(t, k, n))
        return gen::kScheduleGrid;
    return useExpertCentric(t, k, n) ? gen::kScheduleHybrid : gen::kScheduleToken;
}

// grid_row._sizes: buffer sizes of T tokens; nprog (the panel kernel's grid) for blocks of bm slots.
struct GridSizes
{
    int64_t npanels, nkey1, nb, tk, nslots, nprog, gw;
};

static GridSizes gridSizes(int64_t t, int64_t k, GridGeometry const& g, int64_t bm)
{
    GridSizes z;
    z.npanels = 2 * g.s * g.p; // row panels, then column panels (grid_row.num_panels)
    z.nkey1 = z.npanels * t + 1;
    z.nb = cdiv(z.nkey1, gen::kGrScanBlock);
    z.tk = t * k;
    z.nslots = std::min(z.tk, z.npanels * t);
    int64_t workUpper = std::min(z.npanels * cdiv(t, bm), cdiv(z.nslots, bm) + z.npanels);
    z.nprog = std::max<int64_t>(1, std::min<int64_t>(gen::kGrPrograms, workUpper));
    z.gw = g.nch * gen::kGrChunkExperts;
    return z;
}

// grid_row.workspace_bytes (0 when N is not a perfect square).
static int64_t gridWorkspaceBytes(int64_t maxTokens, int64_t k, int64_t n, int64_t d)
{
    GridGeometry g;
    if (!gridGeometry(n, g) || maxTokens <= 0)
        return 0;
    GridSizes z = gridSizes(maxTokens, k, g, 1);
    return alignUp(z.nkey1 * 4) * 4 + alignUp(z.nb * 4) * 2 + alignUp(z.tk * 4) * 4 + alignUp(z.nslots * 4) * 2
        + alignUp((z.npanels + 1) * 4) + alignUp(gen::kGrPrograms * gen::kGrTileRows * z.gw * 4) * 2
        + alignUp(maxTokens * d * 4);
}

// experts.expert_workspace_bytes: the larger of the sorted-pairs schedule's and, where useGridRow
// holds for some T <= maxTokens (then it holds at the largest such T), the grid-row schedule's.
static int64_t expertsWorkspaceBytes(int64_t maxTokens, int64_t k, int64_t n, int64_t d)
{
    int64_t pairs = pairsWorkspaceBytes(maxTokens, k, n, d);
    int64_t tGrid = std::min(maxTokens, gridMaxTokens(k, n));
    if (!(tGrid > 0 && useGridRow(tGrid, k, n)))
        return pairs;
    return std::max(pairs, gridWorkspaceBytes(tGrid, k, n, d));
}

static int32_t bitLength(int64_t v)
{
    int32_t bits = 0;
    for (; v > 0; v >>= 1)
        ++bits;
    return bits;
}

// The schedule the last experts launch of this process ran (omnimoe_native_experts_last_schedule).
static std::atomic<int32_t> gLastExpertsSchedule{-1};

static TopKVariant const* findTopK(int32_t s, int32_t k, int32_t softmax)
{
    for (int32_t i = 0; i < gen::kNumTopKVariants; ++i)
    {
        TopKVariant const& v = gen::kTopKVariants[i];
        if (v.s == s && v.k == k && v.softmax == softmax)
            return &v;
    }
    return nullptr;
}

static ExpertsVariant const* findExperts(int32_t d, int32_t n, int32_t k, int32_t dtype, int32_t act)
{
    for (int32_t i = 0; i < gen::kNumExpertsVariants; ++i)
    {
        ExpertsVariant const& v = gen::kExpertsVariants[i];
        if (v.d == d && v.n == n && v.k == k && v.dtype == dtype && v.act == act)
            return &v;
    }
    return nullptr;
}

static bool aligned(void const* p)
{
    return (reinterpret_cast<uintptr_t>(p) % 16) == 0;
}

static int32_t checkAligned(char const* op, char const* const* names, void const* const* ptrs, int32_t n)
{
    for (int32_t i = 0; i < n; ++i)
        if (!aligned(ptrs[i]))
        {
            report("%s: %s at %p is not 16-byte aligned (the kernels are compiled for 16-byte aligned tensors)",
                op, names[i], ptrs[i]);
            return 1;
        }
    return 0;
}

// Loads every kernel an experts variant may launch (the grid-row ones where it has them).
static bool resolveExperts(ExpertsVariant const& v)
{
    for (KernelSet const* set : {&v.token, &v.tokenH, &v.tokenMany, &v.tokenHMany, &v.histogram, &v.scanBlocks,
             &v.scanTop, &v.scatter, &v.tile,
             &v.grLineCount, &v.grHistogram, &v.grScanBlocks, &v.grScatter, &v.grBlocks, &v.grPanel, &v.grCast})
        if (set->count > 0 && !resolve(*set))
            return false;
    return true;
}

static int32_t launchFailed(char const* op, CUresult status)
{
    if (status == CUDA_SUCCESS)
        return 0;
    if (status != CUDA_ERROR_NO_BINARY_FOR_GPU) // resolve() already said why
        report("%s: kernel launch failed: %s", op, errorName(status));
    return 2;
}

} // namespace omnimoe_native

using namespace omnimoe_native;

extern "C" {

// log_probs_x/y [T, s] fp32 -> gates [T, K] fp32, indices [T, K] int32. 0 on success.
int32_t omnimoe_native_topk_launch(void const* logProbsX, void const* logProbsY, void* gates, void* indices,
    void* workspace, int64_t workspaceBytes, int64_t T, int32_t s, int32_t k, int32_t softmax, CUstream stream)
{
    char const* op = gen::kTopKOpType;
    if (T <= 0)
        return T < 0 ? 3 : 0;
    TopKVariant const* v = findTopK(s, k, softmax);
    if (!v)
    {
        report("%s: no kernel compiled for s=%d, top_k=%d, gate=%s; this library has %s", op, s, k,
            softmax ? "softmax" : "product", gen::kVariantSummary);
        return 3;
    }
    char const* names[] = {"log_probs_x", "log_probs_y", "gates", "indices", "workspace"};
    void const* ptrs[] = {logProbsX, logProbsY, gates, indices, workspace};
    int64_t need = topkWorkspaceBytes(T, s, k);
    if (checkAligned(op, names, ptrs, need > 0 ? 5 : 4))
        return 1;
    if (need > workspaceBytes)
    {
        report("%s: workspace of %lld bytes, needs %lld", op, (long long) workspaceBytes, (long long) need);
        return 1;
    }
    auto p = [](void const* q) { return CUdeviceptr(reinterpret_cast<uintptr_t>(q)); };
    int32_t ka = std::min(k, s);
    CUresult status = k <= gen::kSmallKMax
        ? gen::launch__product_key_topk_small_kernel(T >= gen::kManyTokens ? v->topkMany : v->topk, uint32_t(T), stream,
            p(logProbsX), p(logProbsY), p(gates), p(indices), s, k, ka, s, s)
        : gen::launch__product_key_topk_kernel(v->topk, uint32_t(T), stream, p(logProbsX), p(logProbsY), p(gates),
            p(indices), p(workspace), p(workspace), s, k, ka, s, s);
    return launchFailed(op, status);
}

// x [T, d], up/down [N, d] (dtype: 0 fp32, 1 fp16, 2 bf16), gates [T, K] fp32, indices [T, K] int32
// -> y [T, d]. 0 on success.
int32_t omnimoe_native_experts_launch(void const* x, void const* up, void const* down, void const* gates,
    void const* indices, void* y, void* workspace, int64_t workspaceBytes, int64_t T, int32_t d, int32_t n,
    int32_t k, int32_t dtype, int32_t act, CUstream stream)
{
    char const* op = gen::kExpertsOpType;
    if (T <= 0)
        return T < 0 ? 3 : 0;
    ExpertsVariant const* v = findExperts(d, n, k, dtype, act);
    if (!v)
    {
        report("%s: no kernel compiled for d=%d, N=%d, top_k=%d, dtype=%s, activation=%s; this library has %s",
            op, d, n, k, (dtype >= 0 && dtype < 3) ? gen::kDtypeNames[dtype] : "?",
            (act >= 0 && act < gen::kNumActivations) ? gen::kActivationNames[act] : "?", gen::kVariantSummary);
        return 3;
    }
    int32_t schedule = expertsSchedule(T, k, n);
    if (schedule == gen::kScheduleGrid && v->grPanel.count > 0)
    {
        // As grid_row.fits_device: where the panel kernel's shared memory does not fit, the hybrid.
        LoadedFunction const* panel = resolve(v->grPanel);
        if (panel && !panel->fits)
            schedule = gen::kScheduleHybrid;
    }
    char const* names[] = {"x", "up", "down", "gates", "indices", "y", "workspace"};
    void const* ptrs[] = {x, up, down, gates, indices, y, workspace};
    if (checkAligned(op, names, ptrs, schedule != gen::kScheduleToken ? 7 : 6))
        return 1;
    auto p = [](void const* q) { return CUdeviceptr(reinterpret_cast<uintptr_t>(q)); };
    if (schedule == gen::kScheduleToken)
    {
        gLastExpertsSchedule.store(schedule);
        return launchFailed(op, gen::launch__token_centric_kernel(T >= gen::kManyTokens ? v->tokenMany : v->token,
                                    uint32_t(T), stream, p(x), p(up), p(down), p(gates),
                                    p(indices), p(y), d, k, n));
    }
    if (schedule == gen::kScheduleGrid && v->grPanel.count == 0)
    {
        report("%s: the grid-row schedule applies to T=%lld, top_k=%d, N=%d but the library has no grid-row kernels "
               "for this variant (rebuild it with `omnimoe build --plugins native`)",
            op, (long long) T, k, n);
        return 3;
    }

    int64_t need = schedule == gen::kScheduleGrid ? gridWorkspaceBytes(T, k, n, d) : pairsWorkspaceBytes(T, k, n, d);
    if (need > workspaceBytes)
    {
        report("%s: workspace of %lld bytes, needs %lld", op, (long long) workspaceBytes, (long long) need);
        return 1;
    }
    char* base = static_cast<char*>(workspace);
    int64_t pos = 0;
    // Carver.take of 4-byte elements: each buffer starts at the next kAlign boundary.
    auto take = [&](int64_t count) {
        char* at = base + pos;
        pos += alignUp(count * 4);
        return p(at);
    };
    gLastExpertsSchedule.store(schedule);
    if (schedule == gen::kScheduleGrid)
    {
        // Grid-line schedule (grid_row.launch): each pair's panel (its row or column, by the
        // token's line counts), counting sort of the pairs by (panel, token), the work list of
        // (panel, block of BM slots), the persistent panel kernel with fp32 atomics into y32 (y
        // itself for fp32), then the cast to y's dtype.
        GridGeometry g;
        gridGeometry(n, g);
        GridSizes z = gridSizes(T, k, g, v->grBm);
        bool fp32 = dtype == 0;
        int32_t s = int32_t(g.s), P = int32_t(g.p), pwr = int32_t(g.pwr), np = int32_t(z.npanels);
        int32_t t32 = int32_t(T), tk = int32_t(z.tk), nkey1 = int32_t(z.nkey1), nb = int32_t(z.nb);
        CUdeviceptr lcounts = take(z.nkey1), counts = take(z.nkey1), offsets = take(z.nkey1), slotoff = take(z.nkey1);
        CUdeviceptr bsums = take(z.nb), bslots = take(z.nb);
        CUdeviceptr rank = take(z.tk), scol = take(z.tk), sgate = take(z.tk), sslot = take(z.tk);
        CUdeviceptr slotTok = take(z.nslots), slotPair = take(z.nslots);
        CUdeviceptr blkoff = take(z.npanels + 1);
        CUdeviceptr gscr = take(gen::kGrPrograms * gen::kGrTileRows * z.gw);
        CUdeviceptr hscr = take(gen::kGrPrograms * gen::kGrTileRows * z.gw);
        CUdeviceptr y32 = fp32 ? p(y) : take(T * int64_t(d));
        CUresult status = driver().memsetD32Async(counts, 0, size_t(z.nkey1), stream);
        if (status == CUDA_SUCCESS)
            status = driver().memsetD32Async(y32, 0, size_t(T * int64_t(d)), stream); // 0x0 is +0.0f
        uint32_t sortGrid = uint32_t(cdiv(z.tk, gen::kGrSortBlock));
        if (status == CUDA_SUCCESS)
            status = gen::launch__gr_line_count_kernel(v->grLineCount, uint32_t(T), stream, p(indices), lcounts, k, n, s, P,
                pwr, t32); // one program per token, every count written
        if (status == CUDA_SUCCESS)
            status = gen::launch__gr_histogram_kernel(
                v->grHistogram, sortGrid, stream, p(indices), lcounts, counts, rank, tk, k, n, s, P, pwr, t32);
        if (status == CUDA_SUCCESS)
            status = gen::launch__gr_scan_blocks_kernel(
                v->grScanBlocks, uint32_t(z.nb), stream, counts, offsets, slotoff, bsums, bslots, nkey1);
        if (status == CUDA_SUCCESS)
            status = gen::launch__scan_top_kernel(v->scanTop, 1, stream, bsums, nb);
        if (status == CUDA_SUCCESS)
            status = gen::launch__scan_top_kernel(v->scanTop, 1, stream, bslots, nb);
        if (status == CUDA_SUCCESS)
            status = gen::launch__gr_scatter_kernel(v->grScatter, sortGrid, stream, p(indices), p(gates), lcounts, rank,
                offsets, slotoff, bsums, bslots, scol, sgate, sslot, slotTok, slotPair, tk, k, n, s, P, pwr, t32);
        if (status == CUDA_SUCCESS)
            status = gen::launch__gr_blocks_kernel(v->grBlocks, 1, stream, slotoff, bslots, blkoff, np, t32);
        if (status == CUDA_SUCCESS)
            status = gen::launch__gr_panel_kernel(v->grPanel, uint32_t(z.nprog), stream, p(x), p(up), p(down), scol,
                sgate, sslot, slotTok, slotPair, offsets, slotoff, bsums, bslots, blkoff, gscr, hscr, y32,
                sgate, scol, scol, counts, scol, scol, // the rule-driven slots' arguments: never read (RULE=False)
                d, s, P, pwr, np, nkey1 - 1, t32, std::max(1, bitLength(z.npanels)), 0);
        if (status == CUDA_SUCCESS && !fp32)
            status = gen::launch__gr_cast_kernel(v->grCast, uint32_t(cdiv(T * int64_t(d), gen::kGrCastBlock)), stream,
                y32, p(y), int32_t(T * int64_t(d)));
        return launchFailed(op, status);
    }
    // Hybrid schedule (experts.py): counting sort of the T*K pairs by expert, tensor-core tiles
    // computing act(<up, x>) * gate per pair, then a token-centric sum of the down rows.
    int64_t tk = T * k, n1 = int64_t(n) + 1, nb = cdiv(n1, gen::kScanBlock);
    CUdeviceptr counts = take(n1), offsets = take(n1), blockSums = take(nb), rank = take(tk), sorted = take(tk);
    CUresult status = driver().memsetD32Async(counts, 0, size_t(n1), stream);
    uint32_t sortGrid = uint32_t(cdiv(tk, gen::kSortBlock));
    if (status == CUDA_SUCCESS)
        status = gen::launch__histogram_kernel(v->histogram, sortGrid, stream, p(indices), counts, rank, int32_t(tk), n);
    if (status == CUDA_SUCCESS)
        status = gen::launch__scan_blocks_kernel(v->scanBlocks, uint32_t(nb), stream, counts, offsets, blockSums, int32_t(n1));
    if (status == CUDA_SUCCESS)
        status = gen::launch__scan_top_kernel(v->scanTop, 1, stream, blockSums, int32_t(nb));
    if (status == CUDA_SUCCESS)
        status = gen::launch__scatter_kernel(
            v->scatter, sortGrid, stream, p(indices), rank, offsets, blockSums, sorted, int32_t(tk), n);
    // rank is dead after the scatter: it holds the per-pair act(<up, x>) * gate (fp32) from here on.
    if (status == CUDA_SUCCESS)
        status = gen::launch__expert_tile_kernel(v->tile, uint32_t(cdiv(n, gen::kTileExperts)), stream, p(x), p(up), p(down),
            p(gates), p(indices), sorted, offsets, blockSums, rank, d, k, n);
    if (status == CUDA_SUCCESS)
        status = gen::launch__token_centric_kernel(
            T >= gen::kManyTokens ? v->tokenHMany : v->tokenH, uint32_t(T), stream, p(x), p(up), p(down), rank,
            p(indices), p(y), d, k, n);
    return launchFailed(op, status);
}

int64_t omnimoe_native_topk_workspace_bytes(int64_t maxTokens, int32_t s, int32_t k)
{
    return topkWorkspaceBytes(maxTokens, s, k);
}

int64_t omnimoe_native_experts_workspace_bytes(int64_t maxTokens, int32_t k, int32_t n, int32_t d)
{
    return expertsWorkspaceBytes(maxTokens, k, n, d);
}

// The schedule omnimoe_native_experts_launch runs for T tokens (0 token-centric, 1 hybrid, 2 grid-row).
int32_t omnimoe_native_experts_schedule(int64_t T, int32_t k, int32_t n)
{
    return expertsSchedule(T, k, n);
}

// The schedule the last experts launch of this process ran (-1 before any).
int32_t omnimoe_native_experts_last_schedule()
{
    return gLastExpertsSchedule.load();
}

char const* omnimoe_native_last_error()
{
    return gLastError;
}

// Forgets the last message, so a caller can tell whether a step of its own produced one.
void omnimoe_native_clear_error()
{
    gLastError[0] = '\0';
}

// JSON: SMs, variants, tool versions (what `omnimoe inspect` and the tests read).
char const* omnimoe_native_info()
{
    return gen::kInfoJson;
}

// Loads every kernel of the library for the current context (before CUDA-graph capture). 0 on success.
int32_t omnimoe_native_prepare()
{
    for (int32_t i = 0; i < gen::kNumTopKVariants; ++i)
        if (!resolve(gen::kTopKVariants[i].topk) || !resolve(gen::kTopKVariants[i].topkMany))
            return 1;
    for (int32_t i = 0; i < gen::kNumExpertsVariants; ++i)
        if (!resolveExperts(gen::kExpertsVariants[i]))
            return 1;
    return 0;
}

} // extern "C"

// ------------------------------------------------------------------------------------------------
// The IPluginV3 plugins and their creators
// ------------------------------------------------------------------------------------------------
namespace omnimoe_native
{

static int32_t dtypeCode(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return 0;
    case DataType::kHALF: return 1;
    case DataType::kBF16: return 2;
    default: return -1;
    }
}

static int32_t indexOf(char const* const* names, int32_t count, char const* value)
{
    for (int32_t i = 0; i < count; ++i)
        if (std::strcmp(names[i], value) == 0)
            return i;
    return -1;
}

// Fields the ONNX parser passes: INT as INT32, STRING as CHAR (length with or without the NUL).
struct FieldValues
{
    int32_t ints[8];
    std::string strings[8];
};

static bool parseFields(char const* op, FieldDecl const* decls, int32_t numDecls, PluginFieldCollection const* fc,
    FieldValues& out)
{
    for (int32_t i = 0; i < numDecls; ++i)
    {
        FieldDecl const& decl = decls[i];
        PluginField const* found = nullptr;
        for (int32_t j = 0; fc && j < fc->nbFields; ++j)
            if (fc->fields[j].name && std::strcmp(fc->fields[j].name, decl.name) == 0)
                found = &fc->fields[j];
        if (!found || !found->data)
        {
            report("%s: missing attribute '%s'", op, decl.name);
            return false;
        }
        if (found->type != decl.type)
        {
            report("%s: attribute '%s' has field type %d, expected %d", op, decl.name, int(found->type),
                int(decl.type));
            return false;
        }
        if (decl.type == PluginFieldType::kINT32)
        {
            if (found->length != 1)
            {
                report("%s: attribute '%s' must be one integer, got %d values", op, decl.name, found->length);
                return false;
            }
            out.ints[i] = *static_cast<int32_t const*>(found->data);
        }
        else
        {
            char const* text = static_cast<char const*>(found->data);
            out.strings[i].assign(text, strnlen(text, size_t(std::max(found->length, 0))));
            if (decl.numAllowed > 0 && indexOf(decl.allowed, decl.numAllowed, out.strings[i].c_str()) < 0)
            {
                report("%s: attribute '%s' is '%s', expected one of the declared values", op, decl.name,
                    out.strings[i].c_str());
                return false;
            }
        }
    }
    return true;
}

// Serialized fields: the same encoding the parser produces (INT32 x1, NUL-terminated CHAR).
class FieldStore
{
public:
    void addInt(char const* name, int32_t value)
    {
        mInts[mNumInts] = value;
        mFields.emplace_back(name, &mInts[mNumInts++], PluginFieldType::kINT32, 1);
    }
    void addString(char const* name, std::string const& value)
    {
        mStrings[mNumStrings] = value;
        std::string const& s = mStrings[mNumStrings++];
        mFields.emplace_back(name, s.c_str(), PluginFieldType::kCHAR, int32_t(s.size() + 1));
    }
    PluginFieldCollection const* collection()
    {
        mCollection.nbFields = int32_t(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    int32_t mInts[8]{};
    int32_t mNumInts = 0;
    std::string mStrings[8];
    int32_t mNumStrings = 0;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    char const* getPluginVersion() const noexcept override
    {
        return gen::kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return gen::kPluginNamespace;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override
    {
        return clone();
    }
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override
    {
        return inOut[pos].desc.format == TensorFormat::kLINEAR && supportsType(pos, inOut);
    }
    // The type each input/output position takes (all of them linear, row-major).
    virtual bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut) const noexcept = 0;
    int32_t configurePlugin(
        DynamicPluginTensorDesc const* in, int32_t nbIn, DynamicPluginTensorDesc const* out, int32_t nbOut) noexcept override
    {
        return 0;
    }
};

class TopKPlugin final : public PluginBase
{
public:
    TopKPlugin(int32_t topK, std::string gate)
        : mTopK(topK)
        , mGate(std::move(gate))
        , mSoftmax(mGate == "softmax" ? 1 : 0)
    {
    }
    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) TopKPlugin(mTopK, mGate);
    }
    char const* getPluginName() const noexcept override
    {
        return gen::kTopKOpType;
    }
    int32_t getNbOutputs() const noexcept override
    {
        return 2;
    }
    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const*, int32_t) const noexcept override
    {
        outputTypes[0] = DataType::kFLOAT;
        outputTypes[1] = DataType::kINT32;
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 2 || inputs[0].nbDims != 2 || inputs[1].nbDims != 2 || nbOutputs != 2)
        {
            report("%s: expects log_probs_x and log_probs_y of rank 2 [T, s]", gen::kTopKOpType);
            return 1;
        }
        if (inputs[0].d[1]->isConstant())
        {
            int64_t s = inputs[0].d[1]->getConstantValue();
            if (int64_t(mTopK) > s * s)
            {
                report("%s: top_k=%d exceeds N = s*s = %lld", gen::kTopKOpType, mTopK, (long long) (s * s));
                return 1;
            }
        }
        for (int32_t i = 0; i < 2; ++i)
        {
            outputs[i].nbDims = 2;
            outputs[i].d[0] = inputs[0].d[0];
            outputs[i].d[1] = exprBuilder.constant(mTopK);
        }
        return 0;
    }
    bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut) const noexcept override
    {
        return inOut[pos].desc.type == (pos == 3 ? DataType::kINT32 : DataType::kFLOAT);
    }
    int32_t configurePlugin(
        DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override
    {
        int32_t s = int32_t(in[0].desc.dims.d[1]);
        if (s > 0 && !findTopK(s, mTopK, mSoftmax))
        {
            report("%s: no kernel compiled for s=%d, top_k=%d, gate=%s; this library has %s (rebuild it for this "
                   "model with `omnimoe build --plugins native`)",
                gen::kTopKOpType, s, mTopK, mGate.c_str(), gen::kVariantSummary);
            return 1;
        }
        return 0;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return size_t(topkWorkspaceBytes(inputs[0].max.d[0], inputs[0].max.d[1], mTopK));
    }
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        // Load the kernels here, outside enqueue (which may run inside a CUDA-graph capture).
        TopKVariant const* v = findTopK(int32_t(in[0].dims.d[1]), mTopK, mSoftmax);
        return (v && resolve(v->topk) && resolve(v->topkMany)) ? 0 : 1;
    }
    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        return omnimoe_native_topk_launch(inputs[0], inputs[1], outputs[0], outputs[1], workspace, INT64_MAX,
            inputDesc[0].dims.d[0], int32_t(inputDesc[0].dims.d[1]), mTopK, mSoftmax, CUstream(stream));
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mStore = FieldStore();
        mStore.addInt(gen::kTopKFields[0].name, mTopK);
        mStore.addString(gen::kTopKFields[1].name, mGate);
        return mStore.collection();
    }

private:
    int32_t mTopK;
    std::string mGate;
    int32_t mSoftmax;
    FieldStore mStore;
};

class ExpertsPlugin final : public PluginBase
{
public:
    explicit ExpertsPlugin(std::string activation)
        : mActivation(std::move(activation))
        , mAct(indexOf(gen::kActivationNames, gen::kNumActivations, mActivation.c_str()))
    {
    }
    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) ExpertsPlugin(mActivation);
    }
    char const* getPluginName() const noexcept override
    {
        return gen::kExpertsOpType;
    }
    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }
    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t, DataType const* inputTypes, int32_t) const noexcept override
    {
        outputTypes[0] = inputTypes[0];
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
        int32_t, IExprBuilder&) noexcept override
    {
        bool rank2 = nbInputs == 5;
        for (int32_t i = 0; rank2 && i < 5; ++i)
            rank2 = inputs[i].nbDims == 2;
        if (!rank2)
        {
            report("%s: expects x [T,d], up [N,d], down [N,d], gates [T,K], indices [T,K]", gen::kExpertsOpType);
            return 1;
        }
        if (inputs[0].d[1]->isConstant() && inputs[1].d[1]->isConstant()
            && inputs[0].d[1]->getConstantValue() != inputs[1].d[1]->getConstantValue())
        {
            report("%s: x has d=%lld but the expert tables have d=%lld", gen::kExpertsOpType,
                (long long) inputs[0].d[1]->getConstantValue(), (long long) inputs[1].d[1]->getConstantValue());
            return 1;
        }
        outputs[0] = inputs[0];
        return 0;
    }
    bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut) const noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (pos == 0)
            return dtypeCode(desc.type) >= 0;
        if (pos == 1 || pos == 2 || pos == 5)
            return desc.type == inOut[0].desc.type;
        if (pos == 3)
            return desc.type == DataType::kFLOAT;
        return desc.type == DataType::kINT32;
    }
    int32_t configurePlugin(
        DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override
    {
        int32_t d = int32_t(in[0].desc.dims.d[1]), n = int32_t(in[1].desc.dims.d[0]), k = int32_t(in[3].desc.dims.d[1]);
        int32_t dtype = dtypeCode(in[0].desc.type);
        if (d > 0 && n > 0 && k > 0 && !findExperts(d, n, k, dtype, mAct))
        {
            report("%s: no kernel compiled for d=%d, N=%d, top_k=%d, dtype=%s, activation=%s; this library has %s "
                   "(rebuild it for this model with `omnimoe build --plugins native`)",
                gen::kExpertsOpType, d, n, k, dtype >= 0 ? gen::kDtypeNames[dtype] : "?", mActivation.c_str(),
                gen::kVariantSummary);
            return 1;
        }
        return 0;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return size_t(expertsWorkspaceBytes(inputs[0].max.d[0], inputs[3].max.d[1], inputs[1].max.d[0], inputs[0].max.d[1]));
    }
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        ExpertsVariant const* v = findExperts(int32_t(in[0].dims.d[1]), int32_t(in[1].dims.d[0]),
            int32_t(in[3].dims.d[1]), dtypeCode(in[0].type), mAct);
        return (v && resolveExperts(*v)) ? 0 : 1;
    }
    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        return omnimoe_native_experts_launch(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], outputs[0],
            workspace, INT64_MAX, inputDesc[0].dims.d[0], int32_t(inputDesc[0].dims.d[1]),
            int32_t(inputDesc[1].dims.d[0]), int32_t(inputDesc[3].dims.d[1]), dtypeCode(inputDesc[0].type), mAct,
            CUstream(stream));
    }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mStore = FieldStore();
        mStore.addString(gen::kExpertsFields[0].name, mActivation);
        return mStore.collection();
    }

private:
    std::string mActivation;
    int32_t mAct;
    FieldStore mStore;
};

template <typename Plugin>
class Creator final : public IPluginCreatorV3One
{
public:
    Creator(char const* opType, FieldDecl const* decls, int32_t numDecls)
        : mOpType(opType)
        , mDecls(decls)
        , mNumDecls(numDecls)
    {
        for (int32_t i = 0; i < numDecls; ++i)
            mFields.emplace_back(decls[i].name, nullptr, decls[i].type, 0);
        mCollection.nbFields = int32_t(mFields.size());
        mCollection.fields = mFields.data();
    }
    char const* getPluginName() const noexcept override
    {
        return mOpType;
    }
    char const* getPluginVersion() const noexcept override
    {
        return gen::kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return gen::kPluginNamespace;
    }
    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }
    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override
    {
        FieldValues values;
        if (!parseFields(mOpType, mDecls, mNumDecls, fc, values))
            return nullptr;
        if (phase == TensorRTPhase::kRUNTIME)
        {
            // Deserialization: fail here, with the SMs we have, on a GPU we have no kernel for.
            int32_t sm = currentSm();
            if (!smSupported(sm))
            {
                if (sm >= 0)
                    report("this GPU is sm_%d; the engine's plugin library has kernels for %s only (rebuild with "
                           "`omnimoe build --plugins native --sm %d`)",
                        sm, smList().c_str(), sm);
                return nullptr;
            }
        }
        return make(values);
    }

private:
    IPluginV3* make(FieldValues const& values);
    char const* mOpType;
    FieldDecl const* mDecls;
    int32_t mNumDecls;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

template <>
IPluginV3* Creator<TopKPlugin>::make(FieldValues const& values)
{
    if (values.ints[0] < 1)
    {
        report("%s: top_k must be >= 1, got %d", mOpType, values.ints[0]);
        return nullptr;
    }
    return new (std::nothrow) TopKPlugin(values.ints[0], values.strings[1]);
}

template <>
IPluginV3* Creator<ExpertsPlugin>::make(FieldValues const& values)
{
    return new (std::nothrow) ExpertsPlugin(values.strings[0]);
}

} // namespace omnimoe_native

namespace omnimoe_native
{
static IPluginCreatorInterface* const* creators(int32_t& count)
{
    static Creator<TopKPlugin> topk(gen::kTopKOpType, gen::kTopKFields, gen::kNumTopKFields);
    static Creator<ExpertsPlugin> experts(gen::kExpertsOpType, gen::kExpertsFields, gen::kNumExpertsFields);
    static IPluginCreatorInterface* const all[] = {&topk, &experts};
    count = 2;
    return all;
}

// The registry this library registered itself with while loading (see registerWithLoadedTensorRT).
static IPluginRegistry* gLoadTimeRegistry = nullptr;

// Hosts that only dlopen a plugin library (Triton Inference Server's `plugins=`, DeepStream's
// custom-lib-path, ONNX Runtime's TensorRT EP) expect it to register its creators as it loads, the
// way REGISTER_TENSORRT_PLUGIN does. Do that only when full TensorRT (libnvinfer) is already in the
// process and TensorRT-RTX is not: static registration crashes TensorRT-RTX, which loads the
// library through loadLibrary/getCreators anyway.
__attribute__((constructor)) static void registerWithLoadedTensorRT()
{
    if (void* rtx = dlopen("libtensorrt_rtx.so.1", RTLD_NOW | RTLD_NOLOAD))
    {
        dlclose(rtx);
        return;
    }
    for (char const* name : {"libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"})
    {
        void* nvinfer = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
        if (!nvinfer)
            continue;
        using GetRegistry = IPluginRegistry* (*) ();
        auto get = reinterpret_cast<GetRegistry>(dlsym(nvinfer, "getPluginRegistry"));
        IPluginRegistry* registry = get ? get() : nullptr;
        dlclose(nvinfer); // still loaded by whoever loaded it first
        if (!registry)
            return;
        int32_t count = 0;
        IPluginCreatorInterface* const* all = creators(count);
        for (int32_t i = 0; i < count; ++i)
            registry->registerCreator(*all[i], gen::kPluginNamespace);
        gLoadTimeRegistry = registry;
        return;
    }
}
} // namespace omnimoe_native

extern "C" {

void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

// What IPluginRegistry::loadLibrary (trtexec --dynamicPlugins) registers. If the library already
// registered itself while loading, that registration is withdrawn first so nothing is registered twice.
IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    IPluginCreatorInterface* const* all = creators(nbCreators);
    if (gLoadTimeRegistry)
    {
        for (int32_t i = 0; i < nbCreators; ++i)
            gLoadTimeRegistry->deregisterCreator(*all[i]);
        gLoadTimeRegistry = nullptr;
    }
    return all;
}

// TensorRT-free harness: create a plugin through the library's own creator (getCreators' order:
// top-K, experts) with parser-encoded fields, then run its onShapeChange + enqueue on raw pointers
// (the path an engine takes). 0 on success.
static int32_t runThroughPlugin(int32_t creatorIndex, FieldStore& store, int64_t const (*shapes)[2],
    DataType const* types, int32_t nbInputs, int32_t nbOutputs, void const* const* ins, void* const* outs,
    void* workspace, CUstream stream)
{
    int32_t count = 0;
    auto* creator = static_cast<IPluginCreatorV3One*>(creators(count)[creatorIndex]);
    IPluginV3* plugin = creator->createPlugin("harness", store.collection(), TensorRTPhase::kRUNTIME);
    if (!plugin)
        return 1;
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginTensorDesc desc[8]{};
    for (int32_t i = 0; i < nbInputs + nbOutputs; ++i)
    {
        desc[i].dims.nbDims = 2;
        desc[i].dims.d[0] = shapes[i][0];
        desc[i].dims.d[1] = shapes[i][1];
        desc[i].type = types[i];
    }
    int32_t status = runtime->onShapeChange(desc, nbInputs, desc + nbInputs, nbOutputs);
    if (status == 0)
        status = runtime->enqueue(desc, desc + nbInputs, ins, outs, workspace, cudaStream_t(stream));
    delete plugin;
    return status;
}

int32_t omnimoe_native_harness_topk(int32_t topK, char const* gate, int64_t T, int32_t s, void const* logProbsX,
    void const* logProbsY, void* gates, void* indices, void* workspace, CUstream stream)
{
    FieldStore store;
    store.addInt(gen::kTopKFields[0].name, topK);
    store.addString(gen::kTopKFields[1].name, gate);
    int64_t const shapes[4][2] = {{T, s}, {T, s}, {T, topK}, {T, topK}};
    DataType const types[4] = {DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32};
    void const* ins[] = {logProbsX, logProbsY};
    void* outs[] = {gates, indices};
    return runThroughPlugin(0, store, shapes, types, 2, 2, ins, outs, workspace, stream);
}

int32_t omnimoe_native_harness_experts(char const* activation, int32_t dtype, int64_t T, int32_t d, int32_t n,
    int32_t k, void const* x, void const* up, void const* down, void const* gates, void const* indices, void* y,
    void* workspace, CUstream stream)
{
    FieldStore store;
    store.addString(gen::kExpertsFields[0].name, activation);
    DataType const floatTypes[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};
    DataType t = (dtype >= 0 && dtype < 3) ? floatTypes[dtype] : DataType::kINT8;
    int64_t const shapes[6][2] = {{T, d}, {n, d}, {n, d}, {T, k}, {T, k}, {T, d}};
    DataType const types[6] = {t, t, t, DataType::kFLOAT, DataType::kINT32, t};
    void const* ins[] = {x, up, down, gates, indices};
    void* outs[] = {y};
    return runThroughPlugin(1, store, shapes, types, 5, 1, ins, outs, workspace, stream);
}

} // extern "C"
