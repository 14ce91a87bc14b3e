// WKV5 backward, in two sweeps over the sequence (README.md has the derivation).
//
// Each sweep runs 4N threads in two roles of N/16 warps; warp w of a role owns rows [16w, 16w+16) of its state.
// Sweep A (forward in time; S warps carry S and write dr, D warps carry S and D = dS/dlog w):
//   dr_t   = w^t' (dy_t S^T) + wc^(t'-8) sum_{s<t} (dy_t . v_s) (k_s wc^(7-s')) + u k_t (v_t . dy_t)
//   dlog w += t' r_t w^t' (dy_t S^T)  +  sum over pairs s < t in the sub-block of (t-1-s) X[t,s]
//             +  sum_j D_ij dG_ij, with dG = sum_t (r_t w^t')^T dy_t; then D = w^le (D + le S) + ...,
//   S = w^le S + ...  (every term a real contribution: nothing large cancels)
// Sweep B (backward in time, G = dLoss/dS: G warps hold rows i and write dk, G^T warps rows j and write dv):
//   dk_s = w^(le-1-s') (v_s G^T) + wc^(7-s') sum_{t>s} (v_s . dy_t) (r_t wc^(t'-8)) + u r_s (v_s . dy_s)
//   dv_s = (k_s w^(le-1-s')) G + sum_{t>=s} A[t,s] dy_t;  G = w^le G + sum_t (r_t w^t')^T dy_t
// Sweep A writes per-(batch, head) partials of dlog w and du; the caller sums them over the batch.
// With time splits each sweep is two passes around a scan, as in the forward: sweep A's pass 1 gives each
// piece its start S and D, sweep B's pass 1 the gradient G each piece receives at its end.
#ifndef WKV5_KERNELS_ONLY  // defined for compile checks without the torch CUDA headers
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#endif

#include <type_traits>

#include "wkv5_common.cuh"

