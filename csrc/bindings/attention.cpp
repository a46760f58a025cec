// Python entry points of the Hopper attention engine: argument checks (messages name the argument and map to
// TypeError / ValueError), output allocation, the current stream and device, media tile planning, dispatch.
// Compiled only into CUDA builds of the extension.
#ifdef FLAMINGO_FAST_WITH_CUDA
#include "attention.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"
#include "flamingo_fast/attention_launch.h"
#include "flamingo_fast/attention_params.h"
#include "flamingo_fast/media_tile_plan_cuda.h"

namespace flamingo_fast {
namespace {

constexpr int64_t kMaxInt32 = 2147483647;

AttentionDType attention_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) return AttentionDType::kBFloat16;
  if (t.scalar_type() == at::kHalf) {
    TORCH_CHECK_TYPE(attention_fp16_built(), name, " is float16, but flamingo_fast._C was built without the float16 ",
                     "attention kernels (rebuild with FLAMINGO_FAST_ATTENTION_FP16=1); use bfloat16");
    return AttentionDType::kFloat16;
  }
  TORCH_CHECK_TYPE(false, name, " must be bfloat16", attention_fp16_built() ? " or float16" : "", ", got ",
                   t.scalar_type());
  return AttentionDType::kBFloat16;
}

// Rank-4 BSHD tensor on a CUDA device, head_dim contiguous, TMA-compatible (16-byte aligned base and strides).
void check_bshd(const at::Tensor& t, const char* name) {
  check_rank(t, name, 4, "(batch, seq, heads, head_dim)");
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, name, " must have a contiguous last (head_dim) dimension, got ",
                    "strides ", t.strides());
  const int64_t item = t.element_size();
  for (int dim = 0; dim < 3; ++dim) {
    TORCH_CHECK_VALUE(t.size(dim) == 1 || (t.stride(dim) * item) % 16 == 0, name, " stride of dimension ", dim, " (",
                      t.stride(dim), " elements) must be a multiple of 16 bytes for the TMA loads; call .contiguous()");
  }
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " data must be 16-byte aligned; ",
                    "call .contiguous() or .clone()");
  for (int dim = 0; dim < 3; ++dim) {
    TORCH_CHECK_VALUE(t.size(dim) < kMaxInt32, name, " dimension ", dim, " is too large (", t.size(dim), ")");
  }
}

// Element strides; a size-1 dimension may carry any stride in torch, so it gets a valid one for TMA.
BshdStrides bshd_strides(const at::Tensor& t) {
  const int64_t head = t.size(2) == 1 ? t.size(3) : t.stride(2);
  const int64_t row = t.size(1) == 1 ? t.size(2) * head : t.stride(1);
  const int64_t batch = t.size(0) == 1 ? t.size(1) * row : t.stride(0);
  return {batch, row, head};
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                   " has ", ref.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
                    "; all inputs must share a device");
}

int device_attribute(cudaDeviceAttr attribute, const at::Tensor& t) {
  int value = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&value, attribute, t.device().index());
  TORCH_CHECK(status == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(status));
  return value;
}

int32_t num_sms(const at::Tensor& t) { return device_attribute(cudaDevAttrMultiProcessorCount, t); }

struct CheckedInputs {
  AttentionDType dtype;
  AttentionProblem problem;
};

CheckedInputs check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_bshd(q, "q");
  check_bshd(k, "k");
  check_bshd(v, "v");
  const AttentionDType dtype = attention_dtype(q, "q");
  check_same(k, "k", q, "q");
  check_same(v, "v", q, "q");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", k.sizes(), " and v ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k has batch size ", k.size(0), " but q has ", q.size(0));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "k has head_dim ", k.size(3), " but q has ", q.size(3));
  TORCH_CHECK_VALUE(attention_head_dim_supported(static_cast<int>(q.size(3))), "q head_dim must be 64, 96 or 128 for ",
                    "the CUDA kernels, got ", q.size(3));
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "q heads (", q.size(2),
                    ") must be a positive multiple of k/v heads (", k.size(2), ")");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0, "scale must be finite and non-zero, got ", scale);
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, q);
  TORCH_CHECK(major == 9, "the attention kernels need an sm_90 (Hopper) GPU; ", q.device(), " is sm_", major,
              device_attribute(cudaDevAttrComputeCapabilityMinor, q));
  const AttentionProblem problem{static_cast<int32_t>(q.size(0)), static_cast<int32_t>(q.size(1)),
                                 static_cast<int32_t>(k.size(1)), static_cast<int32_t>(q.size(2)),
                                 static_cast<int32_t>(k.size(2)), static_cast<int32_t>(q.size(3))};
  return {dtype, problem};
}

