// WKV5 forward: y_t = r_t (diag(u) k_t^T v_t + S_{t-1}), S_t = diag(w) S_{t-1} + k_t^T v_t.
//
// One block per (batch, head) with N/16 warps; warp w owns value columns [16w, 16w+16) of the state,
// held transposed (S^T, rows j, columns i) as fp32 mma accumulators for the whole sequence. Chunks of L
// steps are copied into shared memory asynchronously (the next chunk loads while this one computes) and
// turned into decay-scaled bf16 rows (16-byte stores; ldmatrix reads their transposes); then each warp walks
// the chunk in sub-blocks of 16 steps:
//   y   = (r w^t') S                          (inter: t' = step inside the sub-block, exponent >= 0)
//       + A v, A[t,s] = (r wc^(t'-8)) . (k wc^(7-s')) for s < t, diag(u) on the diagonal
//   S^T = w^le S^T + v^T (k w^(le-1-s'))
// so no exponent ever exceeds 16 steps in magnitude (see README.md).
//
// Time splits (small B*H): the sequence is cut into gridDim.y pieces of `span` steps. Pass 1 (STATE_ONLY)
// runs every piece but the last from a zero state and writes only its end state; `scan_kernel` chains those
// into each piece's start state; pass 2 runs every piece from its start state and writes y.
#ifndef WKV5_KERNELS_ONLY  // defined for compile checks without the torch CUDA headers
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#endif

#include "wkv5_common.cuh"

namespace wkv5 {

using bf16 = __nv_bfloat16;

// s_in: start states [B*H][pieces][N][N] (null: zeros). STATE_ONLY (pieces 0..P-2) writes each piece's end
// state to s_out [B*H][P - 1][N][N]; otherwise the last piece writes the final state to s_out [B*H][N][N].
template <int N, int L, bool STATE_ONLY>
__global__ void __launch_bounds__(2 * N) fwd_kernel(const bf16* __restrict__ r, const bf16* __restrict__ k,
                                                    const bf16* __restrict__ v, const float* __restrict__ td,
                                                    const float* __restrict__ u, const float* __restrict__ s_in,
                                                    bf16* __restrict__ y, float* __restrict__ s_out, int T, int H,
                                                    int span) {
    constexpr int NW = N / 16, LDN = N + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    // [4][L][LDN]: r, k, then v of even and odd chunks (the next chunk loads during the sub-blocks, which read
    // only v of the raw rows: r and k are free once the prep is done, v is double-buffered).
    bf16* raw = reinterpret_cast<bf16*>(smem);
    bf16* rq = raw + 4 * L * LDN;               // [L][LDN] r w^t'
    bf16* rm = rq + L * LDN;                    // [L][LDN] r wc^(t'-8)
    bf16* km = rm + L * LDN;                    // [L][LDN] k wc^(7-t')
    bf16* kq = km + L * LDN;                    // [L][LDN] k w^(le-1-t')
    float* pw = reinterpret_cast<float*>(kq + L * LDN);
    float* pwc = pw + 17 * N;
    float* us = pwc + 17 * N;
    float* dgp = us + N;  // [NW][L] per-warp partials of sum_i r u k

    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int64_t rs = static_cast<int64_t>(H) * N;  // elements between steps
    const int64_t col0 = static_cast<int64_t>(h) * N;
    const int64_t piece = static_cast<int64_t>(bh) * gridDim.y + blockIdx.y;  // index of this (b, h, piece)
    const int t_begin = blockIdx.y * span;
    const int64_t row0 = static_cast<int64_t>(b) * T + t_begin;
    T = min(span, T - t_begin);  // from here on, the steps of this piece

    fill_tables<N>(pw, pwc, us, td, u, h);

    float st[N / 8][4];  // S^T: row j = 16 warp + g (+8), column i = 8 nt + 2q (+1)
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = 16 * warp + g + 8 * (e >> 1), i = 8 * nt + 2 * q + (e & 1);
            st[nt][e] = s_in ? s_in[(piece * N + i) * N + j] : 0.f;
        }