namespace wkv5 {

using bf16 = __nv_bfloat16;

// Time splits as in the forward: s_in, d_in hold the start S and D of each piece [B*H][pieces][N][N] (null:
// zeros). STATE_ONLY (pass 1, pieces 0..P-2) runs a piece from zeros and writes its end S and D to s_end,
// d_end [B*H][P - 1][N][N], reading k and v alone; otherwise the pass writes dr and adds its dlog w and du partials.
// 4N threads: warps [0, N/16) carry S (rows i) and write dr and the in-sub-block part of dlog w; warps
// [N/16, N/8) carry S and D = dS/dlog w and add the sum_j D_ij dG_ij part. Pass 1 runs the D warps alone (2N
// threads, bwd_threads) with only the arrays it reads (smem_bwd_a), so four of its blocks share a
// multiprocessor at N = 64. The decay-scaled operands are stored as the chunk's rows [step][channel];
// ldmatrix.trans reads their transposes.
template <int N, int L, bool STATE_ONLY>
__global__ void __launch_bounds__(bwd_threads(N, STATE_ONLY), bwd_min_blocks(N, L, STATE_ONLY)) bwd_a_kernel(
    const bf16* __restrict__ r, const bf16* __restrict__ k, const bf16* __restrict__ v, const float* __restrict__ td,
    const float* __restrict__ u, const float* __restrict__ s_in, const float* __restrict__ d_in,
    const bf16* __restrict__ dy, const float* __restrict__ ds_out, bf16* __restrict__ dr, float* __restrict__ dlw,
    float* __restrict__ du, float* __restrict__ s_end, float* __restrict__ d_end, int T, int H, int span) {
    constexpr int NW = N / 16, LDN = N + 8, LDP = N + 4;  // LDP: padded table rows
    extern __shared__ __align__(16) unsigned char smem[];
    // Each raw buffer holds the NIN input arrays this pass reads: r, k, v, dy (pass 1: k, v).
    constexpr int NIN = STATE_ONLY ? 2 : 4;
    bf16* raw = reinterpret_cast<bf16*>(smem);  // [2][NIN][L][LDN]
    bf16* kqN = raw + 2 * NIN * L * LDN;        // [L][LDN] k w^(le-1-s')
    bf16* kdN = kqN + L * LDN;                  // (le-1-s') k w^(le-1-s')
    bf16* kmN = kdN + L * LDN;                  // k wc^(7-s') (pass 2 only, as rtN)
    bf16* rtN = kmN + L * LDN;                  // r w^t'
    float* pw = reinterpret_cast<float*>(kqN + (STATE_ONLY ? 2 : 4) * L * LDN);
    float* pwc = pw + 17 * LDP;
    float* us = pwc + 17 * LDP;

    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const bool d_warp = STATE_ONLY || warp >= NW;  // carries D as well and adds the D . dG part of dlog w
    const int wr = warp % NW;        // its 16 state rows i: [16 wr, 16 wr + 16)
    const int64_t rs = static_cast<int64_t>(H) * N;
    const int64_t col0 = static_cast<int64_t>(h) * N;
    const int64_t piece = static_cast<int64_t>(bh) * gridDim.y + blockIdx.y;
    const int t_begin = blockIdx.y * span;
    const int64_t row0 = static_cast<int64_t>(b) * T + t_begin;
    T = min(span, T - t_begin);  // from here on, the steps of this piece

    fill_tables<N, LDP>(pw, pwc, us, td, u, h);

    // The state-only pass reads k and v alone.
    constexpr int FIRST = STATE_ONLY ? 1 : 0;
    const bf16* srcs[4] = {r, k, v, dy};
    const int nchunks = (T + L - 1) / L;
    load_chunk<N, L, NIN>(raw, srcs + FIRST, row0, min(L, T), rs, col0);
    // Prep: thread (tp, i0) prepares step tp of every sub-block, channels [i0, i0 + CW); the factors that depend
    // on tp alone are read once per chunk.
    constexpr int CW = bwd_prep_width(STATE_ONLY), NG = N / CW;
    const int tp = tid / NG, i0 = CW * (tid % NG);
    __syncthreads();

    // The two roles run the same chunk loop (same barriers) with their own state: a warp-uniform branch
    // around the whole loop keeps D out of the S warps' registers.
    auto sweep = [&](auto role) {
        constexpr bool DW = decltype(role)::value;
        float S[N / 8][4], D[DW ? N / 8 : 1][4];  // row i = 16 wr + g (+8), column j = 8 nt + 2q (+1)
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = 16 * wr + g + 8 * (e >> 1), j = 8 * nt + 2 * q + (e & 1);
                S[nt][e] = s_in ? s_in[(piece * N + i) * N + j] : 0.f;
                if constexpr (DW) D[nt][e] = d_in ? d_in[(piece * N + i) * N + j] : 0.f;
            }
        float dla[2][2] = {{0.f, 0.f}, {0.f, 0.f}}, dua[2][2] = {{0.f, 0.f}, {0.f, 0.f}}, dlb[2] = {0.f, 0.f};
        // The output's decay factors (steps g, g+8 of a sub-block, the warp's rows), S warps only.
        float f_in[2][2][2], f_mid[2][2][2];
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    const int tt = g + 8 * half, i = 16 * wr + 8 * hh + 2 * q + x;
                    f_in[half][hh][x] = DW ? 0.f : pw[tt * LDP + i];
                    f_mid[half][hh][x] = DW ? 0.f : pwc[tt * LDP + i];  // wc^(tt-8)
                }

