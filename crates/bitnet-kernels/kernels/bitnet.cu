// BitNet b1.58 CUDA kernels: per-token int8 activation quantization, ternary x int8 products
// (GEMV with dp4a, GEMM with dp4a or int8 tensor-core mma), and the BF16 x f32 and 4-bit LM heads.
//
// Compiled to PTX by build.rs (nvcc -arch=sm_80 -ptx; the driver JITs it for the running GPU)
// and loaded through candle's CudaDevice::get_or_load_custom_func (src/cuda/mod.rs).
//
// Numerics match the CPU path bit for bit (src/quant.rs, src/op.rs):
//   s = 127 / max(max|x|, 1e-5), q = clamp(round_ties_even(x*s), -128, 127)  (NaN -> 0),
//   acc = sum(code*q) - sum(q)   (code = w + 1 in {0,1,2}; exact in i32),
//   y = float(acc) * f, f = scale / s (Multiply) or 1 / (s * scale) (Divide).
// Every float step is a single IEEE-rounded operation (__fmul_rn/__fdiv_rn: no contraction into
// FMA, no approximate division), as in Rust.
//
// Weight layout: the CPU kernel layout (src/layout.rs), uploaded as-is. Rows are padded to groups
// of 4 and inputs to blocks of 256; group g is nb blocks of [row0 64B][row1 64B][row2 64B][row3 64B];
// byte j of a row's block b holds the codes of inputs 256b + j + 64k in bits 2k..2k+1. So the 32-bit
// word at bytes j..j+3, shifted right by 2k and masked with 0x03030303, holds the codes of the four
// consecutive inputs 256b + 64k + j .. +3: exactly a dp4a operand against the activations there.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define MASK2 0x03030303u

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store_out(float* y, size_t i, float v) { y[i] = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* y, size_t i, float v) {
    y[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float round_to(float v, float) { return v; }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

// f such that y = float(acc) * f (see the header); token scale s.
__device__ __forceinline__ float rescale(float s, float scale, int divide) {
    return divide ? __fdiv_rn(1.0f, __fmul_rn(s, scale)) : __fdiv_rn(scale, s);
}

__device__ __forceinline__ float epilogue(int acc, float s, float scale, int divide) {
    return __fmul_rn((float)acc, rescale(s, scale, divide));
}

// ---------------------------------------------------------------------------------------------
// Rows: one block per token (quantization, RMSNorm). Each thread keeps up to ROW_REGS of its row's
// values in registers between passes, so a row is read from memory once and a pass's loads are all
// in flight together (a decode step has a single row: these kernels are latency-bound). Thread t
// sums the squares of elements t, t + blockDim.x, ... whatever REGS is, and every row kernel runs
// ROW_THREADS threads (the same constant in src/cuda/mod.rs), so all of them round the norm
// identically. 1024: a decode row is then 3-7 values per thread, and the fused GEMV's blocks
// have 32 warps to overlap its latency chain with (see gemv_fused).
// ---------------------------------------------------------------------------------------------
#define ROW_THREADS 1024
#define ROW_REGS 8

// Max over the block of m >= 0 (never NaN). Non-negative floats order as their bit patterns, so
// each warp reduces with one redux.sync (sm_80+) instead of a five-step shuffle tree.
__device__ __forceinline__ float block_max(float m, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    m = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(m)));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = lane < warps ? red[lane] : 0.0f;
    return __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(m)));
}

// What a row kernel reads at column i (src/cuda/mod.rs `LinearInput`): x, x + r (a residual add),
// or relu(x)^2 * r (BitNet's gated activation), each rounded to T as the separate ops round.
#define INPUT_PLAIN 0
#define INPUT_ADD 1
#define INPUT_RELU2_MUL 2

template <typename T>
struct RowInput {
    const T* __restrict__ x;
    const T* __restrict__ r;
    int mode;
    __device__ __forceinline__ float operator()(int i) const {
        const float a = to_f32(x[i]);
        if (mode == INPUT_ADD) return round_to(__fadd_rn(a, to_f32(r[i])), T());
        if (mode == INPUT_RELU2_MUL) {
            const float p = fmaxf(a, 0.0f);
            return round_to(__fmul_rn(round_to(__fmul_rn(p, p), T()), to_f32(r[i])), T());
        }
        return a;
    }
};

template <typename T>
__device__ __forceinline__ RowInput<T> plain(const T* x) {
    return RowInput<T>{x, x, INPUT_PLAIN};
}

// Loads this thread's first REGS values of a row (zero past h).
template <int REGS, typename F>
__device__ __forceinline__ void load_row(const F& get, int h, float (&v)[REGS]) {
#pragma unroll
    for (int r = 0; r < REGS; ++r) {
        const int i = threadIdx.x + r * blockDim.x;
        v[r] = i < h ? get(i) : 0.0f;
    }
}

// 1 / sqrt(mean(x^2) + eps) of a row, whose register part the caller loaded into v.
template <int REGS, typename F>
__device__ float inv_rms(const F& get, const float (&v)[REGS], int h, float eps, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float ss = 0.0f;
#pragma unroll
    for (int r = 0; r < REGS; ++r) ss = __fadd_rn(ss, __fmul_rn(v[r], v[r]));
    for (int i = REGS * blockDim.x + threadIdx.x; i < h; i += blockDim.x) {
        const float u = get(i);
        ss = __fadd_rn(ss, __fmul_rn(u, u));
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; ++i) total += red[i];
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, (float)h), eps)));
}

// RMSNorm of value x with weight w before the final rounding: transformers' LlamaRMSNorm
// normalizes in f32, rounds to T, then multiplies by the weight (the caller rounds that to T).
template <typename T>
__device__ __forceinline__ float normed(float x, float inv, float w) {
    return __fmul_rn(w, round_to(__fmul_rn(x, inv), T()));
}

// ---------------------------------------------------------------------------------------------
// (a) Activation quantization of a row input (see RowInput; with INPUT_ADD the sum is also stored
// to `sum_out`, the new residual stream), optionally after an RMSNorm (norm != 0: the norm's
// output rounded to T, exactly what the RMSNorm kernel would store). One launch replaces the add
// or the gated activation, the norm and the quantization.
// q is [tokens, k_pad] int8 with zero padding; scales [tokens] f32; sums [tokens] i32 (sum of q).
//
// quantize_row does one row with the whole block: the row's values go to qr (global memory in the
// quantization kernel, shared memory in the fused GEMV below), its scale and sum of values to
// *scale and *qsum (written by thread 0), and with INPUT_ADD the sum x + r to so unless it is null.
// `issued()` runs once the row's loads are in flight (the fused GEMV starts its weights then).
// ---------------------------------------------------------------------------------------------
struct NoHook {
    __device__ __forceinline__ void operator()() const {}
};

template <int REGS, typename T, typename Hook = NoHook>
__device__ void quantize_row(const RowInput<T>& in, T* __restrict__ so, const T* __restrict__ w,
                             int norm, float eps, int8_t* __restrict__ qr, float* scale,
                             int* qsum, int k, int k_pad, const Hook& issued = Hook()) {
    __shared__ float red_n[32], red_f[32];
    __shared__ int red_i[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int stride = blockDim.x, tail = REGS * stride;

    float v[REGS], wv[REGS] = {};
    load_row(in, k, v);
    // The norm weights are loaded before the reduction needs them, not after it.
    if (norm) load_row(plain(w), k, wv);
    issued();
    if (in.mode == INPUT_ADD && so != nullptr) {
#pragma unroll
        for (int r = 0; r < REGS; ++r) {
            const int i = threadIdx.x + r * stride;
            if (i < k) store_out(so, i, v[r]);
        }
        for (int i = tail + threadIdx.x; i < k; i += stride) store_out(so, i, in(i));
    }
    const float inv = norm ? inv_rms(in, v, k, eps, red_n) : 1.0f;
    auto value = [&](int i, float raw, float wi) {
        return norm ? round_to(normed<T>(raw, inv, wi), T()) : raw;
    };
    auto at = [&](int i) { return value(i, in(i), norm ? to_f32(w[i]) : 0.0f); };
    float m = 0.0f;
#pragma unroll
    for (int r = 0; r < REGS; ++r) {
        const int i = threadIdx.x + r * stride;
        if (i < k) v[r] = value(i, v[r], wv[r]);
        m = fmaxf(m, fabsf(v[r]));
    }
    for (int i = tail + threadIdx.x; i < k; i += stride) m = fmaxf(m, fabsf(at(i)));
    m = block_max(m, red_f);
    const float s = __fdiv_rn(127.0f, fmaxf(m, 1e-5f));

    // rintf rounds half to even, like f32::round_ties_even; NaN becomes 0 as in Rust's `as`.
    auto quant = [s](float x) {
        const float p = __fmul_rn(x, s);
        return isnan(p) ? 0 : (int)fminf(fmaxf(rintf(p), -128.0f), 127.0f);
    };
    int sum = 0;
#pragma unroll
    for (int r = 0; r < REGS; ++r) {
        const int i = threadIdx.x + r * stride;
        if (i < k_pad) {
            const int c = i < k ? quant(v[r]) : 0;
            qr[i] = (int8_t)c;
            sum += c;
        }
    }
    for (int i = tail + threadIdx.x; i < k_pad; i += stride) {
        const int c = i < k ? quant(at(i)) : 0;
        qr[i] = (int8_t)c;
        sum += c;
    }
    sum = __reduce_add_sync(0xffffffffu, sum);
    if (lane == 0) red_i[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int w = 0; w < warps; ++w) total += red_i[w];
        *scale = s;
        *qsum = total;
    }
}

