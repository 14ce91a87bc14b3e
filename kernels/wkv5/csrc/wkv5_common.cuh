// Shared pieces of the WKV5 kernels: tensor-core fragments (mma.sync m16n8k16, bf16 in, fp32 out),
// asynchronous chunk loads, and the per-head decay tables.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16), with g = lane / 4 and q = lane % 4:
//   A (16x16, row major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 8+2q..), a3 = (g+8, 8+2q..)
//   B (16x8, "col"):      b0 = (k = 2q..2q+1, n = g), b1 = (k = 8+2q.., n = g)
//   C (16x8, fp32):       c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..2q+1)
// Operands come from shared memory through ldmatrix (four 8x8 tiles per instruction): arrays stay as the
// chunk's rows [step][channel], and the .trans form gives the fragments of their transposes, so no kernel
// writes a transposed copy. States stay in registers as C fragments and are reused as B fragments.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

namespace wkv5 {

constexpr int kSub = 16;            // steps per sub-block: the unit of the in-register recurrence
constexpr float kMidLogDecayMin = -10.0f;  // midpoint factors w^(+-8) stay inside fp32/bf16 range

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
}

__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 tiles; lanes 8m..8m+7 give the row addresses of tile m (16-byte aligned rows).
__device__ __forceinline__ void ldsm4(uint32_t x[4], const __nv_bfloat16* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm4_t(uint32_t x[4], const __nv_bfloat16* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                 : "r"(a));
}

// A fragment of rows [m0, m0+16) and reduction columns [k0, k0+16) of a row-major [m][k] bf16 array.
__device__ __forceinline__ void load_a(uint32_t a[4], const __nv_bfloat16* s, int ld, int m0, int k0, int lane) {
    ldsm4(a, s + (m0 + (lane & 15)) * ld + k0 + 8 * (lane >> 4));
}

// The same A fragment of X^T, where X is stored row-major [k][m].
__device__ __forceinline__ void load_a_t(uint32_t a[4], const __nv_bfloat16* s, int ld, int m0, int k0, int lane) {
    ldsm4_t(a, s + (k0 + (lane & 7) + 8 * (lane >> 4)) * ld + m0 + 8 * ((lane >> 3) & 1));
}

// B fragments of output columns [n0, n0+8) (b[0], b[1]) and [n0+8, n0+16) (b[2], b[3]), reduction rows
// [k0, k0+16), from an [n][k] bf16 array.
__device__ __forceinline__ void load_b2(uint32_t b[4], const __nv_bfloat16* s, int ld, int n0, int k0, int lane) {
    ldsm4(b, s + (n0 + (lane & 7) + 8 * (lane >> 4)) * ld + k0 + 8 * ((lane >> 3) & 1));
}

// The same B fragments from a [k][n] bf16 array (the chunk's rows, k = step).
__device__ __forceinline__ void load_b2_t(uint32_t b[4], const __nv_bfloat16* s, int ld, int n0, int k0, int lane) {
    ldsm4_t(b, s + (k0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + n0 + 8 * (lane >> 4));
}

// A state X (16 rows owned by this warp, N columns) held as N/8 C fragments, used as the B operand of
// act (16 x N) . X^T: reduction over X's columns (k-tile kt), output columns = X's rows (half h).
template <int N>
__device__ __forceinline__ void state_as_b(const float x[N / 8][4], int kt, int h, uint32_t& b0, uint32_t& b1) {
    b0 = pack_bf16(x[2 * kt][2 * h], x[2 * kt][2 * h + 1]);
    b1 = pack_bf16(x[2 * kt + 1][2 * h], x[2 * kt + 1][2 * h + 1]);
}

// A 16x16 product held as two C fragments (column halves), reused as an A fragment.
__device__ __forceinline__ void c_to_a(const float c[2][4], uint32_t a[4]) {
    a[0] = pack_bf16(c[0][0], c[0][1]);
    a[1] = pack_bf16(c[0][2], c[0][3]);
    a[2] = pack_bf16(c[1][0], c[1][1]);
    a[3] = pack_bf16(c[1][2], c[1][3]);
}

// out (16 x 16: the warp's rows of the result) = act[m0:m0+16, :] . X^T, X the warp's state rows.
template <int N>
__device__ __forceinline__ void act_times_state(float out[2][4], const __nv_bfloat16* act, int ld, int m0,
                                                const float x[N / 8][4], int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[h][e] = 0.f;
#pragma unroll
    for (int kt = 0; kt < N / 16; ++kt) {
        uint32_t a[4];
        load_a(a, act, ld, m0, kt * 16, lane);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint32_t b0, b1;
            state_as_b<N>(x, kt, h, b0, b1);
            mma16816(out[h], a, b0, b1);
        }
    }
}