        for (int c = 0; c < nchunks; ++c) {
            const int t0 = c * L, Lc = min(L, T - t0);
            cp_async_wait_all();
            __syncthreads();
            if (c + 1 < nchunks)
                load_chunk<N, L, NIN>(raw + ((c + 1) & 1) * NIN * L * LDN, srcs + FIRST, row0 + t0 + L,
                                      min(L, T - t0 - L), rs, col0);
            const bf16* kN = raw + ((c & 1) * NIN + 1 - FIRST) * L * LDN;
            const bf16* rN = kN - L * LDN;  // pass 2 only (pass 1 loads no r)
            const bf16* vN = kN + L * LDN;
            const bf16* dyN = vN + L * LDN;

            {
                float f_km[CW], f_rt[CW];  // wc^(7-tp), w^tp of channels i0..
                if constexpr (!STATE_ONLY) {
                    load_tab<CW>(f_km, pwc + (15 - tp) * LDP + i0);
                    load_tab<CW>(f_rt, pw + tp * LDP + i0);
                }
#pragma unroll
                for (int a = 0; a < L / kSub; ++a) {
                    const int t = kSub * a + tp;
                    const bool valid = t < Lc;
                    const int le = min(kSub, Lc - kSub * a);
                    const int dq = valid ? le - 1 - tp : 0;
                    float fk[CW], f_kq[CW], o1[CW], o2[CW];
                    load_rowf<CW>(fk, kN + t * LDN + i0);
                    load_tab<CW>(f_kq, pw + dq * LDP + i0);
#pragma unroll
                    for (int x = 0; x < CW; ++x) {
                        o1[x] = fk[x] * f_kq[x];
                        o2[x] = o1[x] * static_cast<float>(dq);
                    }
                    store_row<CW>(kqN + t * LDN + i0, o1);
                    store_row<CW>(kdN + t * LDN + i0, o2);
                    if constexpr (!STATE_ONLY) {
                        float fr[CW];
                        load_rowf<CW>(fr, rN + t * LDN + i0);
#pragma unroll
                        for (int x = 0; x < CW; ++x) {
                            o1[x] = fk[x] * f_km[x];
                            o2[x] = fr[x] * f_rt[x];
                        }
                        store_row<CW>(kmN + t * LDN + i0, o1);
                        store_row<CW>(rtN + t * LDN + i0, o2);
                    }
                }
            }
            __syncthreads();
            if (STATE_ONLY && !DW) continue;  // pass 1: the D warps carry S and D

            for (int a = 0; a < L / kSub; ++a) {
                if (kSub * a >= Lc) break;
                const int le = min(kSub, Lc - kSub * a);
                const int m0 = kSub * a;
                if constexpr (!DW) {
                    float bd[2][4], di[2][4];  // bd[t][s] = dy_t . v_s, di[t][i] = dy_t . S_i
                    tile_and_state<N>(bd, di, dyN, vN, LDN, m0, S, lane);
                    float vdh[2];  // v_t . dy_t for the rows t = g, g + 8: the tile's diagonal
                    diagonal_rows(bd, vdh, g);
                    // bd[t][s] = dy_t . v_s for s < t; bg weighs each pair by its gap t-1-s, the exponent that
                    // d/dlog w brings down (summing gap-weighted pairs directly avoids cancelling large terms).
                    float bg[2][4];
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int tt = g + 8 * (e >> 1), ss = 8 * hh + 2 * q + (e & 1);
                            if (ss >= tt) bd[hh][e] = 0.f;
                            bg[hh][e] = bd[hh][e] * static_cast<float>(max(tt - 1 - ss, 0));
                        }
                    uint32_t pb[4], pg[4];
                    c_to_a(bd, pb);
                    c_to_a(bg, pg);
                    float dj[2][4], dgap[2][4];
                    uint32_t bk[4];  // k wc^(7-s') [s][i] for s in the sub-block, i in the warp's 16 rows
                    load_b2_t(bk, kmN, LDN, 16 * wr, m0, lane);
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) dj[hh][e] = dgap[hh][e] = 0.f;
                        mma16816(dj[hh], pb, bk[2 * hh], bk[2 * hh + 1]);
                        mma16816(dgap[hh], pg, bk[2 * hh], bk[2 * hh + 1]);
                    }
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int tt = g + 8 * half, t = m0 + tt;
                        if (t >= Lc) continue;
                        const float vd = vdh[half];
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            float out[2];
                            const int c0 = 16 * wr + 8 * hh + 2 * q;
                            const float2 rv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rN + t * LDN + c0));
                            const float2 kv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(kN + t * LDN + c0));
#pragma unroll
                            for (int x = 0; x < 2; ++x) {
                                const int e = 2 * half + x;
                                const float inter = f_in[half][hh][x] * di[hh][e];
                                const float dri = inter + f_mid[half][hh][x] * dj[hh][e];
                                const float rvx = x ? rv.y : rv.x, kvx = x ? kv.y : kv.x;
                                dla[hh][x] += rvx * (static_cast<float>(tt) * inter + f_mid[half][hh][x] * dgap[hh][e]);
                                dua[hh][x] += rvx * kvx * vd;
                                out[x] = dri + us[c0 + x] * kvx * vd;
                            }
                            *reinterpret_cast<__nv_bfloat162*>(dr + (row0 + t0 + t) * rs + col0 + 16 * wr + 8 * hh + 2 * q) =
                                __floats2bfloat162_rn(out[0], out[1]);
                        }
                    }