// One block per token. q is [tokens, k_pad]; scales and sums [tokens].
template <int REGS, typename T>
__device__ void quantize_rows(const T* __restrict__ x, const T* __restrict__ rin, int mode,
                              T* __restrict__ sum_out, const T* __restrict__ w, int norm,
                              float eps, int8_t* __restrict__ q, float* __restrict__ scales,
                              int* __restrict__ sums, int k, int k_pad) {
    const size_t t = blockIdx.x;
    const RowInput<T> in{x + t * k, rin + t * k, mode};
    T* so = mode == INPUT_ADD ? sum_out + t * k : nullptr;
    quantize_row<REGS>(in, so, w, norm, eps, q + t * k_pad, scales + t, sums + t, k, k_pad);
}

#define QUANT(REGS, NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) bitnet_quant##REGS##_##NAME(        \
        const T* x, const T* r, int mode, T* sum_out, const T* w, int norm, float eps, int8_t* q, \
        float* s, int* sums, int k, int k_pad) {                                                  \
        quantize_rows<REGS>(x, r, mode, sum_out, w, norm, eps, q, s, sums, k, k_pad);             \
    }
#define QUANT_ALL(REGS) QUANT(REGS, f32, float) QUANT(REGS, bf16, __nv_bfloat16)
QUANT_ALL(4)
QUANT_ALL(8)
QUANT_ALL(12)

// ---------------------------------------------------------------------------------------------
// (b) GEMV for NT <= 8 tokens: one warp per group of 4 rows. The group's nb*256 bytes are read as
// 16-byte chunks, lane-strided: chunk c is block c/16, row (c/4)%4, bytes (c%4)*16.. of the row's
// block. Since 32 is a multiple of 16, a lane always meets the same row and byte offset, so the
// per-row reduction is a shuffle over lane bits 0, 1 and 4.
// One launch serves up to three matrices with the same input (q/k/v, gate/up): their groups are
// numbered one after the other. At decode sizes a GEMV is latency-bound (~5 us whatever the
// matrix), so three matrices in one launch cost about what one does.
// ---------------------------------------------------------------------------------------------
template <typename OutT>
struct GemvMat {
    const uint8_t* w;
    OutT* y;
    int out;
    float scale;
};

// Group `group`, numbered across m0, m1, m2: its matrix in m and its number there (-1: none).
template <typename OutT>
__device__ __forceinline__ int pick_group(const GemvMat<OutT>& m0, const GemvMat<OutT>& m1,
                                          const GemvMat<OutT>& m2, int group, GemvMat<OutT>& m) {
    const int g0 = (m0.out + 3) >> 2, g1 = (m1.out + 3) >> 2, g2 = (m2.out + 3) >> 2;
    m = m0;
    if (group >= g0) {
        group -= g0;
        m = m1;
        if (group >= g1) {
            group -= g1;
            m = m2;
            if (group >= g2) return -1;
        }
    }
    return group;
}

// One warp: its share of group `group` (numbered across m0, m1, m2) against NT tokens of
// activations q. With S > 1, S consecutive warps of the block share the group (split-K): warp s
// of them takes chunks lane + 32 (s + S j). 32 S is a multiple of 16, so a lane still meets one
// row and byte offset; the S warps' sums meet in `part` (i32: exact in any order) and warp 0 of
// them stores. Every warp of the block must call it then (it holds a barrier).
template <int NT, int S, typename OutT>
__device__ __forceinline__ void gemv_group(const GemvMat<OutT>& m0, const GemvMat<OutT>& m1,
                                           const GemvMat<OutT>& m2, int group, int s,
                                           const int8_t* __restrict__ q,
                                           const float* __restrict__ scales,
                                           const int* __restrict__ sums, int nb, int divide,
                                           int (*part)[4][NT]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    GemvMat<OutT> m;
    group = pick_group(m0, m1, m2, group, m);
    const size_t k_pad = (size_t)nb * 256;
    int acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0;
    if (group >= 0) {
        const uint4* wg = reinterpret_cast<const uint4*>(m.w + (size_t)group * nb * 256);
        const int chunks = nb * 16;
        const int j0 = (lane & 3) * 16;
#pragma unroll 4
        for (int c = lane + 32 * s; c < chunks; c += 32 * S) {
            const uint4 wv = __ldg(wg + c);
            const uint32_t wr[4] = {wv.x, wv.y, wv.z, wv.w};
            const int8_t* qb = q + (size_t)(c >> 4) * 256 + j0;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int4 a = *reinterpret_cast<const int4*>(qb + t * k_pad + 64 * k);
                    const int ar[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc[t] = __dp4a((int)((wr[e] >> (2 * k)) & MASK2), ar[e], acc[t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 1);
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 2);
        acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], 16);
    }
    const bool writer = (lane & 0x13) == 0;
    if (S > 1) {
        if (writer)
#pragma unroll
            for (int t = 0; t < NT; ++t) part[warp][lane >> 2][t] = acc[t];
        __syncthreads();
        if (s != 0) return;
        if (writer)
            for (int j = 1; j < S; ++j)
#pragma unroll
                for (int t = 0; t < NT; ++t) acc[t] += part[warp + j][lane >> 2][t];
    }
    if (group >= 0 && writer) {
        const int o = group * 4 + (lane >> 2);
        if (o < m.out) {
#pragma unroll
            for (int t = 0; t < NT; ++t)
                store_out(m.y, (size_t)t * m.out + o,
                          epilogue(acc[t] - sums[t], scales[t], m.scale, divide));
        }
    }
}

template <int NT, typename OutT>
__device__ void gemv_ternary(GemvMat<OutT> m0, GemvMat<OutT> m1, GemvMat<OutT> m2,
                             const int8_t* __restrict__ q, const float* __restrict__ scales,
                             const int* __restrict__ sums, int nb, int divide) {
    const int group = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    gemv_group<NT, 1>(m0, m1, m2, group, 0, q, scales, sums, nb, divide, nullptr);
}

#define GEMV(NT, NAME, OUTT)                                                                      \
    extern "C" __global__ void bitnet_gemv##NT##_##NAME(                                          \
        const uint8_t* w0, OUTT* y0, int out0, float scale0, const uint8_t* w1, OUTT* y1,         \
        int out1, float scale1, const uint8_t* w2, OUTT* y2, int out2, float scale2,              \
        const int8_t* q, const float* s, const int* sums, int nb, int divide) {                   \
        gemv_ternary<NT, OUTT>({w0, y0, out0, scale0}, {w1, y1, out1, scale1},                    \
                               {w2, y2, out2, scale2}, q, s, sums, nb, divide);                   \
    }
#define GEMV_ALL(NAME, OUTT)                                                                      \
    GEMV(1, NAME, OUTT) GEMV(2, NAME, OUTT) GEMV(3, NAME, OUTT) GEMV(4, NAME, OUTT)                \
    GEMV(5, NAME, OUTT) GEMV(6, NAME, OUTT) GEMV(7, NAME, OUTT) GEMV(8, NAME, OUTT)
GEMV_ALL(f32, float)
GEMV_ALL(bf16, __nv_bfloat16)

// Starts warp s's share (of S, as in gemv_group) of group `group`'s weights on their way from
// HBM to L2, one prefetch per 128-byte line. The "memory" clobber keeps loads issued before
// this call ahead of the prefetches.
template <int S, typename T>
__device__ __forceinline__ void prefetch_group(const GemvMat<T>& m0, const GemvMat<T>& m1,
                                               const GemvMat<T>& m2, int group, int s, int nb) {
    GemvMat<T> m;
    const int g = pick_group(m0, m1, m2, group, m);
    if (g < 0) return;
    const size_t bytes = (size_t)nb * 256;
    const uint8_t* wg = m.w + (size_t)g * bytes;
    for (size_t o = (size_t)((threadIdx.x & 31) + 32 * s) * 128; o < bytes; o += 32 * S * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(wg + o) : "memory");
}

