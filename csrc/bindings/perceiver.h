// Python entry points of the fused Perceiver resampler KV-input kernel (CUDA builds only).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace flamingo_fast {

// kv (N, m + l, D) = concat(LayerNorm_media(media + time_emb[row / tokens_per_frame]), LayerNorm_latents(latents)).
at::Tensor perceiver_kv_input_fwd(const at::Tensor& media, const at::Tensor& latents,
                                  const std::optional<at::Tensor>& time_emb, int64_t tokens_per_frame,
                                  const at::Tensor& media_weight, const at::Tensor& media_bias,
                                  const at::Tensor& latents_weight, const at::Tensor& latents_bias, double eps);

// -> (d_media, d_latents, d_media_weight, d_media_bias, d_latents_weight, d_latents_bias). d_media is also the
// gradient of (media + time_emb), so d_time_emb is d_media summed over the rows of each frame.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> perceiver_kv_input_bwd(
    const at::Tensor& d_kv, const at::Tensor& media, const at::Tensor& latents,
    const std::optional<at::Tensor>& time_emb, int64_t tokens_per_frame, const at::Tensor& media_weight,
    const at::Tensor& media_bias, const at::Tensor& latents_weight, const at::Tensor& latents_bias, double eps);

void register_perceiver(pybind11::module_& m);

}  // namespace flamingo_fast
