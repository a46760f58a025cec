// Python entry points of the fused Perceiver KV-input kernel: argument checks, allocation, stream, launch.
// Compiled only into CUDA builds of the extension.
#ifdef FLAMINGO_FAST_WITH_CUDA
#include "perceiver.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "checks.h"
#include "flamingo_fast/perceiver_kv_input.h"

namespace flamingo_fast {
namespace {

RowDType row_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return RowDType::kFloat32;
    case at::kBFloat16: return RowDType::kBFloat16;
    case at::kHalf: return RowDType::kFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return RowDType::kFloat32;
}

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " data must be 16-byte aligned");
}

// (N, rows, D) with contiguous rows; the batch stride may be anything 16-byte aligned (0: broadcast latents).
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_rank(t, name, 3, "(batch, rows, dim)");
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but media has ",
                   ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but media is on ", ref.device());
  TORCH_CHECK_VALUE(t.size(2) == ref.size(2), name, " has dim ", t.size(2), " but media has ", ref.size(2));
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, name, " must have a contiguous last dimension");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == t.size(2), name, " rows must be contiguous (stride(1) == dim)");
  TORCH_CHECK_VALUE(t.size(0) <= 1 || (t.stride(0) * t.element_size()) % 16 == 0, name,
                    " batch stride must be a multiple of 16 bytes");
  check_aligned(t, name);
}

void check_vector(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == ref.size(2), name, " must have shape (", ref.size(2), "), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but media has ",
                   ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device() && t.is_contiguous(), name, " must be a contiguous tensor on ",
                    ref.device());
  check_aligned(t, name);
}

int64_t batch_stride(const at::Tensor& t) { return t.size(0) == 1 ? t.size(1) * t.size(2) : t.stride(0); }

PerceiverKvInputArgs make_args(const at::Tensor& media, const at::Tensor& latents,
                               const std::optional<at::Tensor>& time_emb, int64_t tokens_per_frame,
                               const at::Tensor& media_weight, const at::Tensor& media_bias,
                               const at::Tensor& latents_weight, const at::Tensor& latents_bias, double eps) {
  check_rows(media, "media", media);
  check_rows(latents, "latents", media);
  const RowDType dtype = row_dtype(media, "media");
  TORCH_CHECK_VALUE(latents.size(0) == media.size(0), "latents has batch ", latents.size(0), " but media has ",
                    media.size(0));
  const int64_t dim = media.size(2);
  TORCH_CHECK_VALUE(dim > 0 && dim % 8 == 0 && dim <= kPerceiverKvMaxDim, "media dim must be a positive multiple of 8 ",
                    "and at most ", kPerceiverKvMaxDim, ", got ", dim);
  TORCH_CHECK_VALUE(media.size(0) * (media.size(1) + latents.size(1)) < (int64_t{1} << 31) &&
                        media.size(1) + latents.size(1) < (int64_t{1} << 31),
                    "media/latents are too large");
  check_vector(media_weight, "media_weight", media);
  check_vector(media_bias, "media_bias", media);
  check_vector(latents_weight, "latents_weight", media);
  check_vector(latents_bias, "latents_bias", media);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be non-negative, got ", eps);
  PerceiverKvInputArgs a{};
  a.dtype = dtype;
  a.batch = static_cast<int32_t>(media.size(0));
  a.media_rows = static_cast<int32_t>(media.size(1));
  a.latent_rows = static_cast<int32_t>(latents.size(1));
  a.dim = static_cast<int32_t>(dim);
  a.media = media.data_ptr();
  a.latents = latents.data_ptr();
  a.media_batch_stride = batch_stride(media);
  a.latents_batch_stride = batch_stride(latents);
  a.tokens_per_frame = 1;
  if (time_emb.has_value()) {
    const at::Tensor& emb = *time_emb;
    check_positive(tokens_per_frame, "tokens_per_frame");
    TORCH_CHECK_VALUE(emb.dim() == 2 && emb.size(1) == dim && emb.is_contiguous(), "time_emb must be a contiguous ",
                      "(frames, ", dim, ") tensor, got ", emb.sizes());
    TORCH_CHECK_TYPE(emb.scalar_type() == media.scalar_type(), "time_emb has dtype ", emb.scalar_type(),
                     " but media has ", media.scalar_type());
    TORCH_CHECK_VALUE(emb.device() == media.device(), "time_emb is on ", emb.device(), " but media is on ",
                      media.device());
    TORCH_CHECK_VALUE((media.size(1) + tokens_per_frame - 1) / tokens_per_frame <= emb.size(0), "time_emb has ",
                      emb.size(0), " frames but media has ", media.size(1), " rows of ", tokens_per_frame,
                      " tokens per frame");
    check_aligned(emb, "time_emb");
    a.time_emb = emb.data_ptr();
    a.tokens_per_frame = static_cast<int32_t>(tokens_per_frame);
  }
  a.media_weight = media_weight.data_ptr();
  a.media_bias = media_bias.data_ptr();
  a.latents_weight = latents_weight.data_ptr();
  a.latents_bias = latents_bias.data_ptr();
  a.eps = static_cast<float>(eps);
  return a;
}