void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  check_bshd(dout, "dout");
  check_bshd(out, "out");
  check_same(dout, "dout", q, "q");
  check_same(out, "out", q, "q");
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
                    "lse must have shape (batch, heads_q, seqlen_q) = (", q.size(0), ", ", q.size(2), ", ", q.size(1),
                    "), got ", lse.sizes());
}


void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "flamingo_fast: ", what, " failed: ", cudaGetErrorString(status));
}

// The media mask's device inputs: int32 index and the tile plans, kept alive by the returned tensors.
struct MediaInputs {
  at::Tensor index;
  at::Tensor q_plan;
  at::Tensor k_plan;
  MediaMaskParams params;
};

MediaInputs prepare_media(const at::Tensor& media_index, const at::Tensor& q, const at::Tensor& k,
                          int64_t latents_per_media, bool only_immediate) {
  check_rank(media_index, "media_index", 2, "(batch, seq)");
  check_index_dtype(media_index, "media_index");
  check_positive(latents_per_media, "latents_per_media");
  TORCH_CHECK_VALUE(media_index.size(0) == q.size(0) && media_index.size(1) == q.size(1),
                    "media_index must have shape (batch, seq) = (", q.size(0), ", ", q.size(1), "), got ",
                    media_index.sizes());
  TORCH_CHECK_VALUE(media_index.device() == q.device(), "media_index is on ", media_index.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(k.size(1) % latents_per_media == 0, "k/v seq length ", k.size(1),
                    " must be a multiple of latents_per_media (", latents_per_media, ")");
  MediaInputs media;
  media.index = media_index.to(at::kInt).contiguous();
  const AttentionTiles tiles = attention_tiles(AttentionMaskKind::kMedia);
  static_assert(attention_tiles(AttentionMaskKind::kMedia).fwd_block_m ==
                    attention_tiles(AttentionMaskKind::kMedia).dq_block_m,
                "the forward and dQ kernels share the query-tile plan");
  const MediaMaskShape shape{static_cast<int32_t>(q.size(1)), static_cast<int32_t>(k.size(1)),
                             static_cast<int32_t>(latents_per_media), only_immediate};
  const int32_t q_blocks = ceil_div(shape.seq_len, tiles.fwd_block_m);
  const int32_t k_blocks = ceil_div(shape.num_keys, tiles.dkdv_block_n);
  const auto options = media.index.options();
  media.q_plan = at::empty({q.size(0), q_blocks, 2}, options);
  media.k_plan = at::empty({q.size(0), k_blocks, 2}, options);
  check_launch(launch_plan_media_tiles(media.index.data_ptr(), false, static_cast<int32_t>(q.size(0)), shape,
                                       tiles.fwd_block_m, tiles.dkdv_block_n,
                                       reinterpret_cast<IndexRange*>(media.q_plan.data_ptr<int32_t>()),
                                       reinterpret_cast<IndexRange*>(media.k_plan.data_ptr<int32_t>()),
                                       c10::cuda::getCurrentCUDAStream()),
               "media tile planning");
  media.params.media_index = media.index.data_ptr<int32_t>();
  media.params.q_plan = reinterpret_cast<const IndexRange*>(media.q_plan.data_ptr<int32_t>());
  media.params.k_plan = reinterpret_cast<const IndexRange*>(media.k_plan.data_ptr<int32_t>());
  media.params.plan_block_q = tiles.fwd_block_m;
  media.params.plan_block_k = tiles.dkdv_block_n;
  media.params.q_plan_blocks = q_blocks;
  media.params.k_plan_blocks = k_blocks;
  media.params.latents_per_media = static_cast<int32_t>(latents_per_media);
  media.params.only_immediate = only_immediate;
  return media;
}

FwdResult run_forward(AttentionMaskKind mask, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      double scale, const MediaMaskParams& media, const CheckedInputs& in) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.size(1) == 0) {  // no keys at all: every row is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AttentionFwdArgs args{};
  args.problem = in.problem;
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.q_strides = bshd_strides(q);
  args.k_strides = bshd_strides(k);
  args.v_strides = bshd_strides(v);
  args.out = out.data_ptr();
  args.out_strides = bshd_strides(out);
  args.lse = lse.data_ptr<float>();
  args.softmax_scale = static_cast<float>(scale);
  args.media = media;
  args.num_sms = num_sms(q);
  check_launch(attention_fwd_dispatch(in.dtype, mask, args, c10::cuda::getCurrentCUDAStream()), "attention forward");
  return {out, lse};
}