// (a) + (b) for one token in one launch (a decode step's BitLinears): every block forms,
// normalizes and quantizes the input row itself (quantize_row into shared memory: 3-14 KB read
// from L2, far cheaper than a launch and a round trip through memory), then its 32 warps compute
// 32 / S groups, S warps per group (split-K, see gemv_group). The host picks S so that the grid
// stays within one block per SM (132 SMs: q/k/v, o, down S = 4; gate/up S = 1): each SM
// runs the prologue's serial chain once, with 32 warps to overlap it, and short weight loops.
// Block 0 stores the residual sum. REGS * ROW_THREADS >= k keeps the whole row in registers;
// REGS comes in steps of 4. Dynamic shared memory: nb * 256 bytes.
template <int REGS, int S, typename T>
__device__ void gemv_fused(GemvMat<T> m0, GemvMat<T> m1, GemvMat<T> m2, const T* __restrict__ x,
                           const T* __restrict__ r, int mode, T* __restrict__ sum_out,
                           const T* __restrict__ w, int norm, float eps, int k, int nb,
                           int divide) {
    extern __shared__ __align__(16) int8_t q[];
    __shared__ float scale;
    __shared__ int qsum;
    __shared__ int part[ROW_THREADS / 32][4][1];
    const int warp = threadIdx.x >> 5;
    const int group = blockIdx.x * ((blockDim.x >> 5) / S) + warp / S, s = warp % S;
    // The weights do not depend on the row: once the row's own loads are issued (so that they
    // do not queue behind the weights), start this warp's share towards L2 and quantize while
    // it travels.
    auto prefetch = [&]() { prefetch_group<S>(m0, m1, m2, group, s, nb); };
    const RowInput<T> in{x, r, mode};
    quantize_row<REGS>(in, blockIdx.x == 0 ? sum_out : nullptr, w, norm, eps, q, &scale, &qsum,
                       k, nb * 256, prefetch);
    __syncthreads();
    gemv_group<1, S>(m0, m1, m2, group, s, q, &scale, &qsum, nb, divide, part);
}

#define GEMV_FUSED(REGS, S, NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS)                                     \
        bitnet_gemv_fused##REGS##s##S##_##NAME(                                                   \
            const uint8_t* w0, T* y0, int out0, float scale0, const uint8_t* w1, T* y1, int out1, \
            float scale1, const uint8_t* w2, T* y2, int out2, float scale2, const T* x,           \
            const T* r, int mode, T* sum_out, const T* w, int norm, float eps, int k, int nb,     \
            int divide) {                                                                         \
        gemv_fused<REGS, S, T>({w0, y0, out0, scale0}, {w1, y1, out1, scale1},                    \
                               {w2, y2, out2, scale2}, x, r, mode, sum_out, w, norm, eps, k, nb,  \
                               divide);                                                           \
    }
#define GEMV_FUSED_S(REGS, NAME, T)                                                               \
    GEMV_FUSED(REGS, 1, NAME, T) GEMV_FUSED(REGS, 2, NAME, T) GEMV_FUSED(REGS, 4, NAME, T)        \
    GEMV_FUSED(REGS, 8, NAME, T)
#define GEMV_FUSED_ALL(REGS) GEMV_FUSED_S(REGS, f32, float) GEMV_FUSED_S(REGS, bf16, __nv_bfloat16)
GEMV_FUSED_ALL(4)
GEMV_FUSED_ALL(8)
GEMV_FUSED_ALL(12)

// ---------------------------------------------------------------------------------------------
// (c) GEMM for many tokens. Block tile: 64 rows (16 groups) x 64 tokens, K step 256 (one weight
// block). Each step stages the weight codes expanded to one byte each (0/1/2) and the int8
// activations in shared memory, rows padded to 272 bytes so that both the 16-byte dp4a reads and
// the 4-byte mma fragment reads are free of bank conflicts.
// ---------------------------------------------------------------------------------------------
#define BM 64
#define BN 64
#define SROW 272  // 256 + 16 bytes

// Stages K block b: weights of groups g0..g0+15 and activations of tokens t0..t0+63.
__device__ __forceinline__ void stage_block(const uint8_t* __restrict__ w,
                                            const int8_t* __restrict__ q, uint8_t* ws, int8_t* xs,
                                            int g0, int groups, int t0, int tokens, int nb, int b) {
    const size_t k_pad = (size_t)nb * 256;
    // Weights: 16 groups x 256 bytes = 256 chunks of 16 bytes.
    for (int c = threadIdx.x; c < 256; c += blockDim.x) {
        const int gi = c >> 4, within = c & 15;
        const int row = gi * 4 + (within >> 2), j0 = (within & 3) * 16;
        uint4 wv = make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
        if (g0 + gi < groups)
            wv = __ldg(reinterpret_cast<const uint4*>(w + ((size_t)(g0 + gi) * nb + b) * 256) + within);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            uint4 d;
            d.x = (wv.x >> (2 * k)) & MASK2;
            d.y = (wv.y >> (2 * k)) & MASK2;
            d.z = (wv.z >> (2 * k)) & MASK2;
            d.w = (wv.w >> (2 * k)) & MASK2;
            *reinterpret_cast<uint4*>(ws + row * SROW + 64 * k + j0) = d;
        }
    }
    // Activations: 64 tokens x 256 bytes = 1024 chunks of 16 bytes.
    for (int c = threadIdx.x; c < 1024; c += blockDim.x) {
        const int tok = c >> 4, off = (c & 15) * 16;
        int4 v = make_int4(0, 0, 0, 0);
        if (t0 + tok < tokens)
            v = *reinterpret_cast<const int4*>(q + (size_t)(t0 + tok) * k_pad + (size_t)b * 256 + off);
        *reinterpret_cast<int4*>(xs + tok * SROW + off) = v;
    }
}

template <typename OutT>
__device__ __forceinline__ void emit(OutT* y, int row, int tok, int out, int tokens, int acc,
                                     const float* scales, const int* sums, float scale, int divide) {
    if (row < out && tok < tokens)
        store_out(y, (size_t)tok * out + row, epilogue(acc - sums[tok], scales[tok], scale, divide));
}

// dp4a GEMM: 256 threads, each 4 rows (ty + 16i) x 4 tokens (tx + 16j).
template <typename OutT>
__device__ void gemm_dp4a(const uint8_t* __restrict__ w, const int8_t* __restrict__ q,
                          const float* __restrict__ scales, const int* __restrict__ sums,
                          OutT* __restrict__ y, int out, int nb, int tokens, float scale,
                          int divide) {
    __shared__ __align__(16) uint8_t ws[BM * SROW];
    __shared__ __align__(16) int8_t xs[BN * SROW];
    const int groups = (out + 3) >> 2;
    const int g0 = blockIdx.x * (BM / 4), t0 = blockIdx.y * BN;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    int acc[4][4] = {};
    for (int b = 0; b < nb; ++b) {
        stage_block(w, q, ws, xs, g0, groups, t0, tokens, nb, b);
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < 256; kk += 16) {
            int4 a[4], x[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const int4*>(ws + (ty + 16 * i) * SROW + kk);
#pragma unroll
            for (int j = 0; j < 4; ++j) x[j] = *reinterpret_cast<const int4*>(xs + (tx + 16 * j) * SROW + kk);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = __dp4a(a[i].x, x[j].x, acc[i][j]);
                    acc[i][j] = __dp4a(a[i].y, x[j].y, acc[i][j]);
                    acc[i][j] = __dp4a(a[i].z, x[j].z, acc[i][j]);
                    acc[i][j] = __dp4a(a[i].w, x[j].w, acc[i][j]);
                }
        }
        __syncthreads();
    }
    const int r0 = g0 * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
            emit(y, r0 + ty + 16 * i, t0 + tx + 16 * j, out, tokens, acc[i][j], scales, sums, scale, divide);
}

// Tensor-core GEMM: 128 threads = 4 warps in a 2 x 2 arrangement, each 32 rows x 32 tokens, with
// mma.sync m16n8k32 s8 x s8 -> s32 (sm_80+): 2 m-tiles x 4 n-tiles per 32-wide K step.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename OutT>
__device__ void gemm_mma(const uint8_t* __restrict__ w, const int8_t* __restrict__ q,
                         const float* __restrict__ scales, const int* __restrict__ sums,
                         OutT* __restrict__ y, int out, int nb, int tokens, float scale,
                         int divide) {
    __shared__ __align__(16) uint8_t ws[BM * SROW];
    __shared__ __align__(16) int8_t xs[BN * SROW];
    const int groups = (out + 3) >> 2;
    const int g0 = blockIdx.x * (BM / 4), t0 = blockIdx.y * BN;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // warp's row / token offset in the tile
    const int g = lane >> 2, tg = lane & 3;
    int acc[2][4][4] = {};
    for (int b = 0; b < nb; ++b) {
        stage_block(w, q, ws, xs, g0, groups, t0, tokens, nb, b);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 256; kk += 32) {
            uint32_t a[2][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const uint8_t* base = ws + (wm + 16 * i + g) * SROW + kk + 4 * tg;
                a[i][0] = *reinterpret_cast<const uint32_t*>(base);
                a[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * SROW);
                a[i][2] = *reinterpret_cast<const uint32_t*>(base + 16);
                a[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * SROW + 16);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int8_t* base = xs + (wn + 8 * j + g) * SROW + kk + 4 * tg;
                bf[j][0] = *reinterpret_cast<const uint32_t*>(base);
                bf[j][1] = *reinterpret_cast<const uint32_t*>(base + 16);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], a[i], bf[j]);
        }
        __syncthreads();
    }
    const int r0 = g0 * 4 + wm, tb = t0 + wn;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int row = r0 + 16 * i + g, tok = tb + 8 * j + 2 * tg;
            emit(y, row, tok, out, tokens, acc[i][j][0], scales, sums, scale, divide);
            emit(y, row, tok + 1, out, tokens, acc[i][j][1], scales, sums, scale, divide);
            emit(y, row + 8, tok, out, tokens, acc[i][j][2], scales, sums, scale, divide);
            emit(y, row + 8, tok + 1, out, tokens, acc[i][j][3], scales, sums, scale, divide);
        }
}