int32_t device_sms(const at::Tensor& t) {
  int value = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, t.device().index());
  TORCH_CHECK(status == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(status));
  return value;
}

}  // namespace

at::Tensor perceiver_kv_input_fwd(const at::Tensor& media, const at::Tensor& latents,
                                  const std::optional<at::Tensor>& time_emb, int64_t tokens_per_frame,
                                  const at::Tensor& media_weight, const at::Tensor& media_bias,
                                  const at::Tensor& latents_weight, const at::Tensor& latents_bias, double eps) {
  PerceiverKvInputArgs a = make_args(media, latents, time_emb, tokens_per_frame, media_weight, media_bias,
                                     latents_weight, latents_bias, eps);
  const c10::cuda::CUDAGuard guard(media.device());
  at::Tensor kv = at::empty({media.size(0), media.size(1) + latents.size(1), media.size(2)}, media.options());
  a.kv = kv.data_ptr();
  const cudaError_t status = launch_perceiver_kv_input_fwd(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "perceiver_kv_input_fwd launch failed: ", cudaGetErrorString(status));
  return kv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> perceiver_kv_input_bwd(
    const at::Tensor& d_kv, const at::Tensor& media, const at::Tensor& latents,
    const std::optional<at::Tensor>& time_emb, int64_t tokens_per_frame, const at::Tensor& media_weight,
    const at::Tensor& media_bias, const at::Tensor& latents_weight, const at::Tensor& latents_bias, double eps) {
  PerceiverKvInputGradArgs g{};
  g.forward = make_args(media, latents, time_emb, tokens_per_frame, media_weight, media_bias, latents_weight,
                        latents_bias, eps);
  const int64_t kv_rows = media.size(1) + latents.size(1);
  check_rows(d_kv, "d_kv", media);
  TORCH_CHECK_VALUE(d_kv.size(0) == media.size(0) && d_kv.size(1) == kv_rows, "d_kv must have shape (",
                    media.size(0), ", ", kv_rows, ", ", media.size(2), "), got ", d_kv.sizes());
  const c10::cuda::CUDAGuard guard(media.device());
  const at::Tensor dy = d_kv.contiguous();
  at::Tensor d_media = at::empty({media.size(0), media.size(1), media.size(2)}, media.options());
  at::Tensor d_latents = at::empty({latents.size(0), latents.size(1), latents.size(2)}, latents.options());
  const int32_t sms = device_sms(media);
  g.media_warps = perceiver_kv_input_bwd_warps(media.size(0) * media.size(1), sms);
  g.latent_warps = perceiver_kv_input_bwd_warps(latents.size(0) * latents.size(1), sms);
  at::Tensor partials =
      at::zeros({g.media_warps + g.latent_warps, 2, media.size(2)}, media.options().dtype(at::kFloat));
  g.d_kv = dy.data_ptr();
  g.d_media = d_media.data_ptr();
  g.d_latents = d_latents.data_ptr();
  g.partials = partials.data_ptr<float>();
  const cudaError_t status = launch_perceiver_kv_input_bwd(g, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "perceiver_kv_input_bwd launch failed: ", cudaGetErrorString(status));
  // Fixed-order sums of the per-warp partials: deterministic. Each gradient is its own tensor (rows of one
  // sum would alias each other, which torch.library custom ops refuse).
  const auto param_grad = [&](int64_t first_warp, int64_t warps, int64_t which) {
    return partials.narrow(0, first_warp, warps).select(1, which).sum(0).to(media.scalar_type());
  };
  return {d_media, d_latents, param_grad(0, g.media_warps, 0), param_grad(0, g.media_warps, 1),
          param_grad(g.media_warps, g.latent_warps, 0), param_grad(g.media_warps, g.latent_warps, 1)};
}

void register_perceiver(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("perceiver_kv_input_fwd", &perceiver_kv_input_fwd, py::arg("media"), py::arg("latents"), py::arg("time_emb"),
        py::arg("tokens_per_frame"), py::arg("media_weight"), py::arg("media_bias"), py::arg("latents_weight"),
        py::arg("latents_bias"), py::arg("eps"),
        "kv (N, m + l, D) = concat(LN_media(media + time_emb[row // tokens_per_frame]), LN_latents(latents))");
  m.def("perceiver_kv_input_bwd", &perceiver_kv_input_bwd, py::arg("d_kv"), py::arg("media"), py::arg("latents"),
        py::arg("time_emb"), py::arg("tokens_per_frame"), py::arg("media_weight"), py::arg("media_bias"),
        py::arg("latents_weight"), py::arg("latents_bias"), py::arg("eps"),
        "-> (d_media, d_latents, d_media_weight, d_media_bias, d_latents_weight, d_latents_bias)");
}

}  // namespace flamingo_fast

#endif  // FLAMINGO_FAST_WITH_CUDA