#pragma unroll
                    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) S[nt][e] *= pw[le * LDP + 16 * wr + g + 8 * (e >> 1)];
                } else {
                    if constexpr (!STATE_ONLY) {
                        uint32_t af[4];
                        load_a_t(af, rtN, LDN, 16 * wr, m0, lane);
#pragma unroll
                        for (int np = 0; np < N / 16; ++np) {
                            uint32_t b[4];
                            load_b2_t(b, dyN, LDN, 16 * np, m0, lane);
#pragma unroll
                            for (int x = 0; x < 2; ++x) {
                                float tmp[4] = {0.f, 0.f, 0.f, 0.f};
                                mma16816(tmp, af, b[2 * x], b[2 * x + 1]);
#pragma unroll
                                for (int e = 0; e < 4; ++e) dlb[e >> 1] += D[2 * np + x][e] * tmp[e];
                            }
                        }
                    }
#pragma unroll
                    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const float f = pw[le * LDP + 16 * wr + g + 8 * (e >> 1)];
                            D[nt][e] = f * (D[nt][e] + static_cast<float>(le) * S[nt][e]);
                            S[nt][e] *= f;
                        }
                    state_add<N>(D, kdN, LDN, 16 * wr, vN, LDN, m0, lane);
                }
                state_add<N>(S, kqN, LDN, 16 * wr, vN, LDN, m0, lane);
            }
        }

        if constexpr (STATE_ONLY) {
            if constexpr (DW) {
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = 16 * wr + g + 8 * (e >> 1), j = 8 * nt + 2 * q + (e & 1);
                        s_end[(piece * N + i) * N + j] = S[nt][e];
                        d_end[(piece * N + i) * N + j] = D[nt][e];
                    }
            }
            return;
        }
        float* dlw_bh = dlw + static_cast<int64_t>(bh) * N;
        if constexpr (!DW) {
#pragma unroll
            for (int off = 4; off < 32; off <<= 1)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        dla[hh][x] += __shfl_xor_sync(0xffffffffu, dla[hh][x], off);
                        dua[hh][x] += __shfl_xor_sync(0xffffffffu, dua[hh][x], off);
                    }
            if (g == 0) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const int i = 16 * wr + 8 * hh + 2 * q + x;
                        atomicAdd(dlw_bh + i, dla[hh][x]);
                        atomicAdd(du + static_cast<int64_t>(bh) * N + i, dua[hh][x]);
                    }
            }
        } else {
            if (ds_out && blockIdx.y + 1 == gridDim.y) {  // the final state is the last piece's
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = 16 * wr + g + 8 * (e >> 1), j = 8 * nt + 2 * q + (e & 1);
                        dlb[e >> 1] += ds_out[(static_cast<int64_t>(bh) * N + i) * N + j] * D[nt][e];
                    }
            }
#pragma unroll
            for (int off = 1; off < 4; off <<= 1)
#pragma unroll
                for (int half = 0; half < 2; ++half) dlb[half] += __shfl_xor_sync(0xffffffffu, dlb[half], off);
            if (q == 0) {
#pragma unroll
                for (int half = 0; half < 2; ++half) atomicAdd(dlw_bh + 16 * wr + g + 8 * half, dlb[half]);
            }
        }
    };
    if constexpr (STATE_ONLY) sweep(std::true_type{});
    else if (d_warp) sweep(std::true_type{});
    else sweep(std::false_type{});
}

