// WKV5 forward: y_t = r_t (diag(u) k_t^T v_t + S_{t-1}), S_t = diag(w) S_{t-1} + k_t^T v_t.
//
// One block per (batch, head) with N/16 warps; warp w owns value columns [16w, 16w+16) of the state,
// held transposed (S^T, rows j, columns i) as fp32 mma accumulators for the whole sequence. Chunks of L
// steps are copied into shared memory asynchronously (the next chunk loads while this one computes) and
// turned into decay-scaled bf16 operands; then each warp walks the chunk in sub-blocks of 16 steps:
//   y   = (r w^t') S                          (inter: t' = step inside the sub-block, exponent >= 0)
//       + A v, A[t,s] = (r wc^(t'-8)) . (k wc^(7-s')) for s < t, diag(u) on the diagonal
//   S^T = w^le S^T + v^T (k w^(le-1-s'))
// so no exponent ever exceeds 16 steps in magnitude (see README.md).
#ifndef WKV5_KERNELS_ONLY  // defined for compile checks without the torch CUDA headers
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#endif

#include "wkv5_common.cuh"

namespace wkv5 {

using bf16 = __nv_bfloat16;

template <int N, int L>
__global__ void __launch_bounds__(2 * N) fwd_kernel(const bf16* __restrict__ r, const bf16* __restrict__ k,
                                                    const bf16* __restrict__ v, const float* __restrict__ td,
                                                    const float* __restrict__ u, const float* __restrict__ s0,
                                                    bf16* __restrict__ y, float* __restrict__ s_out, int T, int H) {
    constexpr int NW = N / 16, LDN = N + 8, LDL = L + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* raw = reinterpret_cast<bf16*>(smem);  // [3][L][LDN]: r, k, v (the next chunk loads during the sub-blocks)
    bf16* rq = raw + 3 * L * LDN;               // [L][LDN] r w^t'
    bf16* rm = rq + L * LDN;                    // [L][LDN] r wc^(t'-8)
    bf16* km = rm + L * LDN;                    // [L][LDN] k wc^(7-t')
    bf16* vT = km + L * LDN;                    // [N][LDL] v transposed
    bf16* kqT = vT + N * LDL;                   // [N][LDL] (k w^(le-1-t')) transposed
    float* pw = reinterpret_cast<float*>(kqT + N * LDL);
    float* pwc = pw + 17 * N;
    float* us = pwc + 17 * N;
    float* dgp = us + N;  // [NW][L] per-warp partials of sum_i r u k

    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int64_t rs = static_cast<int64_t>(H) * N;  // elements between steps
    const int64_t row0 = static_cast<int64_t>(b) * T;
    const int64_t col0 = static_cast<int64_t>(h) * N;

    fill_tables<N>(pw, pwc, us, td, u, h);

    float st[N / 8][4];  // S^T: row j = 16 warp + g (+8), column i = 8 nt + 2q (+1)
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = 16 * warp + g + 8 * (e >> 1), i = 8 * nt + 2 * q + (e & 1);
            st[nt][e] = s0 ? s0[(static_cast<int64_t>(bh) * N + i) * N + j] : 0.f;
        }