#define GEMM(KIND, NAME, OUTT)                                                                    \
    extern "C" __global__ void bitnet_gemm_##KIND##_##NAME(                                       \
        const uint8_t* w, const int8_t* q, const float* s, const int* sums, OUTT* y, int out,     \
        int nb, int tokens, float scale, int divide) {                                            \
        gemm_##KIND<OUTT>(w, q, s, sums, y, out, nb, tokens, scale, divide);                      \
    }
GEMM(dp4a, f32, float)
GEMM(dp4a, bf16, __nv_bfloat16)
GEMM(mma, f32, float)
GEMM(mma, bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// (e) BF16 weights [rows, cols] x activations [tokens, cols] (f32 or bf16) -> f32 [tokens, rows],
// f32 accumulation. One warp per row, NT <= 8 tokens per launch (the host loops over chunks).
// `vec` (host-checked: cols % 8 == 0, weight and activation rows 16-byte aligned) enables 16-byte
// weight and activation loads.
// ---------------------------------------------------------------------------------------------
// Eight consecutive activations from a 16-byte-aligned address, as f32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        v[2 * m] = __uint_as_float(u[m] << 16);
        v[2 * m + 1] = __uint_as_float(u[m] & 0xffff0000u);
    }
}

template <int NT, typename XT>
__device__ void dense_bf16(const __nv_bfloat16* __restrict__ w, const XT* __restrict__ x,
                           float* __restrict__ y, int rows, int cols, int vec) {
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const __nv_bfloat16* wr = w + (size_t)row * cols;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    int done = 0;
    if (vec) {
        const int chunks = cols >> 3;
#pragma unroll 4
        for (int c = lane; c < chunks; c += 32) {
            const uint4 wv = __ldg(reinterpret_cast<const uint4*>(wr) + c);
            const uint32_t wu[4] = {wv.x, wv.y, wv.z, wv.w};
            float wf[8];
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                wf[2 * m] = __uint_as_float(wu[m] << 16);
                wf[2 * m + 1] = __uint_as_float(wu[m] & 0xffff0000u);
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                float xf[8];
                load8(x + (size_t)t * cols + 8 * c, xf);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[t] = fmaf(wf[e], xf[e], acc[t]);
            }
        }
        done = chunks << 3;
    }
    for (int i = done + lane; i < cols; i += 32) {
        const float wf = __bfloat162float(wr[i]);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] = fmaf(wf, to_f32(x[(size_t)t * cols + i]), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        for (int o = 16; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t) y[(size_t)t * rows + row] = acc[t];
    }
}

#define DENSE(NT, NAME, XT)                                                                       \
    extern "C" __global__ void bitnet_dense##NT##_##NAME(const __nv_bfloat16* w, const XT* x,     \
                                                         float* y, int rows, int cols, int vec) { \
        dense_bf16<NT, XT>(w, x, y, rows, cols, vec);                                             \
    }
#define DENSE_ALL(NAME, XT)                                                                       \
    DENSE(1, NAME, XT) DENSE(2, NAME, XT) DENSE(3, NAME, XT) DENSE(4, NAME, XT)                    \
    DENSE(5, NAME, XT) DENSE(6, NAME, XT) DENSE(7, NAME, XT) DENSE(8, NAME, XT)
DENSE_ALL(f32, float)
DENSE_ALL(bf16, __nv_bfloat16)

// The 4-bit LM head (src/q4.rs, `--head q4`), one token per launch: y[row] = sum over 64-column
// blocks b of s_w[row, b] * s_x[b] * (q_w . q_x), bit-identical to the CPU reference
// (`tile_scalar`). Every block first quantizes the token into shared memory (one warp per
// 64-column block: absmax / 127, round half to even, and each lane's -8 * sum correction for
// the codes stored as q + 8); then four threads compute a row. The CPU keeps 16 lanes per row,
// lane l over columns 4l..4l+3 of every block (the low nibbles of bytes 4l.. for l < 8, the high
// ones of bytes 4(l-8).. after); thread j loads bytes 8j..8j+7 of each block (one 8-byte load)
// and carries lanes 2j, 2j+1, 2j+8 and 2j+9: exact integer sums, one f32 fused multiply-add per
// block each, then the CPU's pairwise lane order (l + 8 in the thread, + 4 and + 2 across the
// four threads, + 1 in the thread). Rows are interleaved in groups of 4, block by block (32
// bytes each); scales are row-major [rows, nb] f16. The grid strides over the rows, so the token
// is quantized once per block rather than once per row.
#define Q4_COLS 64
template <typename XT>
__device__ void q4_gemv(const uint8_t* __restrict__ codes, const __half* __restrict__ sw,
                        const XT* __restrict__ x, float* __restrict__ y, int rows, int cols,
                        int nb) {
    extern __shared__ __align__(16) unsigned char q4_smem[];
    int8_t* q = reinterpret_cast<int8_t*>(q4_smem);                      // nb * 64
    int* corr = reinterpret_cast<int*>(q4_smem + (size_t)nb * Q4_COLS);  // nb * 16
    float* sx = reinterpret_cast<float*>(corr + (size_t)nb * 16);        // nb
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int b = warp; b < nb; b += warps) {
        const int c0 = b * Q4_COLS + lane, c1 = c0 + 32;
        const float v0 = c0 < cols ? to_f32(x[c0]) : 0.0f, v1 = c1 < cols ? to_f32(x[c1]) : 0.0f;
        float m = fmaxf(fabsf(v0), fabsf(v1));
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        const float inv = m > 0.0f ? __fdiv_rn(127.0f, m) : 0.0f;
        auto quant = [inv](float v) {
            const float p = __fmul_rn(v, inv);
            return isnan(p) ? 0 : (int)rintf(fminf(fmaxf(p, -127.0f), 127.0f));
        };
        q[c0] = (int8_t)quant(v0);
        q[c1] = (int8_t)quant(v1);
        if (lane == 0) sx[b] = m > 0.0f ? __fdiv_rn(m, 127.0f) : 0.0f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nb * 16; i += blockDim.x) {
        const char4 c = reinterpret_cast<const char4*>(q)[i];
        corr[i] = -8 * (c.x + c.y + c.z + c.w);
    }
    __syncthreads();
    const int j = lane & 3;
    const unsigned int nibbles = 0x0F0F0F0Fu;
    const int step = gridDim.x * warps * 8;
    // The loop bound is uniform across the warp, so every lane reaches the shuffles.
    for (int base = (blockIdx.x * warps + warp) * 8; base < rows; base += step) {
        const int row = base + (lane >> 2);
        float a0 = 0.0f, a1 = 0.0f, a8 = 0.0f, a9 = 0.0f;  // lanes 2j, 2j+1, 2j+8, 2j+9
        if (row < rows) {
            const uint8_t* wb = codes + ((size_t)(row >> 2) * nb * 4 + (row & 3)) * 32 + 8 * j;
            const __half* sr = sw + (size_t)row * nb;
#pragma unroll 4
            for (int b = 0; b < nb; ++b) {
                const uint2 w = __ldg(reinterpret_cast<const uint2*>(wb + (size_t)b * 128));
                const int2 xlo = reinterpret_cast<const int2*>(q + b * Q4_COLS)[j];
                const int2 xhi = reinterpret_cast<const int2*>(q + b * Q4_COLS + 32)[j];
                const int2 clo = reinterpret_cast<const int2*>(corr + b * 16)[j];
                const int2 chi = reinterpret_cast<const int2*>(corr + b * 16 + 8)[j];
                const float s = __fmul_rn(__half2float(sr[b]), sx[b]);
                a0 = __fmaf_rn((float)__dp4a((int)(w.x & nibbles), xlo.x, clo.x), s, a0);
                a1 = __fmaf_rn((float)__dp4a((int)(w.y & nibbles), xlo.y, clo.y), s, a1);
                a8 = __fmaf_rn((float)__dp4a((int)((w.x >> 4) & nibbles), xhi.x, chi.x), s, a8);
                a9 = __fmaf_rn((float)__dp4a((int)((w.y >> 4) & nibbles), xhi.y, chi.y), s, a9);
            }
        }
        float p0 = a0 + a8, p1 = a1 + a9;  // lanes 2j, 2j+1 after the + 8 step
        p0 += __shfl_xor_sync(0xffffffffu, p0, 2);
        p1 += __shfl_xor_sync(0xffffffffu, p1, 2);
        p0 += __shfl_xor_sync(0xffffffffu, p0, 1);
        p1 += __shfl_xor_sync(0xffffffffu, p1, 1);
        if (row < rows && j == 0) y[row] = p0 + p1;
    }
}