// Two 16x16 products over the N channels of the chunk's rows m0..m0+15, sharing the A fragments:
// tile[m][n] = A[m0+m] . B[m0+n]  and  xs[m][n] = A[m0+m] . X[n], X the warp's 16 state rows (C fragments).
template <int N>
__device__ __forceinline__ void tile_and_state(float tile[2][4], float xs[2][4], const __nv_bfloat16* a_s,
                                               const __nv_bfloat16* b_s, int ld, int m0, const float x[N / 8][4],
                                               int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) tile[h][e] = xs[h][e] = 0.f;
#pragma unroll
    for (int kt = 0; kt < N / 16; ++kt) {
        uint32_t a[4], b[4];
        load_a(a, a_s, ld, m0, 16 * kt, lane);
        load_b2(b, b_s, ld, m0, 16 * kt, lane);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint32_t b0, b1;
            mma16816(tile[h], a, b[2 * h], b[2 * h + 1]);
            state_as_b<N>(x, kt, h, b0, b1);
            mma16816(xs[h], a, b0, b1);
        }
    }
}

// 16x16 product P[m][n] = sum_k A[m0+m][k] B[n0+n][k] over k in [0, K), both row-major with k contiguous.
template <int K>
__device__ __forceinline__ void tile16(float out[2][4], const __nv_bfloat16* a_s, int lda, int m0,
                                       const __nv_bfloat16* b_s, int ldb, int n0, int lane) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[h][e] = 0.f;
#pragma unroll
    for (int kt = 0; kt < K / 16; ++kt) {
        uint32_t a[4], b[4];
        load_a(a, a_s, lda, m0, kt * 16, lane);
        load_b2(b, b_s, ldb, n0, kt * 16, lane);
        mma16816(out[0], a, b[0], b[1]);
        mma16816(out[1], a, b[2], b[3]);
    }
}

// X[16 warp rows][N] += A^T[arow0:+16][k0:+16] . B[k0:+16][:], one reduction step of 16 over the chunk's rows:
// A [step][row channel] and B [step][column channel] are both stored as the chunk's rows (ldmatrix.trans).
template <int N>
__device__ __forceinline__ void state_add(float x[N / 8][4], const __nv_bfloat16* a_s, int lda, int arow0,
                                          const __nv_bfloat16* b_s, int ldb, int k0, int lane) {
    uint32_t a[4];
    load_a_t(a, a_s, lda, arow0, k0, lane);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
        uint32_t b[4];
        load_b2_t(b, b_s, ldb, 16 * np, k0, lane);
        mma16816(x[2 * np], a, b[0], b[1]);
        mma16816(x[2 * np + 1], a, b[2], b[3]);
    }
}

// 16-byte global -> shared copy that zero-fills when `valid` is false (rows past the sequence end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// wc_i^(d-8), where log w = -exp(time_decay) and wc clamps log w at kMidLogDecayMin for the midpoint
// factorisation.
__device__ __forceinline__ float mid_factor(float log_w, int d) {
    return expf(fmaxf(log_w, kMidLogDecayMin) * (d - 8));
}

// Decay tables for one head: pw[d][i] = w_i^d and pwc[d][i] = wc_i^(d-8) for d in [0, 16] (rows of LDP
// floats), and us = u. pwc and us may be null (kernels that keep those factors in registers).
template <int N, int LDP = N>
__device__ __forceinline__ void fill_tables(float* pw, float* pwc, float* us, const float* td, const float* u,
                                            int h) {
    for (int x = threadIdx.x; x < 17 * N; x += blockDim.x) {
        const int d = x / N, i = x % N;
        const float lw = -expf(td[h * N + i]);
        pw[d * LDP + i] = expf(lw * d);
        if (pwc) pwc[d * LDP + i] = mid_factor(lw, d);
    }
    if (us)
        for (int i = threadIdx.x; i < N; i += blockDim.x) us[i] = u[h * N + i];
}

