// Where a decode step's GEMV time goes (docs/CUDA.md, "The decode GEMV chain"). Not part of the
// product: a standalone timing program for a GPU machine, compiled there with nvcc:
//
//     nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/decode_chain scripts/decode_chain.cu && /tmp/decode_chain
//
// It replays, as one CUDA graph, the four fused one-token GEMVs of each of 30 layers at the
// 2B-4T shapes (q/k/v, o, gate/up, down; bf16, each forming, normalizing and quantizing its own
// input as the model's decode step does; attention is left out) and prints the median time per
// layer of the shipped kernel (1024 threads, the warps per group that src/cuda/mod.rs,
// split_warps, mirrored below, picks) against variants built from the same device functions:
//   - 256 threads and one warp per group (the kernel's shape before split-K), 256 threads
//     with two warps per group, and 512 threads with as many warps per group as fit one wave;
//   - empty kernels with the same grids: the launch floor inside a graph;
//   - the prologue only (form, norm, quantize; weights still prefetched) and the GEMV only;
//   - the prologue cut short after its loads, after the sum of squares, and after the norm and
//     absmax: what each of its stages adds;
//   - outputs allocated with cudaMallocAsync during capture: the allocation nodes the model's
//     recording holds;
//   - programmatic dependent launch (sm_90): each kernel prefetches its weights, then waits
//     for its predecessor (griddepcontrol), and lets its successor start once it has quantized;
//   - the shipped kernel with every layer reading layer 0's norm weights, or all of layer 0's
//     weights (then L2-resident): what the L2 misses of the small per-layer reads cost;
//   - "staged": each block copies its groups' weights into shared memory (cp.async) before it
//     waits for its predecessor, with and without PDL (2 blocks of 512 threads per SM, so the
//     next kernel's block stages while this one computes), and at 1024 threads with PDL;
//   - "spread": the shipped kernel's groups spread over every SM, with any number of warps per
//     group (o and down: 128 blocks instead of 80).
// Weights are random codes (30 x 17.35 MB, so each replay streams them from HBM). The shipped
// kernel and the PDL, staged and spread variants compute the same outputs (equal checksums); the
// 256-thread one sums the norm's squares in another order, so its checksum may differ.