#define Q4_GEMV(NAME, XT)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) bitnet_q4_gemv_##NAME(                      \
        const uint8_t* codes, const __half* sw, const XT* x, float* y, int rows, int cols,        \
        int nb) {                                                                                 \
        q4_gemv<XT>(codes, sw, x, y, rows, cols, nb);                                             \
    }
Q4_GEMV(f32, float)
Q4_GEMV(bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// (f) RMSNorm, one block per token (src/norm.rs): h = x * (1 / sqrt(mean(x^2) + eps)) in f32,
// rounded to T, then y = w * h rounded to T — transformers' LlamaRMSNorm rounding points. One
// launch instead of the eight candle ops it replaces.
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ void rms_norm_rows(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                              int h, float eps) {
    __shared__ float red[32];
    const T* xr = x + (size_t)blockIdx.x * h;
    T* yr = y + (size_t)blockIdx.x * h;
    float v[ROW_REGS], wv[ROW_REGS];
    load_row(plain(xr), h, v);
    load_row(plain(w), h, wv);
    const float inv = inv_rms(plain(xr), v, h, eps, red);
#pragma unroll
    for (int r = 0; r < ROW_REGS; ++r) {
        const int i = threadIdx.x + r * blockDim.x;
        if (i < h) store_out(yr, i, normed<T>(v[r], inv, wv[r]));
    }
    for (int i = ROW_REGS * blockDim.x + threadIdx.x; i < h; i += blockDim.x)
        store_out(yr, i, normed<T>(to_f32(xr[i]), inv, to_f32(w[i])));
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
    bitnet_rms_norm_f32(const float* x, const float* w, float* y, int h, float eps) {
    rms_norm_rows(x, w, y, h, eps);
}
extern "C" __global__ void __launch_bounds__(ROW_THREADS)
    bitnet_rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int h,
                         float eps) {
    rms_norm_rows(x, w, y, h, eps);
}

// ---------------------------------------------------------------------------------------------
// (g) Single-token attention against an f32 KV cache [kv_heads, cap, hd] (src/cuda/attention.rs).
// The position comes from device memory (*pos), never from a launch argument, so a captured CUDA
// graph replays unchanged at every step. RoPE is the half-split form with transformers' bf16
// rounding points: x*cos and rotate_half(x)*sin are each rounded to T, then their sum.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void rope_pair(float a, float b, float c, float s, float& ra, float& rb) {
    ra = round_to(__fsub_rn(round_to(__fmul_rn(a, c), T()), round_to(__fmul_rn(b, s), T())), T());
    rb = round_to(__fadd_rn(round_to(__fmul_rn(b, c), T()), round_to(__fmul_rn(a, s), T())), T());
}

// One block per kv head: writes x (rotated when `rope`) at row *pos of its head.
template <typename T>
__device__ void kv_append(const T* __restrict__ x, const T* __restrict__ cos,
                          const T* __restrict__ sin, float* __restrict__ cache,
                          const unsigned* __restrict__ pos, int hd, int cap, int limit,
                          int rope) {
    const int h = blockIdx.x, half = hd >> 1;
    const unsigned p = *pos;
    if (p >= (unsigned)limit) return;
    const T* xr = x + (size_t)h * hd;
    float* cr = cache + ((size_t)h * cap + p) * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = to_f32(xr[i]), b = to_f32(xr[i + half]);
        if (rope) {
            const size_t t = (size_t)p * half + i;
            rope_pair<T>(a, b, to_f32(cos[t]), to_f32(sin[t]), a, b);
        }
        cr[i] = a;
        cr[i + half] = b;
    }
}

#define ATT_KEYS 32    // keys per block of the partial pass
#define ATT_WARPS 8    // warps per block (256 threads: src/cuda/attention.rs launches that)
#define ATT_MAX_HD 256 // head_dim limit (8 values per lane)

// Block (head, split) attends to keys split*ATT_KEYS .. (those <= *pos) with an online softmax
// per warp (ATT_WARPS of them), merges its warps and writes [m, l, acc[hd]] to part[head][split];
// the head's last block to finish (a counter in `done`, reset afterwards) merges the splits.
// With knew/vnew (this token's keys and values, [nkv, hd] in T) the block whose split holds
// *pos takes that row from them instead of the cache, and the first query head of each kv group
// writes it to the cache (kv_append's values: no other block reads the row in this launch).
template <typename T>
__device__ void attn_decode(const T* __restrict__ q, const T* __restrict__ knew,
                            const T* __restrict__ vnew, const T* __restrict__ cos,
                            const T* __restrict__ sin, float* __restrict__ kc,
                            float* __restrict__ vc, const unsigned* __restrict__ pos,
                            float* __restrict__ part, unsigned* __restrict__ done,
                            T* __restrict__ y, int nh, int nkv, int hd, int cap, int limit,
                            float scale) {
    __shared__ float qs[ATT_MAX_HD], ks[ATT_MAX_HD], vs[ATT_MAX_HD];
    __shared__ float wm[32], wl[32];
    __shared__ float wacc[ATT_WARPS][ATT_MAX_HD];
    __shared__ bool last;
    const int head = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = ATT_WARPS;
    const int half = hd >> 1, rep = nh / nkv;
    const unsigned p = *pos;
    const bool valid = p < (unsigned)limit;
    const T* qr = q + (size_t)head * hd;
    for (int i = threadIdx.x; valid && i < half; i += blockDim.x) {
        const size_t t = (size_t)p * half + i;
        rope_pair<T>(to_f32(qr[i]), to_f32(qr[i + half]), to_f32(cos[t]), to_f32(sin[t]), qs[i],
                     qs[i + half]);
    }
    const int kvh = head / rep;
    const bool holds_new = knew != nullptr && valid && (unsigned)split == p / ATT_KEYS;
    if (holds_new) {
        const T* kr = knew + (size_t)kvh * hd;
        const T* vr = vnew + (size_t)kvh * hd;
        float* kw = kc + ((size_t)kvh * cap + p) * hd;
        float* vw = vc + ((size_t)kvh * cap + p) * hd;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const size_t t = (size_t)p * half + i;
            float a = to_f32(kr[i]), b = to_f32(kr[i + half]);
            rope_pair<T>(a, b, to_f32(cos[t]), to_f32(sin[t]), a, b);
            const float c = to_f32(vr[i]), d = to_f32(vr[i + half]);
            ks[i] = a;
            ks[i + half] = b;
            vs[i] = c;
            vs[i + half] = d;
            if (head % rep == 0) {
                kw[i] = a;
                kw[i + half] = b;
                vw[i] = c;
                vw[i + half] = d;
            }
        }
    }
    __syncthreads();
    const int j0 = split * ATT_KEYS;
    const int j1 = valid ? min(j0 + ATT_KEYS, (int)p + 1) : j0;
    float m = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    // Warp w takes keys j0 + w, j0 + w + 8, ...: all their K and V values are loaded first, so
    // the loads are in flight together rather than one key's latency after another.
    constexpr int KPW = ATT_KEYS / ATT_WARPS;
    float kv[KPW][8], vv[KPW][8];
#pragma unroll
    for (int u = 0; u < KPW; ++u) {
        const int j = j0 + warp + u * ATT_WARPS;
        const bool fresh = holds_new && (unsigned)j == p;
        const float* kr = fresh ? ks : kc + ((size_t)kvh * cap + j) * hd;
        const float* vr = fresh ? vs : vc + ((size_t)kvh * cap + j) * hd;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = lane + 32 * i;
            const bool in = j < j1 && d < hd;
            kv[u][i] = in ? kr[d] : 0.0f;
            vv[u][i] = in ? vr[d] : 0.0f;
        }
    }