// Issue the copies of one chunk of up to L rows of NARR (B, T, H, N) arrays into padded shared rows.
template <int N, int L, int NARR>
__device__ __forceinline__ void load_chunk(__nv_bfloat16* dst, const __nv_bfloat16* const* src, int64_t row0,
                                           int rows, int64_t row_stride, int64_t col0) {
    constexpr int LDN = N + 8;
    constexpr int VPR = N / 8;  // 16-byte vectors per row
    for (int x = threadIdx.x; x < NARR * L * VPR; x += blockDim.x) {
        const int arr = x / (L * VPR), rem = x % (L * VPR);
        const int t = rem / VPR, c = rem % VPR;
        const bool valid = t < rows;
        const __nv_bfloat16* p = src[arr] + (valid ? (row0 + t) * row_stride + col0 + 8 * c : 0);
        cp_async16(dst + (arr * L + t) * LDN + 8 * c, p, valid);
    }
    cp_async_commit();
}

}  // namespace wkv5

namespace wkv5 {

__device__ __forceinline__ void unpack8(const uint4& raw, float f[8]) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        const float2 v = __bfloat1622float2(p[x]);
        f[2 * x] = v.x;
        f[2 * x + 1] = v.y;
    }
}

// Eight consecutive floats from a 16-byte aligned address (shared memory tables).
__device__ __forceinline__ void load8(float f[8], const float* p) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// CW = 4 or 8 consecutive values from shared memory (bf16 rows or float tables; 8- or 16-byte aligned), and CW
// floats stored as bf16: the backward's prep works on groups of CW channels.
template <int CW>
__device__ __forceinline__ void load_rowf(float f[CW], const __nv_bfloat16* p) {
    if constexpr (CW == 8) {
        unpack8(*reinterpret_cast<const uint4*>(p), f);
    } else {
        const uint2 raw = *reinterpret_cast<const uint2*>(p);
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
        f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
    }
}
template <int CW>
__device__ __forceinline__ void load_tab(float f[CW], const float* p) {
    if constexpr (CW == 8) {
        load8(f, p);
    } else {
        const float4 a = *reinterpret_cast<const float4*>(p);
        f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
    }
}
template <int CW>
__device__ __forceinline__ void store_row(__nv_bfloat16* p, const float f[CW]);

__device__ __forceinline__ uint4 pack8(const float f[8]) {
    uint4 u;
    u.x = pack_bf16(f[0], f[1]);
    u.y = pack_bf16(f[2], f[3]);
    u.z = pack_bf16(f[4], f[5]);
    u.w = pack_bf16(f[6], f[7]);
    return u;
}

template <int CW>
__device__ __forceinline__ void store_row(__nv_bfloat16* p, const float f[CW]) {
    if constexpr (CW == 8) {
        *reinterpret_cast<uint4*>(p) = pack8(f);
    } else {
        *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]));
    }
}

// Steps per piece when a sequence of T steps is cut into about `splits` pieces: a multiple of 64 (so every
// piece but the last is whole chunks for either chunk length), or T itself when there is one piece.
__host__ inline int split_span(int64_t T, int64_t splits) {
    if (splits <= 1 || T <= 64) return static_cast<int>(T);
    const int64_t span = ((T + splits - 1) / splits + 63) / 64 * 64;
    return static_cast<int>(span < T ? span : T);
}

// Chains the pieces of a split sequence (README.md, "Time splits"), one thread per state element (i, j):
//   S_start[0] = s0 (or 0),   S_start[p+1] = w^span S_start[p] + S_end[p]
// with S_end[p] the end state of piece p run from a zero state; when d_end is given, the same for
// D = dS/dlog w:   D_start[0] = 0,   D_start[p+1] = w^span (D_start[p] + span S_start[p]) + D_end[p].
// Arrays: s0 [BH][N][N]; s_end, d_end [BH][pieces-1][N][N]; s_start, d_start [BH][pieces][N][N].
template <int N>
__global__ void scan_starts_kernel(const float* __restrict__ s0, const float* __restrict__ s_end,
                                   const float* __restrict__ d_end, const float* __restrict__ td,
                                   float* __restrict__ s_start, float* __restrict__ d_start, int64_t bh_count, int H,
                                   int pieces, int span) {
    const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (x >= bh_count * N * N) return;
    const int64_t bh = x / (N * N);
    const int ij = static_cast<int>(x % (N * N)), i = ij / N, h = static_cast<int>(bh % H);
    const float decay = expf(-expf(td[h * N + i]) * static_cast<float>(span));  // w_i^span, row i decays
    float s = s0 ? s0[x] : 0.f, d = 0.f;
    for (int p = 0; p < pieces; ++p) {
        const int64_t at = (bh * pieces + p) * N * N + ij;
        s_start[at] = s;
        if (d_start) d_start[at] = d;
        if (p + 1 == pieces) break;
        const int64_t from = (bh * (pieces - 1) + p) * N * N + ij;
        if (d_end) d = decay * (d + static_cast<float>(span) * s) + d_end[from];
        s = decay * s + s_end[from];
    }
}

