// Python entry points of the Hopper attention engine (flamingo_fast._C.*_fwd / *_bwd), built with CUDA only.
// Tensors are BSHD with a contiguous last dimension; see flamingo_fast/ops/cuda_backend.py for the contract.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace flamingo_fast {

using FwdResult = std::tuple<at::Tensor, at::Tensor>;              // (out, lse)
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (dq, dk, dv)

FwdResult attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale);
BwdResult attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, bool causal, double scale);

FwdResult media_cross_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& media_index, int64_t latents_per_media, bool only_immediate,
                                    double scale);
BwdResult media_cross_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                    const at::Tensor& media_index, int64_t latents_per_media, bool only_immediate,
                                    double scale);

FwdResult perceiver_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
BwdResult perceiver_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale);

// Registers the functions above on the module.
void register_attention(pybind11::module_& m);

// Adds what the attention kernels were built for to build_info(): attention_dtypes (["bfloat16"] plus
// "float16" when built with FLAMINGO_FAST_ATTENTION_FP16), attention_head_dims, attention_backward_deterministic.
void add_attention_build_info(pybind11::dict& info);

}  // namespace flamingo_fast
