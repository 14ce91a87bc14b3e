// Python bindings of the WKV5 kernels: input checks, output allocation, dispatch on head size.
// The torch custom ops (autograd, torch.compile) are registered in kernels/wkv5/cuda.py.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

void wkv5_forward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& td, const torch::Tensor& u, const c10::optional<torch::Tensor>& s0,
                       torch::Tensor& y, torch::Tensor& s_out, int64_t chunk, int64_t splits);
void wkv5_backward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& td, const torch::Tensor& u, const c10::optional<torch::Tensor>& s0,
                        const torch::Tensor& dy, const c10::optional<torch::Tensor>& ds_out, torch::Tensor& dr,
                        torch::Tensor& dk, torch::Tensor& dv, torch::Tensor& ds0, torch::Tensor& dlw,
                        torch::Tensor& du, int64_t chunk, int64_t splits);

namespace {

// Tests set this so that every output starts as NaN: an element a kernel fails to write then shows up.
bool g_poison = false;

torch::Tensor alloc(torch::IntArrayRef sizes, const torch::TensorOptions& opts) {
    return g_poison ? torch::full(sizes, std::numeric_limits<float>::quiet_NaN(), opts) : torch::empty(sizes, opts);
}

void check_inputs(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& td,
                  const torch::Tensor& u, const c10::optional<torch::Tensor>& s0) {
    TORCH_CHECK(r.is_cuda() && r.dim() == 4, "wkv5: r must be a CUDA tensor [B, T, H, N]");
    for (const auto* x : {&r, &k, &v}) {
        TORCH_CHECK(x->scalar_type() == torch::kBFloat16, "wkv5: r, k, v must be bfloat16");
        TORCH_CHECK(x->is_contiguous() && x->sizes() == r.sizes() && x->device() == r.device(),
                    "wkv5: r, k, v must be contiguous, of one shape and on one device");
    }
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    TORCH_CHECK(N == 32 || N == 64 || N == 128, "wkv5: head size must be 32, 64 or 128, got ", N);
    TORCH_CHECK(r.size(1) >= 1, "wkv5: T must be >= 1");
    for (const auto* x : {&td, &u}) {
        TORCH_CHECK(x->scalar_type() == torch::kFloat32 && x->is_contiguous() && x->device() == r.device() &&
                        x->dim() == 2 && x->size(0) == H && x->size(1) == N,
                    "wkv5: time_decay and time_faaaa must be contiguous float32 [H, N] on r's device");
    }
    if (s0.has_value()) {
        TORCH_CHECK(s0->scalar_type() == torch::kFloat32 && s0->is_contiguous() && s0->device() == r.device() &&
                        s0->dim() == 4 && s0->size(0) == B && s0->size(1) == H && s0->size(2) == N &&
                        s0->size(3) == N,
                    "wkv5: state must be contiguous float32 [B, H, N, N] on r's device");
    }
    TORCH_CHECK(B * H <= INT32_MAX && r.size(1) <= INT32_MAX, "wkv5: B*H and T must fit in 32 bits");
}

void check_splits(int64_t splits) {
    TORCH_CHECK(splits >= 1 && splits <= 65535, "wkv5: splits must be in [1, 65535], got ", splits);
}

std::vector<torch::Tensor> forward(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& td, const torch::Tensor& u,
                                   const c10::optional<torch::Tensor>& s0, int64_t chunk, int64_t splits) {
    check_inputs(r, k, v, td, u, s0);
    check_splits(splits);
    const c10::cuda::CUDAGuard guard(r.device());
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    auto y = alloc(r.sizes(), r.options());
    auto s_out = alloc({B, H, N, N}, r.options().dtype(torch::kFloat32));
    wkv5_forward_cuda(r, k, v, td, u, s0, y, s_out, chunk, splits);
    return {y, s_out};
}

std::vector<torch::Tensor> backward(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                                    const torch::Tensor& td, const torch::Tensor& u,
                                    const c10::optional<torch::Tensor>& s0, const torch::Tensor& dy,
                                    const c10::optional<torch::Tensor>& ds_out, int64_t chunk, int64_t splits) {
    check_inputs(r, k, v, td, u, s0);
    check_splits(splits);
    TORCH_CHECK(dy.scalar_type() == torch::kBFloat16 && dy.is_contiguous() && dy.sizes() == r.sizes(),
                "wkv5: dy must be contiguous bfloat16 shaped like r");
    if (ds_out.has_value()) {
        TORCH_CHECK(ds_out->scalar_type() == torch::kFloat32 && ds_out->is_contiguous() &&
                        ds_out->sizes() == torch::IntArrayRef({r.size(0), r.size(2), r.size(3), r.size(3)}),
                    "wkv5: the final-state gradient must be contiguous float32 [B, H, N, N]");
    }
    const c10::cuda::CUDAGuard guard(r.device());
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    auto f32 = r.options().dtype(torch::kFloat32);
    auto dr = alloc(r.sizes(), r.options()), dk = alloc(r.sizes(), r.options()), dv = alloc(r.sizes(), r.options());
    auto ds0 = alloc({B, H, N, N}, f32);
    auto dlw = torch::zeros({B, H, N}, f32);
    auto du = torch::zeros({B, H, N}, f32);
    wkv5_backward_cuda(r, k, v, td, u, s0, dy, ds_out, dr, dk, dv, ds0, dlw, du, chunk, splits);
    return {dr, dk, dv, dlw, du, ds0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV v5.2 WKV forward/backward on the tensor cores";
    m.def("forward", &forward,
          "y, final_state = forward(r, k, v, time_decay, time_faaaa, state, chunk, splits): the sequence runs as "
          "about `splits` pieces in parallel (1: one sweep)");
    m.def("set_poison", [](bool on) { g_poison = on; }, "fill outputs with NaN before each launch (tests)");
    m.def("backward", &backward,
          "dr, dk, dv, dlog_w[B,H,N], du[B,H,N], dstate = backward(r, k, v, time_decay, time_faaaa, state, dy, "
          "dstate_out, chunk, splits)");
}