BwdResult run_backward(AttentionMaskKind mask, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                       const MediaMaskParams& media, const CheckedInputs& in) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor lse_c = lse.contiguous();
  const int64_t padded = (q.size(1) + kAttentionRowPadding - 1) / kAttentionRowPadding * kAttentionRowPadding;
  at::Tensor workspace = at::empty({2, q.size(0), q.size(2), padded}, q.options().dtype(at::kFloat));
  AttentionBwdArgs args{};
  args.problem = in.problem;
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.out = out.data_ptr();
  args.dout = dout.data_ptr();
  args.q_strides = bshd_strides(q);
  args.k_strides = bshd_strides(k);
  args.v_strides = bshd_strides(v);
  args.out_strides = bshd_strides(out);
  args.dout_strides = bshd_strides(dout);
  args.lse = lse_c.data_ptr<float>();
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.dq_strides = bshd_strides(dq);
  args.dk_strides = bshd_strides(dk);
  args.dv_strides = bshd_strides(dv);
  args.lse_log2 = workspace[0].data_ptr<float>();
  args.dpsum = workspace[1].data_ptr<float>();
  args.seqlen_q_padded = static_cast<int32_t>(padded);
  args.softmax_scale = static_cast<float>(scale);
  args.media = media;
  args.num_sms = num_sms(q);
  check_launch(attention_bwd_dispatch(in.dtype, mask, args, c10::cuda::getCurrentCUDAStream()), "attention backward");
  return {dq, dk, dv};
}

}  // namespace

FwdResult attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  const CheckedInputs in = check_qkv(q, k, v, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  return run_forward(causal ? AttentionMaskKind::kCausal : AttentionMaskKind::kNone, q, k, v, scale, {}, in);
}

BwdResult attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  const CheckedInputs in = check_qkv(q, k, v, scale);
  check_backward_inputs(dout, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  return run_backward(causal ? AttentionMaskKind::kCausal : AttentionMaskKind::kNone, dout, q, k, v, out, lse, scale,
                      {}, in);
}

FwdResult media_cross_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& media_index, int64_t latents_per_media, bool only_immediate,
                                    double scale) {
  const CheckedInputs in = check_qkv(q, k, v, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const MediaInputs media = prepare_media(media_index, q, k, latents_per_media, only_immediate);
  return run_forward(AttentionMaskKind::kMedia, q, k, v, scale, media.params, in);
}

BwdResult media_cross_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& media_index, int64_t latents_per_media, bool only_immediate,
                                    double scale) {
  const CheckedInputs in = check_qkv(q, k, v, scale);
  check_backward_inputs(dout, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const MediaInputs media = prepare_media(media_index, q, k, latents_per_media, only_immediate);
  return run_backward(AttentionMaskKind::kMedia, dout, q, k, v, out, lse, scale, media.params, in);
}

FwdResult perceiver_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const CheckedInputs in = check_qkv(q, k, v, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  return run_forward(AttentionMaskKind::kNone, q, k, v, scale, {}, in);
}

BwdResult perceiver_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale) {
  const CheckedInputs in = check_qkv(q, k, v, scale);
  check_backward_inputs(dout, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  return run_backward(AttentionMaskKind::kNone, dout, q, k, v, out, lse, scale, {}, in);
}

void add_attention_build_info(pybind11::dict& info) {
  std::vector<std::string> dtypes{"bfloat16"};
  if (attention_fp16_built()) dtypes.push_back("float16");
  info["attention_dtypes"] = pybind11::cast(dtypes);
  info["attention_head_dims"] = pybind11::cast(std::vector<int>{64, 96, 128});
  // dQ and dK/dV are separate passes that each own their output tiles (no atomics), so the backward is
  // deterministic whatever FLAMINGO_FAST_DETERMINISTIC says.
  info["attention_backward_deterministic"] = true;
}

void register_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal"), py::arg("scale"),
        "Self/cross attention, BSHD, GQA; causal is bottom-right aligned. -> (out, lse (B, Hq, Sq) float32)");
  m.def("attention_bwd", &attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("causal"), py::arg("scale"), "Gradients of attention_fwd -> (dq, dk, dv)");
  m.def("media_cross_attention_fwd", &media_cross_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("media_index"), py::arg("latents_per_media"), py::arg("only_immediate"), py::arg("scale"),
        "Media cross-attention: each row sees the latents of its image (or images 0..index). -> (out, lse)");
  m.def("media_cross_attention_bwd", &media_cross_attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("media_index"), py::arg("latents_per_media"),
        py::arg("only_immediate"), py::arg("scale"), "Gradients of media_cross_attention_fwd -> (dq, dk, dv)");
  m.def("perceiver_attention_fwd", &perceiver_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("scale"), "Unmasked attention of the Perceiver resampler -> (out, lse)");
  m.def("perceiver_attention_bwd", &perceiver_attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        "Gradients of perceiver_attention_fwd -> (dq, dk, dv)");
}

}  // namespace flamingo_fast

#endif  // FLAMINGO_FAST_WITH_CUDA