    // The state-only pass reads k and v alone (slots 1 and 2 or 3 of raw).
    constexpr int NRK = STATE_ONLY ? 1 : 2;  // r and k, or k alone
    const bf16* srcs[3] = {r, k, v};
    bf16* const rk_slots = raw + (2 - NRK) * L * LDN;
    const bf16* const* rk_srcs = srcs + (2 - NRK);
    const int nchunks = (T + L - 1) / L;
    load_chunk<N, L, NRK>(rk_slots, rk_srcs, row0, min(L, T), rs, col0);
    load_chunk<N, L, 1>(raw + 2 * L * LDN, srcs + 2, row0, min(L, T), rs, col0);
    // Thread (tp, i0) prepares step tp of every sub-block, channels [i0, i0+8): its decay factors are fixed.
    const int tp = tid & 15, i0 = 8 * (tid >> 4);
    __syncthreads();
    float f_rq[8], f_rm[8], f_km[8], f_kq[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) {
        f_rq[x] = pw[tp * N + i0 + x];
        f_rm[x] = pwc[tp * N + i0 + x];
        f_km[x] = pwc[(15 - tp) * N + i0 + x];
        f_kq[x] = pw[(15 - tp) * N + i0 + x];
    }

    for (int c = 0; c < nchunks; ++c) {
        const int t0 = c * L, Lc = min(L, T - t0);
        cp_async_wait_all();
        __syncthreads();
        const bf16* rr = raw;
        const bf16* kk = rr + L * LDN;
        const bf16* vs = raw + (2 + (c & 1)) * L * LDN;  // this chunk's v

#pragma unroll
        for (int a = 0; a < L / kSub; ++a) {
            const int t = kSub * a + tp;
            const bool valid = t < Lc;
            const int le = min(kSub, Lc - kSub * a);
            const int dq = valid ? le - 1 - tp : 0;
            float fk[8], fkq[8];
            unpack8(*reinterpret_cast<const uint4*>(kk + t * LDN + i0), fk);
#pragma unroll
            for (int x = 0; x < 8; ++x) fkq[x] = fk[x] * (le == kSub ? f_kq[x] : pw[dq * N + i0 + x]);
            *reinterpret_cast<uint4*>(kq + t * LDN + i0) = pack8(fkq);
            if constexpr (!STATE_ONLY) {
                float fr[8], o1[8], o2[8], o3[8];
                unpack8(*reinterpret_cast<const uint4*>(rr + t * LDN + i0), fr);
                float dg = 0.f;
#pragma unroll
                for (int x = 0; x < 8; ++x) {
                    o1[x] = fr[x] * f_rq[x];
                    o2[x] = fr[x] * f_rm[x];
                    o3[x] = fk[x] * f_km[x];
                    dg += fr[x] * us[i0 + x] * fk[x];
                }
                *reinterpret_cast<uint4*>(rq + t * LDN + i0) = pack8(o1);
                *reinterpret_cast<uint4*>(rm + t * LDN + i0) = pack8(o2);
                *reinterpret_cast<uint4*>(km + t * LDN + i0) = pack8(o3);
                dg += __shfl_xor_sync(0xffffffffu, dg, 16);
                if (lane < 16) dgp[warp * L + t] = dg;
            }
        }
        __syncthreads();
        if (c + 1 < nchunks) {
            load_chunk<N, L, NRK>(rk_slots, rk_srcs, row0 + t0 + L, min(L, T - t0 - L), rs, col0);
            load_chunk<N, L, 1>(raw + (2 + ((c + 1) & 1)) * L * LDN, srcs + 2, row0 + t0 + L, min(L, T - t0 - L), rs, col0);
        }

        for (int a = 0; a < L / kSub; ++a) {
            if (kSub * a >= Lc) break;
            const int le = min(kSub, Lc - kSub * a);
            const int m0 = kSub * a;
            if constexpr (!STATE_ONLY) {
                float ad[2][4];
                tile16<N>(ad, rm, LDN, m0, km, LDN, m0, lane);
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int tt = g + 8 * (e >> 1), ss = 8 * hh + 2 * q + (e & 1);
                        float dsum = 0.f;
                        if (ss == tt) {
#pragma unroll
                            for (int w = 0; w < NW; ++w) dsum += dgp[w * L + m0 + tt];
                        }
                        ad[hh][e] = ss < tt ? ad[hh][e] : dsum;
                    }
                uint32_t pa[4];
                c_to_a(ad, pa);
                float yacc[2][4];
                act_times_state<N>(yacc, rq, LDN, m0, st, lane);
                {
                    uint32_t b[4];  // v[s][j] for s in the sub-block, j in the warp's 16 columns
                    load_b2_t(b, vs, LDN, 16 * warp, m0, lane);
                    mma16816(yacc[0], pa, b[0], b[1]);
                    mma16816(yacc[1], pa, b[2], b[3]);
                }
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int t = m0 + g + 8 * half;
                        if (t < Lc) {
                            const int j = 16 * warp + 8 * hh + 2 * q;
                            *reinterpret_cast<__nv_bfloat162*>(y + (row0 + t0 + t) * rs + col0 + j) =
                                __floats2bfloat162_rn(yacc[hh][2 * half], yacc[hh][2 * half + 1]);
                        }
                    }
            }
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[nt][e] *= pw[le * N + 8 * nt + 2 * q + (e & 1)];
            state_add<N>(st, vs, LDN, 16 * warp, kq, LDN, m0, lane);
        }
    }

    if (!STATE_ONLY && blockIdx.y + 1 < gridDim.y) return;  // the next piece starts from this state
    float* const dst = s_out + (STATE_ONLY ? piece : static_cast<int64_t>(bh)) * N * N;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = 16 * warp + g + 8 * (e >> 1), i = 8 * nt + 2 * q + (e & 1);
            dst[i * N + j] = st[nt][e];
        }
}