    const bf16* srcs[3] = {r, k, v};
    const int nchunks = (T + L - 1) / L;
    load_chunk<N, L, 3>(raw, srcs, row0, min(L, T), rs, col0);
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
        const bf16* vv = kk + L * LDN;

#pragma unroll
        for (int a = 0; a < L / kSub; ++a) {
            const int t = kSub * a + tp;
            const bool valid = t < Lc;
            const int le = min(kSub, Lc - kSub * a);
            const int dq = valid ? le - 1 - tp : 0;
            float fr[8], fk[8], fv[8], o1[8], o2[8], o3[8];
            unpack8(*reinterpret_cast<const uint4*>(rr + t * LDN + i0), fr);
            unpack8(*reinterpret_cast<const uint4*>(kk + t * LDN + i0), fk);
            unpack8(*reinterpret_cast<const uint4*>(vv + t * LDN + i0), fv);
            float dg = 0.f;
#pragma unroll
            for (int x = 0; x < 8; ++x) {
                const int i = i0 + x;
                o1[x] = fr[x] * f_rq[x];
                o2[x] = fr[x] * f_rm[x];
                o3[x] = fk[x] * f_km[x];
                dg += fr[x] * us[i] * fk[x];
                vT[i * LDL + t] = __float2bfloat16(fv[x]);
                kqT[i * LDL + t] = __float2bfloat16(fk[x] * (le == kSub ? f_kq[x] : pw[dq * N + i]));
            }
            *reinterpret_cast<uint4*>(rq + t * LDN + i0) = pack8(o1);
            *reinterpret_cast<uint4*>(rm + t * LDN + i0) = pack8(o2);
            *reinterpret_cast<uint4*>(km + t * LDN + i0) = pack8(o3);
            dg += __shfl_xor_sync(0xffffffffu, dg, 16);
            if (lane < 16) dgp[warp * L + t] = dg;
        }
        __syncthreads();
        if (c + 1 < nchunks) load_chunk<N, L, 3>(raw, srcs, row0 + t0 + L, min(L, T - t0 - L), rs, col0);

        for (int a = 0; a < L / kSub; ++a) {
            if (kSub * a >= Lc) break;
            const int le = min(kSub, Lc - kSub * a);
            const int m0 = kSub * a;
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
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                uint32_t b0, b1;
                load_b(b0, b1, vT, LDL, 16 * warp + 8 * hh, m0, lane);
                mma16816(yacc[hh], pa, b0, b1);
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
#pragma unroll
            for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[nt][e] *= pw[le * N + 8 * nt + 2 * q + (e & 1)];
            state_add<N>(st, vT, LDL, 16 * warp, kqT, LDL, m0, lane);
        }
    }

#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = 16 * warp + g + 8 * (e >> 1), i = 8 * nt + 2 * q + (e & 1);
            s_out[(static_cast<int64_t>(bh) * N + i) * N + j] = st[nt][e];
        }
}

#ifndef WKV5_KERNELS_ONLY
template <int N, int L>
void launch_fwd(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& td,
                const torch::Tensor& u, const float* s0, torch::Tensor& y, torch::Tensor& s_out) {
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    constexpr int smem = smem_fwd(N, L);
    auto kern = fwd_kernel<N, L>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kern<<<B * H, 2 * N, smem, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const bf16*>(r.data_ptr()), reinterpret_cast<const bf16*>(k.data_ptr()),
        reinterpret_cast<const bf16*>(v.data_ptr()), td.data_ptr<float>(), u.data_ptr<float>(), s0,
        reinterpret_cast<bf16*>(y.data_ptr()), s_out.data_ptr<float>(), T, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // WKV5_KERNELS_ONLY
}  // namespace wkv5

#ifndef WKV5_KERNELS_ONLY

void wkv5_forward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& td, const torch::Tensor& u, const c10::optional<torch::Tensor>& s0,
                       torch::Tensor& y, torch::Tensor& s_out, int64_t chunk) {
    const int N = r.size(3);
    const float* s0p = s0.has_value() ? s0->data_ptr<float>() : nullptr;
    if (N == 32 && chunk == 32) wkv5::launch_fwd<32, 32>(r, k, v, td, u, s0p, y, s_out);
    else if (N == 32) wkv5::launch_fwd<32, 64>(r, k, v, td, u, s0p, y, s_out);
    else if (N == 64 && chunk == 32) wkv5::launch_fwd<64, 32>(r, k, v, td, u, s0p, y, s_out);
    else if (N == 64) wkv5::launch_fwd<64, 64>(r, k, v, td, u, s0p, y, s_out);
    else if (N == 128 && chunk == 32) wkv5::launch_fwd<128, 32>(r, k, v, td, u, s0p, y, s_out);
    else if (N == 128) wkv5::launch_fwd<128, 64>(r, k, v, td, u, s0p, y, s_out);
    else TORCH_CHECK(false, "wkv5: head size must be 32, 64 or 128, got ", N);
}
#endif  // WKV5_KERNELS_ONLY