// Time splits: g_in holds the gradient each piece receives at its end, [B*H][pieces][N][N] (null: zeros).
// STATE_ONLY (pass 1) runs pieces 1.. (grid row y is piece y + 1) from a zero gradient, reading r and dy alone,
// and writes what each sends back to its start to g_end [B*H][pieces - 1][N][N]; otherwise the pass writes dk
// and dv, and piece 0 writes the initial-state gradient ds0 [B*H][N][N].
// 4N threads: warps [0, N/16) carry G (rows i) and write dk, warps [N/16, N/8) carry G^T (rows j) and write dv.
// The two halves share only the chunk's prepared rows, so each warp holds one state (half the registers of a
// warp holding both) and a multiprocessor keeps twice the warps in flight to hide latency (bench/NOTES.md, v5).
// Pass 1 runs the G warps alone (2N threads) with only the arrays it reads, as in sweep A.
template <int N, int L, bool STATE_ONLY>
__global__ void __launch_bounds__(bwd_threads(N, STATE_ONLY), bwd_min_blocks(N, L, STATE_ONLY)) bwd_b_kernel(
    const bf16* __restrict__ r, const bf16* __restrict__ k, const bf16* __restrict__ v, const float* __restrict__ td,
    const float* __restrict__ u, const bf16* __restrict__ dy, const float* __restrict__ g_in,
    bf16* __restrict__ dk, bf16* __restrict__ dv, float* __restrict__ ds0, float* __restrict__ g_end, int T, int H,
    int span) {
    constexpr int NW = N / 16, LDN = N + 8, LDP = N + 4;  // LDP: padded table rows
    extern __shared__ __align__(16) unsigned char smem[];
    // Each raw buffer holds the NIN input arrays this pass reads: r, dy, k, v (pass 1: r, dy).
    constexpr int NIN = STATE_ONLY ? 2 : 4;
    bf16* raw = reinterpret_cast<bf16*>(smem);  // [2][NIN][L][LDN]
    bf16* rtN = raw + 2 * NIN * L * LDN;        // [L][LDN] r w^t'
    bf16* kqN = rtN + L * LDN;                  // k w^(le-1-s') (pass 2 only, as kmN and rmN)
    bf16* kmN = kqN + L * LDN;                  // k wc^(7-s')
    bf16* rmN = kmN + L * LDN;                  // r wc^(t'-8)
    float* pw = reinterpret_cast<float*>(rtN + (STATE_ONLY ? 1 : 4) * L * LDN);
    float* pwc = pw + 17 * LDP;
    float* us = pwc + 17 * LDP;
    float* dgs = us + N;  // [L] sum_i r u k of each step

    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const bool gt_warp = warp >= NW;  // carries G^T and writes dv
    const int wr = warp % NW;         // its 16 state rows: [16 wr, 16 wr + 16)
    const int64_t rs = static_cast<int64_t>(H) * N;
    const int64_t col0 = static_cast<int64_t>(h) * N;
    const int piece_y = blockIdx.y + (STATE_ONLY ? 1 : 0);
    const int64_t piece = static_cast<int64_t>(bh) * gridDim.y + blockIdx.y;
    const int t_begin = piece_y * span;
    const int64_t row0 = static_cast<int64_t>(b) * T + t_begin;
    T = min(span, T - t_begin);  // from here on, the steps of this piece

    fill_tables<N, LDP>(pw, pwc, us, td, u, h);

    // X = G (row i = 16 wr + g (+8), column j = 8 nt + 2q (+1)) or, in the G^T warps, G^T (row j, column i).
    float X[N / 8][4];
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int rr = 16 * wr + g + 8 * (e >> 1), cc = 8 * nt + 2 * q + (e & 1);
            X[nt][e] = g_in ? g_in[(piece * N + (gt_warp ? cc : rr)) * N + (gt_warp ? rr : cc)] : 0.f;
        }

    const bf16* srcs[4] = {r, dy, k, v};
    const int nchunks = (T + L - 1) / L;
    {
        const int cl = nchunks - 1;
        load_chunk<N, L, NIN>(raw + (cl & 1) * NIN * L * LDN, srcs, row0 + cl * L, T - cl * L, rs, col0);
    }
    // Prep: thread (tp, i0) prepares step tp of every sub-block, channels [i0, i0 + CW); the factors that depend
    // on tp alone are read once per chunk.
    constexpr int CW = bwd_prep_width(STATE_ONLY), NG = N / CW;
    const int tp = tid / NG, i0 = CW * (tid % NG);
    __syncthreads();
    float f_mid[2][2][2], f_end[2][2][2];  // the dk output's factors (steps g, g+8; the warp's rows)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const int ss = g + 8 * half, i = 16 * wr + 8 * hh + 2 * q + x;
                f_mid[half][hh][x] = pwc[(15 - ss) * LDP + i];
                f_end[half][hh][x] = pw[(15 - ss) * LDP + i];
            }

    for (int c = nchunks - 1; c >= 0; --c) {
        const int t0 = c * L, Lc = min(L, T - t0);
        cp_async_wait_all();
        __syncthreads();
        if (c > 0) load_chunk<N, L, NIN>(raw + ((c - 1) & 1) * NIN * L * LDN, srcs, row0 + t0 - L, L, rs, col0);
        const bf16* rN = raw + (c & 1) * NIN * L * LDN;
        const bf16* dyN = rN + L * LDN;
        const bf16* kN = dyN + L * LDN;
        const bf16* vN = kN + L * LDN;

        {
            // Decay factors of step tp that depend on tp alone (channels i0..), and u.
            float f_rt[CW], f_km[CW], f_rm[CW], uu[CW];
            load_tab<CW>(f_rt, pw + tp * LDP + i0);
            if constexpr (!STATE_ONLY) {
                load_tab<CW>(f_km, pwc + (15 - tp) * LDP + i0);
                load_tab<CW>(f_rm, pwc + tp * LDP + i0);
                load_tab<CW>(uu, us + i0);
            }
#pragma unroll
            for (int a = 0; a < L / kSub; ++a) {
                const int t = kSub * a + tp;
                const bool valid = t < Lc;
                const int le = min(kSub, Lc - kSub * a);
                const int dq = valid ? le - 1 - tp : 0;
                float fr[CW], ort[CW];
                load_rowf<CW>(fr, rN + t * LDN + i0);
#pragma unroll
                for (int x = 0; x < CW; ++x) ort[x] = fr[x] * f_rt[x];
                store_row<CW>(rtN + t * LDN + i0, ort);
                if constexpr (!STATE_ONLY) {
                    float fk[CW], o1[CW], o2[CW], o3[CW], f_kq[CW];
                    load_tab<CW>(f_kq, pw + dq * LDP + i0);
                    load_rowf<CW>(fk, kN + t * LDN + i0);
                    float dg = 0.f;
#pragma unroll
                    for (int x = 0; x < CW; ++x) {
                        o1[x] = fk[x] * f_kq[x];
                        o2[x] = fk[x] * f_km[x];
                        o3[x] = fr[x] * f_rm[x];
                        dg += fr[x] * uu[x] * fk[x];
                    }
                    store_row<CW>(kqN + t * LDN + i0, o1);
                    store_row<CW>(kmN + t * LDN + i0, o2);
                    store_row<CW>(rmN + t * LDN + i0, o3);
                    // The NG threads of step t are consecutive lanes of one warp.
#pragma unroll
                    for (int off = 1; off < NG; off <<= 1) dg += __shfl_xor_sync(0xffffffffu, dg, off);
                    if (i0 == 0) dgs[t] = dg;
                }
            }
        }
        __syncthreads();
        if (STATE_ONLY && gt_warp) continue;  // pass 1 carries G alone

        const int nsb = (Lc + kSub - 1) / kSub;
        for (int a = nsb - 1; a >= 0; --a) {
            const int le = min(kSub, Lc - kSub * a);
            const int m0 = kSub * a;
            if (!gt_warp) {
                if constexpr (!STATE_ONLY) {
                    float bt[2][4], xc[2][4];  // bt[s][t] = v_s . dy_t, xc[s][i] = v_s . G_i
                    tile_and_state<N>(bt, xc, vN, dyN, LDN, m0, X, lane);
                    float vdh[2];  // v_s . dy_s for the rows s = g, g + 8: the tile's diagonal
                    diagonal_rows(bt, vdh, g);
                    // bt[s][t] = v_s . dy_t, kept for t > s.
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int ss = g + 8 * (e >> 1), tt = 8 * hh + 2 * q + (e & 1);
                            if (tt <= ss) bt[hh][e] = 0.f;
                        }
                    uint32_t pb[4];
                    c_to_a(bt, pb);
                    float yi[2][4];
                    uint32_t brm[4];  // r wc^(t'-8) [t][i] for t in the sub-block, i in the warp's 16 rows
                    load_b2_t(brm, rmN, LDN, 16 * wr, m0, lane);
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) yi[hh][e] = 0.f;
                        mma16816(yi[hh], pb, brm[2 * hh], brm[2 * hh + 1]);
                    }
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int ss = g + 8 * half, s = m0 + ss;
                        if (s >= Lc) continue;
                        const float vd = vdh[half];
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            float out[2];
                            const int c0 = 16 * wr + 8 * hh + 2 * q;
                            const float2 rv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rN + s * LDN + c0));