// The backward counterpart for G = dLoss/dS, carried from the end: G_in[pieces-1] = dS_final (or 0),
// G_in[p-1] = w^len(p) G_in[p] + G_end[p], where G_end[p] is what piece p alone sends back to its start and
// len(p) its length. Arrays: ds_out [BH][N][N]; g_end [BH][pieces-1][N][N] (pieces 1..); g_in [BH][pieces][N][N].
template <int N>
__global__ void scan_grads_kernel(const float* __restrict__ ds_out, const float* __restrict__ g_end,
                                  const float* __restrict__ td, float* __restrict__ g_in, int64_t bh_count, int H,
                                  int pieces, int span, int T) {
    const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (x >= bh_count * N * N) return;
    const int64_t bh = x / (N * N);
    const int ij = static_cast<int>(x % (N * N)), i = ij / N, h = static_cast<int>(bh % H);
    const float lw = -expf(td[h * N + i]);
    float gv = ds_out ? ds_out[x] : 0.f;
    for (int p = pieces - 1; p >= 0; --p) {
        g_in[(bh * pieces + p) * N * N + ij] = gv;
        if (p == 0) break;
        const int len = min(span, T - p * span);
        gv = expf(lw * static_cast<float>(len)) * gv + g_end[(bh * (pieces - 1) + p - 1) * N * N + ij];
    }
}

// Shared-memory bytes of each kernel, used by the kernels' carving and by the launchers. Every array is a
// chunk's rows [L][N + 8] (bf16; the 8 pad elements put ldmatrix's 8 rows on distinct banks) or a table.
__host__ __device__ constexpr int smem_fwd(int N, int L) {  // 46336 bytes at N 64, L 32: 4 blocks per SM
    return (4 + 4) * L * (N + 8) * 2 + 35 * N * 4 + (N / 16) * L * 4;
}
// The backward's two decay tables have rows of N + 4 floats: the prep reads 8 channels of 16 different rows at
// once, and N-float rows would put all 16 on the same banks. Pass 2 keeps 4 input arrays double-buffered and 4
// prepared ones; pass 1 (state only) keeps the 2 inputs it reads and its 2 (sweep A) or 1 (sweep B) prepared.
__host__ __device__ constexpr int smem_bwd_a(int N, int L, bool state_only) {  // N 64, L 32: 64800 / 37152 bytes
    return (state_only ? 2 * 2 + 2 : 2 * 4 + 4) * L * (N + 8) * 2 + (34 * (N + 4) + N) * 4;
}
__host__ __device__ constexpr int smem_bwd_b(int N, int L, bool state_only) {  // N 64, L 32: 64928 / 32672 bytes
    return (state_only ? 2 * 2 + 1 : 2 * 4 + 4) * L * (N + 8) * 2 + (34 * (N + 4) + N) * 4 + L * 4;
}
// Channels per thread in the backward's prep: a block's threads cover 16 steps x N channels once, so 4 in pass 2
// (4N threads) and 8 in pass 1 (2N threads). The NG = N / CW threads of one step are consecutive lanes.
__host__ __device__ constexpr int bwd_prep_width(bool state_only) { return state_only ? 8 : 4; }
// Threads of a backward block: two roles of N/16 warps in pass 2, one in pass 1 (state only).
__host__ __device__ constexpr int bwd_threads(int N, bool state_only) { return (state_only ? 2 : 4) * N; }
// Blocks per multiprocessor the compiler must fit registers for (128 registers a thread at N = 64, L = 32).
__host__ __device__ constexpr int bwd_min_blocks(int N, int L, bool state_only) {
    return N == 64 && L == 32 ? (state_only ? 4 : 2) : 1;
}

// x . y over the N channels of rows m0 + m and m0 + n, given a 16x16 product tile (two C fragments, rows
// m = g + 8 half, columns n = 8 hh + 2q (+1)): the diagonal element of row g + 8 half sits in half hh = half,
// element 2 half + (g & 1), of the lane with q = g / 2. Every lane gets the diagonal of its two rows.
__device__ __forceinline__ void diagonal_rows(const float tile[2][4], float diag[2], int g) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float mine = (g & 1) ? tile[half][2 * half + 1] : tile[half][2 * half];
        diag[half] = __shfl_sync(0xffffffffu, mine, 4 * g + (g >> 1));
    }
}

}  // namespace wkv5