#include "../crates/bitnet-kernels/kernels/bitnet.cu"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x)                                                                        \
    do {                                                                             \
        cudaError_t e = (x);                                                         \
        if (e != cudaSuccess) {                                                      \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

typedef __nv_bfloat16 bf;

enum Variant {
    SHIPPED, PREV_256, SPLIT_256_S2, FILL_512, EMPTY, PRO_LOAD, PRO_RMS, PRO_MAX, PROLOGUE, GEMV_ONLY,
    ALLOC_NODES, PDL, HOT_NORMS, HOT_ALL, STAGED, STAGED_PDL, STAGED_PDL_1024, SPREAD, VARIANTS
};
static const char* kVariantName[] = {
    "shipped kernel",
    "256 threads, 1 warp per group (before split-K)",
    "256 threads, 2 warps per group",
    "512 threads, warps per group fill one wave",
    "empty kernels, same grids",
    "prologue: row and norm-weight loads only",
    "prologue: loads, sum of squares",
    "prologue: loads, sum of squares, norm, absmax",
    "prologue only (form, norm, quantize)",
    "GEMV only (no prologue)",
    "shipped, outputs cudaMallocAsync'd in capture",
    "PDL: prefetch, wait, quantize, trigger",
    "shipped, one set of norm weights for all layers",
    "shipped, one layer's weights for all layers (L2-resident)",
    "staged: 512 threads, the block's weights cp.async'd to shared memory first",
    "staged + PDL: trigger at entry, weights to shared memory, then wait",
    "staged + PDL at 1024 threads",
    "1024 threads, groups spread over all SMs (any S)",
};

// STAGED / STAGED_PDL: each block owns `per` consecutive groups (grid <= SMs) and copies their
// weights into shared memory (cp.async) before it waits for its predecessor (griddepcontrol.wait,
// a no-op without the PDL attribute); it lets its successor launch at entry, so with PDL the
// next kernel's block (2 fit per SM: launch bounds 512 x 2) stages its weights while this one
// computes. Then the prologue as shipped, and the GEMV from shared memory: S warps per group,
// partial sums meeting in shared-memory integer atomics (exact in any order).
template <int TH, int REGS>
__global__ void __launch_bounds__(TH, 1024 / TH)
    staged(GemvMat<bf> m0, GemvMat<bf> m1, GemvMat<bf> m2, const bf* x, const bf* r, int mode,
           bf* sum_out, const bf* w, float eps, int k, int nb, int per, int S) {
    extern __shared__ __align__(16) int8_t smem[];
    __shared__ float scale;
    __shared__ int qsum;
    __shared__ int acc_s[64][4];
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int bytes = nb * 256;
    int8_t* q = smem;
    uint8_t* ws = reinterpret_cast<uint8_t*>(smem + bytes);
    const int first = blockIdx.x * per;
    for (int i = 0; i < per; ++i) {
        GemvMat<bf> m;
        const int g = pick_group(m0, m1, m2, first + i, m);
        if (g < 0) break;
        const uint8_t* src = m.w + (size_t)g * bytes;
        uint8_t* dst = ws + (size_t)i * bytes;
        for (int o = threadIdx.x * 16; o < bytes; o += TH * 16) {
            const unsigned d = (unsigned)__cvta_generic_to_shared(dst + o);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src + o)
                         : "memory");
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    for (int i = threadIdx.x; i < per * 4; i += TH) (&acc_s[0][0])[i] = 0;
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const RowInput<bf> in{x, r, mode};
    quantize_row<REGS>(in, blockIdx.x == 0 ? sum_out : nullptr, w, 1, eps, q, &scale, &qsum, k,
                       bytes);
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = TH / 32;
    const int chunks = nb * 16, j0 = (lane & 3) * 16;
    for (int item = warp; item < per * S; item += warps) {
        const int i = item / S, s = item % S;
        const uint4* wg = reinterpret_cast<const uint4*>(ws + (size_t)i * bytes);
        int acc = 0;
#pragma unroll 4
        for (int c = lane + 32 * s; c < chunks; c += 32 * S) {
            const uint4 wv = wg[c];
            const uint32_t wr[4] = {wv.x, wv.y, wv.z, wv.w};
            const int8_t* qb = q + (size_t)(c >> 4) * 256 + j0;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const int4 a = *reinterpret_cast<const int4*>(qb + 64 * kk);
                const int ar[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc = __dp4a((int)((wr[e] >> (2 * kk)) & MASK2), ar[e], acc);
            }
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 16);
        if ((lane & 0x13) == 0) atomicAdd(&acc_s[i][lane >> 2], acc);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < per * 4; t += TH) {
        GemvMat<bf> m;
        const int g = pick_group(m0, m1, m2, first + t / 4, m);
        const int o = g * 4 + (t & 3);
        if (g >= 0 && o < m.out)
            store_out(m.y, o, epilogue(acc_s[t / 4][t & 3] - qsum, scale, m.scale, 0));
    }
}

// SPREAD: the shipped kernel with G = ceil(groups / SMs) groups per block and S = 32 / G (up to
// 8) warps per group, any S rather than a power of two, so that the grid covers (nearly) every
// SM: 640 groups (o, down) take 128 blocks of 5 groups x 6 warps instead of 80 blocks of 8 x 4,
// gate/up 128 blocks of 27 x 1 instead of 108 of 32 x 1. Warps past G * S only join the
// barriers (their group is out of range; `part` has S slots of slack for the one with s == 0).
template <int REGS, int S>
__global__ void __launch_bounds__(1024)
    spread(GemvMat<bf> m0, GemvMat<bf> m1, GemvMat<bf> m2, const bf* x, const bf* r, int mode,
           bf* sum_out, const bf* w, float eps, int k, int nb, int G) {
    extern __shared__ __align__(16) int8_t q[];
    __shared__ float scale;
    __shared__ int qsum;
    __shared__ int part[32 + S][4][1];
    const int warp = threadIdx.x >> 5;
    const int group = warp / S < G ? blockIdx.x * G + warp / S : 1 << 30, s = warp % S;
    auto prefetch = [&]() { prefetch_group<S>(m0, m1, m2, group, s, nb); };
    const RowInput<bf> in{x, r, mode};
    quantize_row<REGS>(in, blockIdx.x == 0 ? sum_out : nullptr, w, 1, eps, q, &scale, &qsum, k,
                       nb * 256, prefetch);
    __syncthreads();
    gemv_group<1, S>(m0, m1, m2, group, s, q, &scale, &qsum, nb, 0, part);
}

// The first stages of quantize_row (PRO_LOAD, PRO_RMS, PRO_MAX): each ends in a store that
// depends on what it computed, so nothing is optimized away.
template <int TH, int REGS, int S, int V>
__device__ void partial_prologue(const RowInput<bf>& in, bf* so, const bf* w, float eps, int k,
                                 const GemvMat<bf>& m0, const GemvMat<bf>& m1,
                                 const GemvMat<bf>& m2, int group, int s, int nb) {
    __shared__ float red[32], red_max[32];
    float v[REGS], wv[REGS];
    load_row(in, k, v);
    load_row(plain(w), k, wv);
    prefetch_group<S>(m0, m1, m2, group, s, nb);
    if (so != nullptr)
        for (int r = 0; r < REGS; ++r)
            if (threadIdx.x + r * TH < k) store_out(so, threadIdx.x + r * TH, v[r]);
    float probe = 0.0f;
    if (V == PRO_LOAD) {
        for (int r = 0; r < REGS; ++r) probe += v[r] * wv[r];
    } else {
        const float inv = inv_rms(in, v, k, eps, red);
        probe = inv;
        if (V == PRO_MAX) {
            float m = 0.0f;
            for (int r = 0; r < REGS; ++r)
                if (threadIdx.x + r * TH < k)
                    m = fmaxf(m, fabsf(round_to(normed<bf>(v[r], inv, wv[r]), bf())));
            probe = __fdiv_rn(127.0f, fmaxf(block_max(m, red_max), 1e-5f));
        }
    }
    if (probe == 1234.5f) store_out(m0.y, threadIdx.x, probe);
}

// The variants of gemv_fused (kernels/bitnet.cu), from its own parts; PREV_256, SPLIT_256_S2
// and FILL_512 are gemv_fused itself at other block shapes.
template <int TH, int REGS, int S, int V>
__global__ void __launch_bounds__(TH)
    variant(GemvMat<bf> m0, GemvMat<bf> m1, GemvMat<bf> m2, const bf* x, const bf* r, int mode,
            bf* sum_out, const bf* w, float eps, int k, int nb) {
    extern __shared__ __align__(16) int8_t q[];
    __shared__ float scale;
    __shared__ int qsum;
    __shared__ int part[TH / 32][4][1];
    const int warp = threadIdx.x >> 5;
    const int group = blockIdx.x * (TH / 32 / S) + warp / S, s = warp % S;
    bf* so = blockIdx.x == 0 ? sum_out : nullptr;
    const RowInput<bf> in{x, r, mode};
    if (V == PREV_256 || V == SPLIT_256_S2 || V == FILL_512) {
        gemv_fused<REGS, S, bf>(m0, m1, m2, x, r, mode, sum_out, w, 1, eps, k, nb, 0);
        return;
    }
    if (V == EMPTY) {
        if (blockIdx.x == 0 && threadIdx.x == 0) m0.y[0] = x[0];
        return;
    }
    if (V == PRO_LOAD || V == PRO_RMS || V == PRO_MAX) {
        partial_prologue<TH, REGS, S, V>(in, so, w, eps, k, m0, m1, m2, group, s, nb);
        return;
    }
    if (V == GEMV_ONLY) {
        for (int i = threadIdx.x; i < nb * 256; i += blockDim.x) q[i] = (int8_t)(i & 7);
        if (threadIdx.x == 0) scale = 1.0f, qsum = 0;
    } else if (V == PDL) {
        prefetch_group<S>(m0, m1, m2, group, s, nb);
        asm volatile("griddepcontrol.wait;" ::: "memory");
        quantize_row<REGS>(in, so, w, 1, eps, q, &scale, &qsum, k, nb * 256);
    } else {
        auto prefetch = [&]() { prefetch_group<S>(m0, m1, m2, group, s, nb); };
        quantize_row<REGS>(in, so, w, 1, eps, q, &scale, &qsum, k, nb * 256, prefetch);
    }
    __syncthreads();
    if (V == PDL) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (V == PROLOGUE) {
        if (threadIdx.x == 0) store_out(m0.y, blockIdx.x % m0.out, q[blockIdx.x % k] * scale + qsum);
        return;
    }
    gemv_group<1, S>(m0, m1, m2, group, s, q, &scale, &qsum, nb, 0, part);
}

struct Mat {
    uint8_t* w = nullptr;
    int out = 0;
};

static Mat matrix(int out, int k) {
    Mat m;
    m.out = out;
    const size_t bytes = (size_t)((out + 3) / 4) * ((k + 255) / 256) * 256;
    CK(cudaMalloc(&m.w, bytes));
    std::vector<uint8_t> h(bytes);
    for (auto& b : h) {
        b = 0;
        for (int j = 0; j < 4; ++j) b |= (uint8_t)((rand() % 3) << (2 * j));
    }
    CK(cudaMemcpy(m.w, h.data(), bytes, cudaMemcpyHostToDevice));
    return m;
}

static bf* vector_of(int n, float lo, float hi) {
    bf* p;
    CK(cudaMalloc(&p, n * sizeof(bf)));
    std::vector<bf> h(n);
    for (auto& v : h) v = __float2bfloat16(lo + (hi - lo) * (rand() / (float)RAND_MAX));
    CK(cudaMemcpy(p, h.data(), n * sizeof(bf), cudaMemcpyHostToDevice));
    return p;
}

struct Layer {
    Mat q, k, v, o, gate, up, down;
    bf *input_norm, *attn_sub_norm, *post_norm, *ffn_sub_norm;
};

static int sm_count() {
    static int n = 0;
    if (n == 0) CK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, 0));
    return n;
}