#pragma unroll
                            for (int x = 0; x < 2; ++x) {
                                const int e = 2 * half + x, i = c0 + x;
                                const float intra = f_mid[half][hh][x] * yi[hh][e];
                                const float decay = le == kSub ? f_end[half][hh][x] : pw[(le - 1 - ss) * LDP + i];
                                out[x] = decay * xc[hh][e] + intra + us[i] * (x ? rv.y : rv.x) * vd;
                            }
                            *reinterpret_cast<__nv_bfloat162*>(dk + (row0 + t0 + s) * rs + col0 + 16 * wr + 8 * hh +
                                                               2 * q) = __floats2bfloat162_rn(out[0], out[1]);
                        }
                    }
                }
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) X[nt][e] *= pw[le * LDP + 16 * wr + g + 8 * (e >> 1)];
                state_add<N>(X, rtN, LDN, 16 * wr, dyN, LDN, m0, lane);
            } else if constexpr (!STATE_ONLY) {
                // at[s][t] = A[t][s] for t > s, with diag(u) terms on the diagonal.
                float at[2][4];
                tile16<N>(at, kmN, LDN, m0, rmN, LDN, m0, lane);
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int ss = g + 8 * (e >> 1), tt = 8 * hh + 2 * q + (e & 1);
                        at[hh][e] = tt > ss ? at[hh][e] : (tt == ss ? dgs[m0 + ss] : 0.f);
                    }
                uint32_t pa[4];
                c_to_a(at, pa);
                float z[2][4];
                act_times_state<N>(z, kqN, LDN, m0, X, lane);
                {
                    uint32_t bq[4];  // dy[t][j] for t in the sub-block, j in the warp's 16 columns
                    load_b2_t(bq, dyN, LDN, 16 * wr, m0, lane);
                    mma16816(z[0], pa, bq[0], bq[1]);
                    mma16816(z[1], pa, bq[2], bq[3]);
                }
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int s = m0 + g + 8 * half;
                        if (s < Lc) {
                            const int j = 16 * wr + 8 * hh + 2 * q;
                            *reinterpret_cast<__nv_bfloat162*>(dv + (row0 + t0 + s) * rs + col0 + j) =
                                __floats2bfloat162_rn(z[hh][2 * half], z[hh][2 * half + 1]);
                        }
                    }