#pragma unroll
    for (int u = 0; u < KPW; ++u) {
        if (j0 + warp + u * ATT_WARPS >= j1) break;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = lane + 32 * i;
            if (d < hd) s = fmaf(qs[d], kv[u][i], s);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        s *= scale;
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), e = expf(s - mn);
        l = fmaf(l, corr, e);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int d = lane + 32 * i;
            if (d < hd) acc[i] = fmaf(acc[i], corr, e * vv[u][i]);
        }
        m = mn;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) wacc[warp][d] = acc[i];
    }
    __syncthreads();
    float bm = -INFINITY;
    for (int w = 0; w < warps; ++w) bm = fmaxf(bm, wm[w]);
    float* out = part + ((size_t)head * splits + split) * (hd + 2);
    if (threadIdx.x == 0) {
        float bl = 0.0f;
        for (int w = 0; w < warps; ++w)
            if (wm[w] > -INFINITY) bl += wl[w] * expf(wm[w] - bm);
        out[0] = bm;
        out[1] = bl;
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < warps; ++w)
            if (wm[w] > -INFINITY) a += wacc[w][d] * expf(wm[w] - bm);
        out[2 + d] = a;
    }

    // The last block of this head merges (the threadFenceReduction pattern): parts are made
    // visible before the count, and read past L1 (__ldcg), since other blocks wrote them.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&done[head], 1u) == (unsigned)splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* ph = part + (size_t)head * splits * (hd + 2);
    float gm = -INFINITY;
    for (int s = 0; s < splits; ++s) gm = fmaxf(gm, __ldcg(ph + (size_t)s * (hd + 2)));
    float gl = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = __ldcg(ph + (size_t)s * (hd + 2));
        if (ms > -INFINITY) gl += __ldcg(ph + (size_t)s * (hd + 2) + 1) * expf(ms - gm);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = __ldcg(ph + (size_t)s * (hd + 2));
            if (ms > -INFINITY) a += __ldcg(ph + (size_t)s * (hd + 2) + 2 + d) * expf(ms - gm);
        }
        store_out(y, (size_t)head * hd + d, a / gl);
    }
    if (threadIdx.x == 0) done[head] = 0;  // ready for the next launch (a graph replays it)
}

#define ATTN(NAME, T)                                                                             \
    extern "C" __global__ void bitnet_kv_append_##NAME(const T* x, const T* cos, const T* sin,    \
                                                       float* cache, const unsigned* pos, int hd, \
                                                       int cap, int limit, int rope) {            \
        kv_append<T>(x, cos, sin, cache, pos, hd, cap, limit, rope);                              \
    }                                                                                             \
    extern "C" __global__ void bitnet_attn_decode_##NAME(                                         \
        const T* q, const T* knew, const T* vnew, const T* cos, const T* sin, float* kc,          \
        float* vc, const unsigned* pos, float* part, unsigned* done, T* y, int nh, int nkv,       \
        int hd, int cap, int limit, float scale) {                                                \
        attn_decode<T>(q, knew, vnew, cos, sin, kc, vc, pos, part, done, y, nh, nkv, hd, cap,     \
                       limit, scale);                                                             \
    }
ATTN(f32, float)
ATTN(bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// (h) relu(gate)^2 * up (src/act.rs): the square rounded to T, then the product.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void relu2_mul(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                          int n) {
    const RowInput<T> in{g, u, INPUT_RELU2_MUL};
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        store_out(y, i, in(i));
}

extern "C" __global__ void bitnet_relu2_mul_f32(const float* g, const float* u, float* y, int n) {
    relu2_mul(g, u, y, n);
}
extern "C" __global__ void bitnet_relu2_mul_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u,
                                                 __nv_bfloat16* y, int n) {
    relu2_mul(g, u, y, n);
}

// ---------------------------------------------------------------------------------------------
// (i) Greedy decoding on the device (src/cuda/greedy.rs). A decode step's state is two u32s in
// device memory, [token, position]: the step embeds `token` (bitnet_embed_row), runs at
// `position`, and bitnet_greedy_next replaces `token` by the argmax of the logits and advances
// `position`, so the next replay of a recorded step needs nothing from the host.
// ---------------------------------------------------------------------------------------------

// Row state[0] of a BF16 table [rows, cols] as T (exact: every bf16 is an f32 and a bf16); zeros
// for an id out of range (bitnet_greedy_next's NaN marker), which the host reports as an error.
template <typename T>
__device__ void embed_row(const __nv_bfloat16* __restrict__ table, const uint32_t* state,
                          T* __restrict__ out, int rows, int cols) {
    const uint32_t id = state[0];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < cols)
        store_out(out, i, id < (uint32_t)rows ? __bfloat162float(table[(size_t)id * cols + i]) : 0.0f);
}

extern "C" __global__ void bitnet_embed_row_f32(const __nv_bfloat16* table, const uint32_t* state,
                                                float* out, int rows, int cols) {
    embed_row(table, state, out, rows, cols);
}
extern "C" __global__ void bitnet_embed_row_bf16(const __nv_bfloat16* table, const uint32_t* state,
                                                 __nv_bfloat16* out, int rows, int cols) {
    embed_row(table, state, out, rows, cols);
}

// f32::total_cmp's order as an unsigned integer (ascending; -0 below +0).
__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A logit and its index as one key whose maximum is the largest logit at the smallest index,
// the host sampler's argmax (`>` over ascending indices, as torch.argmax): the high word orders
// floats as integers (-0 counts as +0, which `>` cannot tell apart), the low word is the
// complement of the index.
__device__ __forceinline__ unsigned long long argmax_key(float v, int i) {
    const uint32_t ord = order_key(v == 0.0f ? 0.0f : v);
    return ((unsigned long long)ord << 32) | (0xffffffffu - (uint32_t)i);
}

#define GREEDY_THREADS 1024