// Warps per group for blocks of `threads`: split_warps of src/cuda/mod.rs (1024 threads there).
static int split_warps(int groups, int threads) {
    const int warps = threads / 32;
    int s = 1;
    while (s < 8 && s * 2 <= warps && (groups * s * 2 + warps - 1) / warps <= sm_count()) s *= 2;
    return s;
}

// Values per thread in registers (row_regs of src/cuda/mod.rs, uncapped).
constexpr int regs_for(int k, int threads) { return ((k + threads - 1) / threads + 3) / 4 * 4; }

// The variants are compiled for the shapes the 2B-4T matrices take on 114-132 SMs (H100 PCIe,
// H100 SXM, H200) and for the other block shapes above; another shape runs the shipped kernel
// only.
template <int V, int TH, int S>
static bool launch_at(cudaLaunchConfig_t& cfg, const GemvMat<bf>& m0, const GemvMat<bf>& m1,
                      const GemvMat<bf>& m2, const bf* x, const bf* r, int mode, bf* so,
                      const bf* w, float eps, int k, int nb) {
    if (k == 2560)
        CK(cudaLaunchKernelEx(&cfg, variant<TH, regs_for(2560, TH), S, V>, m0, m1, m2, x, r, mode,
                              so, w, eps, k, nb));
    else
        CK(cudaLaunchKernelEx(&cfg, variant<TH, regs_for(6912, TH), S, V>, m0, m1, m2, x, r, mode,
                              so, w, eps, k, nb));
    return true;
}