#pragma unroll
                for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) X[nt][e] *= pw[le * LDP + 8 * nt + 2 * q + (e & 1)];
                state_add<N>(X, dyN, LDN, 16 * wr, rtN, LDN, m0, lane);
            }
        }
    }

    if (gt_warp || (!STATE_ONLY && piece_y > 0)) return;  // earlier pieces receive G through the scan
    float* const dst = STATE_ONLY ? g_end + piece * N * N : ds0 + static_cast<int64_t>(bh) * N * N;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = 16 * wr + g + 8 * (e >> 1), j = 8 * nt + 2 * q + (e & 1);
            dst[i * N + j] = X[nt][e];
        }
}

#ifndef WKV5_KERNELS_ONLY
template <int N, int L>
void launch_bwd(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& td,
                const torch::Tensor& u, const float* s0, const torch::Tensor& dy, const float* ds_out,
                torch::Tensor& dr, torch::Tensor& dk, torch::Tensor& dv, torch::Tensor& ds0, torch::Tensor& dlw,
                torch::Tensor& du, int64_t splits) {
    const int B = r.size(0), T = r.size(1), H = r.size(2), BH = B * H;
    const int span = split_span(T, splits), pieces = (T + span - 1) / span;
    auto stream = at::cuda::getCurrentCUDAStream();
    const auto* rp = reinterpret_cast<const bf16*>(r.data_ptr());
    const auto* kp = reinterpret_cast<const bf16*>(k.data_ptr());
    const auto* vp = reinterpret_cast<const bf16*>(v.data_ptr());
    const auto* dyp = reinterpret_cast<const bf16*>(dy.data_ptr());
    const float* tdp = td.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    constexpr int smem_a = smem_bwd_a(N, L, false), smem_b = smem_bwd_b(N, L, false);
    constexpr int smem_a1 = smem_bwd_a(N, L, true), smem_b1 = smem_bwd_b(N, L, true);
    constexpr int threads = bwd_threads(N, false), threads1 = bwd_threads(N, true);
    auto ka = bwd_a_kernel<N, L, false>;
    auto kb = bwd_b_kernel<N, L, false>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(ka, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_a));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kb, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_b));
    // The two sweeps are independent: sweep B runs on a side stream next to sweep A, so that small B*H
    // still fills the chip; the caller's stream waits for both.
    const auto side = at::cuda::getStreamFromPool(false, r.device().index());
    at::cuda::CUDAEvent inputs_ready, b_done;
    inputs_ready.record(stream);
    inputs_ready.block(side);

    // Split sequences: pass 1 and the scan give each piece its start S, D (sweep A) and end G (sweep B).
    const float *s_in = s0, *d_in = nullptr, *g_in = ds_out;
    torch::Tensor a_bufs, b_bufs;
    if (pieces > 1) {
        const auto f32 = r.options().dtype(torch::kFloat32);
        const int64_t elems = static_cast<int64_t>(BH) * N * N;
        const int scan_blocks = static_cast<int>((elems + 255) / 256);
        // a_bufs: S ends, D ends [BH][pieces-1], then S starts, D starts [BH][pieces]
        a_bufs = torch::empty({2 * elems * (2 * pieces - 1)}, f32);
        float* s_end = a_bufs.data_ptr<float>();
        float* d_end = s_end + elems * (pieces - 1);
        float* s_start = d_end + elems * (pieces - 1);
        float* d_start = s_start + elems * pieces;
        auto ka1 = bwd_a_kernel<N, L, true>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(ka1, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_a1));
        ka1<<<dim3(BH, pieces - 1), threads1, smem_a1, stream>>>(rp, kp, vp, tdp, up, nullptr, nullptr, dyp, nullptr,
                                                              nullptr, nullptr, nullptr, s_end, d_end, T, H, span);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        scan_starts_kernel<N><<<scan_blocks, 256, 0, stream>>>(s0, s_end, d_end, tdp, s_start, d_start, BH, H, pieces,
                                                               span);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        s_in = s_start;
        d_in = d_start;

        // b_bufs: G ends [BH][pieces-1] (pieces 1..), then G at each piece's end [BH][pieces]
        b_bufs = torch::empty({elems * (2 * pieces - 1)}, f32);
        c10::cuda::CUDACachingAllocator::recordStream(b_bufs.storage().data_ptr(), side);
        float* g_end = b_bufs.data_ptr<float>();
        float* g_start = g_end + elems * (pieces - 1);
        auto kb1 = bwd_b_kernel<N, L, true>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kb1, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_b1));
        kb1<<<dim3(BH, pieces - 1), threads1, smem_b1, side>>>(rp, kp, vp, tdp, up, dyp, nullptr, nullptr, nullptr,
                                                            nullptr, g_end, T, H, span);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        scan_grads_kernel<N><<<scan_blocks, 256, 0, side>>>(ds_out, g_end, tdp, g_start, BH, H, pieces, span, T);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        g_in = g_start;
    }
    ka<<<dim3(BH, pieces), threads, smem_a, stream>>>(rp, kp, vp, tdp, up, s_in, d_in, dyp, ds_out,
                                                    reinterpret_cast<bf16*>(dr.data_ptr()), dlw.data_ptr<float>(),
                                                    du.data_ptr<float>(), nullptr, nullptr, T, H, span);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kb<<<dim3(BH, pieces), threads, smem_b, side>>>(rp, kp, vp, tdp, up, dyp, g_in,
                                                  reinterpret_cast<bf16*>(dk.data_ptr()),
                                                  reinterpret_cast<bf16*>(dv.data_ptr()), ds0.data_ptr<float>(),
                                                  nullptr, T, H, span);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    b_done.record(side);
    b_done.block(stream);
}