#ifndef WKV5_KERNELS_ONLY
template <int N, int L>
void launch_fwd(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& td,
                const torch::Tensor& u, const float* s0, torch::Tensor& y, torch::Tensor& s_out, int64_t splits) {
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const int span = split_span(T, splits), pieces = (T + span - 1) / span;
    const auto stream = at::cuda::getCurrentCUDAStream();
    constexpr int smem = smem_fwd(N, L);
    const auto* rp = reinterpret_cast<const bf16*>(r.data_ptr());
    const auto* kp = reinterpret_cast<const bf16*>(k.data_ptr());
    const auto* vp = reinterpret_cast<const bf16*>(v.data_ptr());
    const float* starts = s0;
    torch::Tensor ends, starts_buf;
    if (pieces > 1) {
        auto f32 = r.options().dtype(torch::kFloat32);
        ends = torch::empty({B * H, pieces - 1, N, N}, f32);
        starts_buf = torch::empty({B * H, pieces, N, N}, f32);
        auto pass1 = fwd_kernel<N, L, true>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(pass1, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        pass1<<<dim3(B * H, pieces - 1), 2 * N, smem, stream>>>(rp, kp, vp, td.data_ptr<float>(), u.data_ptr<float>(),
                                                                nullptr, nullptr, ends.data_ptr<float>(), T, H, span);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t elems = static_cast<int64_t>(B) * H * N * N;
        scan_starts_kernel<N><<<(elems + 255) / 256, 256, 0, stream>>>(s0, ends.data_ptr<float>(), nullptr,
                                                                        td.data_ptr<float>(), starts_buf.data_ptr<float>(),
                                                                        nullptr, static_cast<int64_t>(B) * H, H, pieces, span);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        starts = starts_buf.data_ptr<float>();
    }
    auto pass2 = fwd_kernel<N, L, false>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(pass2, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    pass2<<<dim3(B * H, pieces), 2 * N, smem, stream>>>(rp, kp, vp, td.data_ptr<float>(), u.data_ptr<float>(), starts,
                                                        reinterpret_cast<bf16*>(y.data_ptr()), s_out.data_ptr<float>(),
                                                        T, H, span);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // WKV5_KERNELS_ONLY
}  // namespace wkv5

#ifndef WKV5_KERNELS_ONLY

void wkv5_forward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& td, const torch::Tensor& u, const c10::optional<torch::Tensor>& s0,
                       torch::Tensor& y, torch::Tensor& s_out, int64_t chunk, int64_t splits) {
    const int N = r.size(3);
    const float* s0p = s0.has_value() ? s0->data_ptr<float>() : nullptr;
#define WKV5_FWD(NN, LL) wkv5::launch_fwd<NN, LL>(r, k, v, td, u, s0p, y, s_out, splits)
    if (N == 32 && chunk == 32) WKV5_FWD(32, 32);
    else if (N == 32) WKV5_FWD(32, 64);
    else if (N == 64 && chunk == 32) WKV5_FWD(64, 32);
    else if (N == 64) WKV5_FWD(64, 64);
    else if (N == 128 && chunk == 32) WKV5_FWD(128, 32);
    else if (N == 128) WKV5_FWD(128, 64);
    else TORCH_CHECK(false, "wkv5: head size must be 32, 64 or 128, got ", N);
#undef WKV5_FWD
}
#endif  // WKV5_KERNELS_ONLY