template <int V>
static bool launch_variant(int threads, int s, cudaLaunchConfig_t& cfg, const GemvMat<bf>& m0,
                           const GemvMat<bf>& m1, const GemvMat<bf>& m2, const bf* x, const bf* r,
                           int mode, bf* so, const bf* w, float eps, int k, int nb) {
#define AT(TH, S)                   \
    if (threads == TH && s == S) \
        return launch_at<V, TH, S>(cfg, m0, m1, m2, x, r, mode, so, w, eps, k, nb);
    AT(256, 1) AT(256, 2) AT(512, 1) AT(512, 2) AT(1024, 1) AT(1024, 2) AT(1024, 4)
#undef AT
    return false;
}

// The shipped kernel of kernels/bitnet.cu for the shape, by its name's parts.
typedef void (*Fused)(const uint8_t*, bf*, int, float, const uint8_t*, bf*, int, float,
                      const uint8_t*, bf*, int, float, const bf*, const bf*, int, bf*, const bf*,
                      int, float, int, int, int);
#define FUSED_S(R) \
    {bitnet_gemv_fused##R##s1_bf16, bitnet_gemv_fused##R##s2_bf16, bitnet_gemv_fused##R##s4_bf16, bitnet_gemv_fused##R##s8_bf16}
static const Fused kFused[3][4] = {FUSED_S(4), FUSED_S(8), FUSED_S(12)};

static Fused shipped(int k, int s) {
    const int regs = std::min(regs_for(k, 1024), 12);
    const int log_s = s == 1 ? 0 : s == 2 ? 1 : s == 4 ? 2 : 3;
    return kFused[regs / 4 - 1][log_s];
}

// Launches of variant v that could not run at their shape (reported, then the variant skipped).
static int g_unsupported = 0;

// One fused GEMV launch of variant v over up to three matrices sharing the input.
static void launch(int v, cudaStream_t st, Mat a, bf* ya, Mat b, bf* yb, Mat c, bf* yc,
                   const bf* x, const bf* r, int mode, bf* so, const bf* w, int k) {
    const int nb = (k + 255) / 256;
    const int groups = (a.out + 3) / 4 + (b.out + 3) / 4 + (c.out + 3) / 4;
    int threads = 1024, s = split_warps(groups, 1024);
    if (v == PREV_256) threads = 256, s = 1;
    if (v == SPLIT_256_S2) threads = 256, s = 2;
    if (v == FILL_512) threads = 512, s = split_warps(groups, 512);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    const int per_block = threads / 32 / s;
    cfg.gridDim = dim3((groups + per_block - 1) / per_block);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = nb * 256;
    cfg.stream = st;
    cfg.attrs = attr;
    cfg.numAttrs = v == PDL || v == STAGED_PDL || v == STAGED_PDL_1024 ? 1 : 0;
    const GemvMat<bf> m0{a.w, ya, a.out, 0.7f}, m1{b.w, yb, b.out, 0.9f}, m2{c.w, yc, c.out, 1.1f};
    const float eps = 1e-5f;
    bool ok = true;
    if (v == STAGED || v == STAGED_PDL || v == STAGED_PDL_1024) {
        const int th = v == STAGED_PDL_1024 ? 1024 : 512;
        const int per = (groups + sm_count() - 1) / sm_count();
        const int S = std::max(1, th / 32 / per);
        if (per > 64) {  // staged's acc_s holds 64 groups
            ++g_unsupported;
            return;
        }
        cfg.blockDim = dim3(th);
        cfg.gridDim = dim3((groups + per - 1) / per);
        cfg.dynamicSmemBytes = (size_t)nb * 256 * (1 + per);
        auto go = [&](auto kern) {
            CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
            CK(cudaLaunchKernelEx(&cfg, kern, m0, m1, m2, x, r, mode, so, w, eps, k, nb, per, S));
        };
        if (th == 512) {
            if (k == 2560) go(staged<512, regs_for(2560, 512)>);
            else go(staged<512, regs_for(6912, 512)>);
        } else {
            if (k == 2560) go(staged<1024, regs_for(2560, 1024)>);
            else go(staged<1024, regs_for(6912, 1024)>);
        }
        return;
    }
    if (v == SPREAD) {
        const int G = (groups + sm_count() - 1) / sm_count(), S = std::min(8, std::max(1, 32 / G));
        cfg.gridDim = dim3((groups + G - 1) / G);
        auto go = [&](auto kern) {
            CK(cudaLaunchKernelEx(&cfg, kern, m0, m1, m2, x, r, mode, so, w, eps, k, nb, G));
        };
#define SPREAD_AT(SS)                                                   \
    if (S == SS) {                                                      \
        if (k == 2560) go(spread<regs_for(2560, 1024), SS>);            \
        else go(spread<regs_for(6912, 1024), SS>);                      \
        return;                                                         \
    }
        SPREAD_AT(1) SPREAD_AT(2) SPREAD_AT(3) SPREAD_AT(4) SPREAD_AT(5) SPREAD_AT(6) SPREAD_AT(8)
#undef SPREAD_AT
        ++g_unsupported;
        return;
    }
    switch (v) {
        case SHIPPED:
        case ALLOC_NODES:
        case HOT_NORMS:
        case HOT_ALL:
            CK(cudaLaunchKernelEx(&cfg, shipped(k, s), a.w, ya, a.out, 0.7f, b.w, yb,
                                  b.out, 0.9f, c.w, yc, c.out, 1.1f, x, r, mode, so, w, 1, eps, k,
                                  nb, 0));
            break;
        // The other variants differ only in their template argument.
#define VARIANT(V)                                                                                 \
    case V:                                                                                        \
        ok = launch_variant<V>(threads, s, cfg, m0, m1, m2, x, r, mode, so, w, eps, k, nb);        \
        break;
        VARIANT(PREV_256)
        VARIANT(SPLIT_256_S2)
        VARIANT(FILL_512)
        VARIANT(EMPTY)
        VARIANT(PROLOGUE)
        VARIANT(GEMV_ONLY)
        VARIANT(PRO_LOAD)
        VARIANT(PRO_RMS)
        VARIANT(PRO_MAX)
        VARIANT(PDL)
#undef VARIANT
    }
    if (!ok) ++g_unsupported;
}

int main() {
    const int layers = 30, hidden = 2560, kv = 640, ffn = 6912;
    srand(1);
    std::vector<Layer> ls(layers);
    for (auto& l : ls) {
        l.q = matrix(hidden, hidden), l.k = matrix(kv, hidden), l.v = matrix(kv, hidden);
        l.o = matrix(hidden, hidden);
        l.gate = matrix(ffn, hidden), l.up = matrix(ffn, hidden), l.down = matrix(hidden, ffn);
        l.input_norm = vector_of(hidden, 0.5f, 1.5f), l.attn_sub_norm = vector_of(hidden, 0.5f, 1.5f);
        l.post_norm = vector_of(hidden, 0.5f, 1.5f), l.ffn_sub_norm = vector_of(ffn, 0.5f, 1.5f);
    }
    const bf *x0 = vector_of(hidden, -1, 1), *mlp0 = vector_of(hidden, -1, 1);
    // The step's activations; ALLOC_NODES swaps in fresh allocations while recording.
    struct Bufs {
        bf *h0, *h1, *mlp, *q, *k, *v, *o, *gate, *up;
    } fixed{vector_of(hidden, 0, 0), vector_of(hidden, 0, 0), vector_of(hidden, 0, 0),
            vector_of(hidden, 0, 0), vector_of(kv, 0, 0),     vector_of(kv, 0, 0),
            vector_of(hidden, 0, 0), vector_of(ffn, 0, 0),    vector_of(ffn, 0, 0)};
    const Mat none;
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

    // kernel < 0: all four per layer; else only that one (0 q/k/v, 1 o, 2 gate/up, 3 down).
    auto record = [&](int v, int kernel) {
        Bufs b = fixed;
        CK(cudaMemcpyAsync(b.h0, x0, hidden * sizeof(bf), cudaMemcpyDeviceToDevice, st));
        CK(cudaMemcpyAsync(b.mlp, mlp0, hidden * sizeof(bf), cudaMemcpyDeviceToDevice, st));
        auto fresh = [&](bf*& p, int n) {
            if (v == ALLOC_NODES) CK(cudaMallocAsync((void**)&p, n * sizeof(bf), st));
        };
        for (auto& layer : ls) {
            // HOT_NORMS / HOT_ALL take layer 0's norm weights / everything for every layer.
            Layer l = v == HOT_ALL ? ls[0] : layer;
            if (v == HOT_NORMS) {
                l.input_norm = ls[0].input_norm, l.attn_sub_norm = ls[0].attn_sub_norm;
                l.post_norm = ls[0].post_norm, l.ffn_sub_norm = ls[0].ffn_sub_norm;
            }
            // The residual stream alternates between h0 and h1, as the model's does.
            if (kernel < 0 || kernel == 0) {
                fresh(b.q, hidden), fresh(b.k, kv), fresh(b.v, kv), fresh(b.h1, hidden);
                launch(v, st, l.q, b.q, l.k, b.k, l.v, b.v, b.h0, b.mlp, INPUT_ADD, b.h1,
                           l.input_norm, hidden);
            }
            if (kernel < 0 || kernel == 1) {
                fresh(b.o, hidden);
                launch(v, st, l.o, b.o, none, nullptr, none, nullptr, b.q, b.q, INPUT_PLAIN,
                           nullptr, l.attn_sub_norm, hidden);
            }
            if (kernel < 0 || kernel == 2) {
                fresh(b.gate, ffn), fresh(b.up, ffn), fresh(b.h0, hidden);
                launch(v, st, l.gate, b.gate, l.up, b.up, none, nullptr, b.h1, b.o,
                           INPUT_ADD, b.h0, l.post_norm, hidden);
            }
            if (kernel < 0 || kernel == 3) {
                fresh(b.mlp, hidden);
                launch(v, st, l.down, b.mlp, none, nullptr, none, nullptr, b.gate, b.up,
                           INPUT_RELU2_MUL, nullptr, l.ffn_sub_norm, ffn);
            }
        }
    };

    const char* kernels[] = {"all four", "q/k/v", "o", "gate/up", "down"};
    for (int kernel = -1; kernel < 4; ++kernel) {
        printf("\n%s (30 layers, one graph)\n", kernels[kernel + 1]);
        printf("| variant | us per layer | min | max | checksum |\n|---|---:|---:|---:|---|\n");
        for (int v = 0; v < VARIANTS; ++v) {
            if ((v == ALLOC_NODES || v == HOT_NORMS || v == HOT_ALL) && kernel >= 0) continue;
            cudaGraph_t g;
            cudaGraphExec_t exec;
            g_unsupported = 0;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
            record(v, kernel);
            CK(cudaStreamEndCapture(st, &g));
            if (g_unsupported > 0) {
                printf("| %s | not compiled for this GPU's shapes | | | |\n", kVariantName[v]);
                CK(cudaGraphDestroy(g));
                continue;
            }
            CK(cudaGraphInstantiate(&exec, g, cudaGraphInstantiateFlagAutoFreeOnLaunch));
            for (int i = 0; i < 5; ++i) CK(cudaGraphLaunch(exec, st));
            cudaEvent_t e0, e1;
            CK(cudaEventCreate(&e0));
            CK(cudaEventCreate(&e1));
            std::vector<float> ms;
            for (int i = 0; i < 31; ++i) {
                CK(cudaEventRecord(e0, st));
                CK(cudaGraphLaunch(exec, st));
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                float t;
                CK(cudaEventElapsedTime(&t, e0, e1));
                ms.push_back(t);
            }
            std::sort(ms.begin(), ms.end());
            // The last layer's outputs (not meaningful for ALLOC_NODES, whose outputs are freed).
            std::vector<uint16_t> out(hidden), res(hidden);
            CK(cudaMemcpy(out.data(), fixed.mlp, hidden * 2, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(res.data(), fixed.h0, hidden * 2, cudaMemcpyDeviceToHost));
            unsigned long long sum = 0;
            for (int i = 0; i < hidden; ++i) sum = sum * 1000003ull + out[i] * 65537ull + res[i];
            printf("| %s | %.2f | %.2f | %.2f | %016llx |\n", kVariantName[v], ms[15] * 1e3 / layers,
                   ms[0] * 1e3 / layers, ms[30] * 1e3 / layers, sum);
            CK(cudaEventDestroy(e0));
            CK(cudaEventDestroy(e1));
            CK(cudaGraphExecDestroy(exec));
            CK(cudaGraphDestroy(g));
        }
    }
    return 0;
}