// One block: state[0] = argmax of logits[0..n) (0xffffffff if any is NaN), state[1] += 1.
extern "C" __global__ void __launch_bounds__(GREEDY_THREADS)
    bitnet_greedy_next(const float* __restrict__ logits, int n, uint32_t* state) {
    __shared__ unsigned long long best[GREEDY_THREADS / 32];
    unsigned long long key = 0;
    int nan = 0;
    const int n4 = (reinterpret_cast<size_t>(logits) & 15) == 0 ? n >> 2 : 0;
    for (int c = threadIdx.x; c < n4; c += GREEDY_THREADS) {
        const float4 v = reinterpret_cast<const float4*>(logits)[c];
        const float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            nan |= isnan(e[j]);
            key = max(key, argmax_key(e[j], 4 * c + j));
        }
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += GREEDY_THREADS) {
        nan |= isnan(logits[i]);
        key = max(key, argmax_key(logits[i], i));
    }
    for (int o = 16; o > 0; o >>= 1) key = max(key, __shfl_xor_sync(0xffffffffu, key, o));
    if ((threadIdx.x & 31) == 0) best[threadIdx.x >> 5] = key;
    nan = __syncthreads_or(nan);
    if (threadIdx.x < 32) {
        key = best[threadIdx.x];
        for (int o = 16; o > 0; o >>= 1) key = max(key, __shfl_xor_sync(0xffffffffu, key, o));
        if (threadIdx.x == 0) {
            state[0] = nan ? 0xffffffffu : 0xffffffffu - (uint32_t)key;
            state[1] += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (j) Sampling on the device (src/cuda/sample.rs): temperature, top-k, top-p and min-p, as the
// host sampler filters (transformers' order), drawn without sorting. A token's weight is its
// softmax numerator in 2^S fixed point, W = rint(exp(l/T - max/T) * 2^S) with
// S = 62 - ceil(log2 n), so every sum is an exact u64 whatever the summation order: the draw is
// deterministic, and a CPU twin that sorts (tests/cuda.rs) finds the same token bit for bit.
//
//   bitnet_sample_max        grid   the largest logit (its order key) and a NaN flag
//   bitnet_sample_hist x6    grid   passes 0-2 (top-k) histogram the count, passes 3-5 (top-p)
//                                   the mass, by 11, 11, then 10 bits of the order key below the
//                                   prefix found so far; the last block to finish picks the bin
//                                   where the count (mass) from the top reaches k (top_p of the
//                                   top-k set's mass), so after the third pass the prefix is the
//                                   order key of the set's last rank. Pass 3 also stores every W.
//   bitnet_sample_draw       grid   each block's kept mass; the last block finds the chunk, then
//                                   the id whose cumulative kept mass (in id order) passes
//                                   u * kept, u from splitmix64(seed, position)
//
// Ranks follow the host's: logit descending in f32::total_cmp order, then id ascending; ties at
// a cut are kept in id order up to the count or mass. The top-p walk stops inside the top-k set
// (its target is at most that set's mass), so its histograms need not exclude anything, only
// its total does. min-p keeps W >= min_p * 2^S.
// ---------------------------------------------------------------------------------------------

#define SAMPLE_THREADS 256
#define SAMPLE_CHUNK 1024 // ids per block
#define SAMPLE_MAX_BLOCKS 1024
#define SAMPLE_BINS 2048

// The scratch a draw works in (zeroed once; each draw leaves it zeroed for the next).
struct SampleWork {
    unsigned long long total; // sum of W over the top-k set (all tokens without top-k)
    unsigned long long above; // count or mass of the ranks above the prefix's bin so far
    unsigned long long ties;  // tokens at the top-p cut's order key that it keeps
    unsigned long long kties; // tokens at the top-k cut's order key that it keeps
    uint32_t maxord, nan, done, prefix, kcut, pad;
    unsigned long long hist[SAMPLE_BINS];
    unsigned long long part_mass[SAMPLE_MAX_BLOCKS];
    uint32_t part_ties[SAMPLE_MAX_BLOCKS];
    // then W[n] (u64)
};
static_assert(sizeof(SampleWork) == 28728, "SAMPLE_WORK_BYTES in src/cuda/sample.rs");

// params: [temperature, top_p, min_p (f32 bits), top_k (0: off), seed low, seed high]
struct SampleParams {
    float temperature, top_p, min_p;
    uint32_t top_k;
    unsigned long long seed;
};
__device__ __forceinline__ SampleParams load_params(const uint32_t* p) {
    SampleParams s;
    s.temperature = __uint_as_float(p[0]);
    s.top_p = __uint_as_float(p[1]);
    s.min_p = __uint_as_float(p[2]);
    s.top_k = p[3];
    s.seed = ((unsigned long long)p[5] << 32) | p[4];
    return s;
}

// The float whose order_key (section (i)) is k.
__device__ __forceinline__ float from_order_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ int weight_shift(int n) {
    return 62 - (n > 1 ? 32 - __clz(n - 1) : 0);
}

// exp(x) for x <= 0, then times 2^s and rounded to an integer: Cody-Waite reduction by ln 2 and
// a degree-13 Taylor polynomial, every step one rounded f64 operation (the twin repeats them).
__device__ __forceinline__ unsigned long long fixed_exp(double x, int s) {
    if (!(x >= -44.0)) return 0; // e^-44 * 2^62 < 0.5 (and NaN)
    const double k = rint(__dmul_rn(x, 1.4426950408889634));
    double r = __fma_rn(-k, 6.93147180369123816490e-01, x);
    r = __fma_rn(-k, 1.90821492927058770002e-10, r);
    double p = 1.6059043836821613e-10;
    p = __fma_rn(p, r, 2.08767569878681e-09);
    p = __fma_rn(p, r, 2.505210838544172e-08);
    p = __fma_rn(p, r, 2.755731922398589e-07);
    p = __fma_rn(p, r, 2.7557319223985893e-06);
    p = __fma_rn(p, r, 2.48015873015873e-05);
    p = __fma_rn(p, r, 0.0001984126984126984);
    p = __fma_rn(p, r, 0.001388888888888889);
    p = __fma_rn(p, r, 0.008333333333333333);
    p = __fma_rn(p, r, 0.041666666666666664);
    p = __fma_rn(p, r, 0.16666666666666666);
    p = __fma_rn(p, r, 0.5);
    p = __fma_rn(p, r, 1.0);
    p = __fma_rn(p, r, 1.0);
    const long long e = (long long)k + s;
    return __double2ull_rn(__dmul_rn(p, __longlong_as_double((1023 + e) << 52)));
}

// W of logit l given the largest logit (and its order key), as the host computes z:
// l / T - max / T in f32. The largest weighs exactly 2^s (also when it is +inf).
__device__ __forceinline__ unsigned long long token_weight(float l, uint32_t ord, float maxv,
                                                           uint32_t maxord, float t, int s) {
    if (ord == maxord) return 1ull << s;
    const float z = __fsub_rn(__fdiv_rn(l, t), __fdiv_rn(maxv, t));
    return fixed_exp((double)z, s);
}

// Inclusive prefix sum over the block (SAMPLE_THREADS threads); `total` gets the block's sum.
template <typename V>
__device__ V block_scan(V v, V* red, V& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        const V u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    if (lane == 31) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        V w = lane < SAMPLE_THREADS / 32 ? red[lane] : 0;
        for (int o = 1; o < SAMPLE_THREADS / 32; o <<= 1) {
            const V u = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += u;
        }
        if (lane < SAMPLE_THREADS / 32) red[lane] = w;
    }
    __syncthreads();
    if (warp > 0) v += red[warp - 1];
    total = red[SAMPLE_THREADS / 32 - 1];
    __syncthreads();
    return v;
}

// True in every thread of the block that finished last (after its writes were made visible).
__device__ __forceinline__ bool last_block(uint32_t* done) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    return last;
}

__device__ __forceinline__ unsigned long long* weights_of(SampleWork* w) {
    return reinterpret_cast<unsigned long long*>(w + 1);
}

__device__ __forceinline__ bool top_k_on(const SampleParams& p, int n) {
    return p.top_k > 0 && p.top_k < (uint32_t)n;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    bitnet_sample_max(const float* __restrict__ logits, int n, SampleWork* work) {
    const int base = blockIdx.x * SAMPLE_CHUNK;
    uint32_t m = 0;
    int nan = 0;
    for (int i = base + threadIdx.x; i < min(n, base + SAMPLE_CHUNK); i += SAMPLE_THREADS) {
        const float l = logits[i];
        nan |= isnan(l);
        if (!isnan(l)) m = max(m, order_key(l));
    }
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    nan = __syncthreads_or(nan);
    if ((threadIdx.x & 31) == 0) atomicMax(&work->maxord, m);
    if (threadIdx.x == 0 && nan) atomicOr(&work->nan, 1u);
}

// Pass 0-2: the top-k cut (counts); 3-5: the top-p cut (masses). The level (pass % 3) picks the
// key bits: 0: 31..21; 1: 20..10 (below the bin found at level 0); 2: 9..0.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    bitnet_sample_hist(const float* __restrict__ logits, int n, const uint32_t* params,
                       SampleWork* work, int pass) {
    __shared__ unsigned long long h[SAMPLE_BINS];
    __shared__ unsigned long long red[SAMPLE_THREADS / 32];
    const SampleParams p = load_params(params);
    const bool topk = top_k_on(p, n), count = pass < 3;
    const bool on = count ? topk : p.top_p < 1.0f;
    const int level = pass % 3;
    if (!on && pass != 3) return; // pass 3 stores the weights and the total in any case
    const int shift = level == 0 ? 21 : level == 1 ? 10 : 0;
    const int bins = level == 2 ? 1024 : SAMPLE_BINS;
    const uint32_t maxord = work->maxord, prefix = work->prefix, kcut = work->kcut;
    const float maxv = from_order_key(maxord);
    const int s = weight_shift(n);
    unsigned long long* wts = weights_of(work);
    for (int b = threadIdx.x; b < bins; b += SAMPLE_THREADS) h[b] = 0;
    __syncthreads();
    const int base = blockIdx.x * SAMPLE_CHUNK;
    unsigned long long sum = 0;
    for (int i = base + threadIdx.x; i < min(n, base + SAMPLE_CHUNK); i += SAMPLE_THREADS) {
        const float l = logits[i];
        if (isnan(l)) continue;
        const uint32_t ord = order_key(l);
        unsigned long long m = 1;
        if (pass == 3) {
            m = token_weight(l, ord, maxv, maxord, p.temperature, s);
            wts[i] = m;
            // The total over the top-k set: the ranks above its cut here, its ties below.
            if (!topk || ord > kcut) sum += m;
        } else if (!count) {
            m = wts[i];
        }
        const bool inside = level == 0 || (ord >> (shift + (level == 1 ? 11 : 10))) == prefix;
        if (on && m && inside) atomicAdd(&h[(ord >> shift) & (bins - 1)], m);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += SAMPLE_THREADS)
        if (h[b]) atomicAdd(&work->hist[b], h[b]);
    if (pass == 3) {
        unsigned long long total;
        block_scan(sum, red, total);
        if (threadIdx.x == 0) atomicAdd(&work->total, total);
    }
    if (!last_block(&work->done)) return;
    if (pass == 3 && topk && threadIdx.x == 0) {
        // Every token at the top-k cut weighs the same.
        const unsigned long long w =
            token_weight(from_order_key(kcut), kcut, maxv, maxord, p.temperature, s);
        work->total += __ldcg(&work->kties) * w;
    }
    if (!on) {
        if (threadIdx.x == 0) work->done = 0;
        return;
    }

    // The last block: the bin in which the count (mass) from the top reaches the target (one
    // exists: the target is at most what lies below the prefix, which the bins hold).
    __shared__ int found;
    __shared__ unsigned long long before;
    if (threadIdx.x == 0) found = 0, before = 0;
    __syncthreads();
    const unsigned long long target =
        count ? p.top_k
              : (unsigned long long)ceil(__dmul_rn((double)p.top_p, (double)__ldcg(&work->total)));
    const unsigned long long rem = target - (level == 0 ? 0 : __ldcg(&work->above));
    const int per = bins / SAMPLE_THREADS;
    const int hi = bins - 1 - threadIdx.x * per; // this thread's bins: hi, hi - 1, ...
    unsigned long long mine = 0;
    for (int j = 0; j < per; ++j) mine += __ldcg(&work->hist[hi - j]);
    unsigned long long all;
    const unsigned long long incl = block_scan(mine, red, all);
    const unsigned long long excl = incl - mine;
    if (excl < rem && rem <= incl) {
        unsigned long long c = excl;
        for (int j = 0; j < per; ++j) {
            const unsigned long long m = __ldcg(&work->hist[hi - j]);
            if (c + m >= rem) {
                found = hi - j;
                before = c;
                break;
            }
            c += m;
        }
    }
    __syncthreads();
    for (int j = 0; j < per; ++j) work->hist[hi - j] = 0;
    if (threadIdx.x == 0) {
        const uint32_t key = (prefix << (level == 2 ? 10 : 11)) | (uint32_t)found;
        work->above = (level == 0 ? 0 : work->above) + before;
        work->prefix = key;
        if (level == 2) {
            // Every token at the cut's key has the same weight (count 1); keep as many as reach
            // the target, in id order.
            const unsigned long long left = rem - before;
            if (count) {
                work->kcut = key;
                work->kties = left;
                work->prefix = 0;
                work->above = 0;
            } else {
                const unsigned long long w =
                    token_weight(from_order_key(key), key, maxv, maxord, p.temperature, s);
                work->ties = (left + w - 1) / w;
            }
        }
        work->done = 0;
    }
}