#endif  // WKV5_KERNELS_ONLY
}  // namespace wkv5

#ifndef WKV5_KERNELS_ONLY

void wkv5_backward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& td, const torch::Tensor& u, const c10::optional<torch::Tensor>& s0,
                        const torch::Tensor& dy, const c10::optional<torch::Tensor>& ds_out, torch::Tensor& dr,
                        torch::Tensor& dk, torch::Tensor& dv, torch::Tensor& ds0, torch::Tensor& dlw,
                        torch::Tensor& du, int64_t chunk, int64_t splits) {
    const int N = r.size(3);
    const float* s0p = s0.has_value() ? s0->data_ptr<float>() : nullptr;
    const float* dsp = ds_out.has_value() ? ds_out->data_ptr<float>() : nullptr;
#define WKV5_BWD(NN, LL) wkv5::launch_bwd<NN, LL>(r, k, v, td, u, s0p, dy, dsp, dr, dk, dv, ds0, dlw, du, splits)
    if (N == 32 && chunk == 64) WKV5_BWD(32, 64);
    else if (N == 32) WKV5_BWD(32, 32);
    else if (N == 64 && chunk == 64) WKV5_BWD(64, 64);
    else if (N == 64) WKV5_BWD(64, 32);
    else if (N == 128) WKV5_BWD(128, 32);
    else TORCH_CHECK(false, "wkv5: head size must be 32, 64 or 128, got ", N);
#undef WKV5_BWD
}
#endif  // WKV5_KERNELS_ONLY