// splitmix64 of the seed and the position: a uniform double in [0, 1).
__device__ __forceinline__ double draw_uniform(unsigned long long seed, uint32_t position) {
    unsigned long long z = seed + (position + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

// Whether a token is kept: 1 above the cut, 2 at its key (kept by rank among those), 0 not.
__device__ __forceinline__ int kept_class(uint32_t ord, unsigned long long w, bool cut_on,
                                          uint32_t cut, double wmin) {
    if (w == 0 || (double)w < wmin) return 0;
    if (!cut_on || ord > cut) return 1;
    return ord == cut ? 2 : 0;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    bitnet_sample_draw(const float* __restrict__ logits, int n, const uint32_t* params,
                       SampleWork* work, uint32_t* state) {
    __shared__ unsigned long long red[SAMPLE_THREADS / 32];
    __shared__ uint32_t redc[SAMPLE_THREADS / 32];
    const SampleParams p = load_params(params);
    // The last rank kept: top-p's cut (inside the top-k set), else top-k's.
    const bool topp = p.top_p < 1.0f, topk = top_k_on(p, n), cut_on = topp || topk;
    const uint32_t cut = topp ? work->prefix : work->kcut;
    const int s = weight_shift(n);
    const double wmin = p.min_p > 0.0f ? __dmul_rn((double)p.min_p, (double)(1ull << s)) : 0.0;
    const unsigned long long* wts = weights_of(work);
    const int base = blockIdx.x * SAMPLE_CHUNK;
    unsigned long long mass = 0;
    uint32_t ties = 0;
    for (int i = base + threadIdx.x; i < min(n, base + SAMPLE_CHUNK); i += SAMPLE_THREADS) {
        const unsigned long long w = wts[i];
        const int k = kept_class(order_key(logits[i]), w, cut_on, cut, wmin);
        if (k == 1) mass += w;
        ties += k == 2;
    }
    unsigned long long bm;
    uint32_t bt;
    block_scan(mass, red, bm);
    block_scan(ties, redc, bt);
    if (threadIdx.x == 0) {
        work->part_mass[blockIdx.x] = bm;
        work->part_ties[blockIdx.x] = bt;
    }
    if (!last_block(&work->done)) return;

    // The last block: chunk masses in id order (the tied tokens kept by rank), then the chunk
    // and the id where the cumulative mass passes the draw.
    __shared__ unsigned long long chunk_before, target;
    __shared__ uint32_t chunk_ties_before;
    __shared__ int chunk;
    const int blocks = gridDim.x;
    const unsigned long long m_ties = topp ? __ldcg(&work->ties) : topk ? __ldcg(&work->kties) : 0;
    const uint32_t maxord = __ldcg(&work->maxord);
    const unsigned long long w_cut =
        cut_on ? token_weight(from_order_key(cut), cut, from_order_key(maxord), maxord,
                              p.temperature, s)
               : 0;
    const int per = SAMPLE_MAX_BLOCKS / SAMPLE_THREADS;
    uint32_t ct[per];
    unsigned long long cm[per];
    uint32_t my_ties = 0;
    for (int j = 0; j < per; ++j) {
        const int b = threadIdx.x * per + j;
        ct[j] = b < blocks ? __ldcg(&work->part_ties[b]) : 0;
        cm[j] = b < blocks ? __ldcg(&work->part_mass[b]) : 0;
        my_ties += ct[j];
    }
    uint32_t all_ties;
    uint32_t tie_pos = block_scan(my_ties, redc, all_ties) - my_ties;
    unsigned long long my_mass = 0;
    for (int j = 0; j < per; ++j) {
        const unsigned long long before = tie_pos;
        const unsigned long long keep =
            before >= m_ties ? 0 : min((unsigned long long)ct[j], m_ties - before);
        cm[j] += keep * w_cut;
        tie_pos += ct[j];
        my_mass += cm[j];
    }
    unsigned long long kept;
    unsigned long long pos = block_scan(my_mass, red, kept) - my_mass;
    const bool bad = __ldcg(&work->nan) != 0 || kept == 0;
    const double u = draw_uniform(p.seed, state[1]);
    unsigned long long r = (unsigned long long)__dmul_rn(u, (double)kept);
    if (r >= kept) r = kept - 1;
    tie_pos -= my_ties;
    for (int j = 0; j < per; ++j) {
        if (!bad && pos <= r && r < pos + cm[j]) {
            chunk = threadIdx.x * per + j;
            chunk_before = pos;
            chunk_ties_before = tie_pos;
            target = r;
        }
        pos += cm[j];
        tie_pos += ct[j];
    }
    __syncthreads();
    if (!bad) {
        // Walk the chunk: four consecutive ids per thread, in id order across threads.
        const int i0 = chunk * SAMPLE_CHUNK + 4 * threadIdx.x;
        unsigned long long w[4];
        int k[4];
        uint32_t nt = 0;
        for (int j = 0; j < 4; ++j) {
            const int i = i0 + j;
            w[j] = i < n ? wts[i] : 0;
            k[j] = i < n ? kept_class(order_key(logits[i]), w[j], cut_on, cut, wmin) : 0;
            nt += k[j] == 2;
        }
        uint32_t tt;
        uint32_t tpos = chunk_ties_before + block_scan(nt, redc, tt) - nt;
        unsigned long long mm = 0;
        for (int j = 0; j < 4; ++j) {
            if (k[j] == 2) w[j] = tpos++ < m_ties ? w[j] : 0;
            else if (k[j] == 0) w[j] = 0;
            mm += w[j];
        }
        unsigned long long cmass;
        unsigned long long c = chunk_before + block_scan(mm, red, cmass) - mm;
        for (int j = 0; j < 4; ++j) {
            if (c <= target && target < c + w[j]) state[0] = (uint32_t)(i0 + j);
            c += w[j];
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (bad) state[0] = 0xffffffffu;
        state[1] += 1;
        work->total = 0;
        work->above = 0;
        work->ties = 0;
        work->kties = 0;
        work->kcut = 0;
        work->maxord = 0;
        work->nan = 0;
        work->done = 0;
        work->prefix = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// (k) Repetition penalty on the device (src/cuda/penalty.rs), before the argmax or the draw: the
// host sampler's (transformers' repetition_penalty) over the last `window` tokens, each distinct
// id once: a logit l becomes l * p if negative, else l / p. The tokens live in a ring that each
// step extends with its input token (state[0]), so a recorded step penalizes without the host.
// An id is penalized by the ring entry that first stamps seen[id] with this step's epoch, so
// repeated ids need neither sorting nor a pass per entry.
//
// hist: [penalty (f32 bits), window, epoch, count, ring[window]]; seen: [n], zeroed with the epoch.
// ---------------------------------------------------------------------------------------------

#define PENALTY_THREADS 1024

extern "C" __global__ void __launch_bounds__(PENALTY_THREADS)
    bitnet_repeat_penalty(float* __restrict__ logits, int n, const uint32_t* __restrict__ state,
                          uint32_t* __restrict__ hist, uint32_t* __restrict__ seen) {
    __shared__ uint32_t epoch, live;
    const uint32_t window = hist[1];
    uint32_t* ring = hist + 4;
    if (threadIdx.x == 0) {
        const uint32_t count = hist[3];
        epoch = hist[2] + 1;
        live = window == 0 ? 0 : min(count + 1, window);
        if (window > 0) ring[count % window] = state[0];
        hist[2] = epoch;
        hist[3] = count + 1;
    }
    __syncthreads();
    const float p = __uint_as_float(hist[0]);
    for (uint32_t i = threadIdx.x; i < live; i += PENALTY_THREADS) {
        const uint32_t t = ring[i];
        // Ids past the logits (NAN_TOKEN after a NaN step) are skipped, as on the host.
        if (t < (uint32_t)n && atomicExch(&seen[t], epoch) != epoch) {
            const float l = logits[t];
            logits[t] = l < 0.0f ? __fmul_rn(l, p) : __fdiv_rn(l, p);
        }
    }
}
