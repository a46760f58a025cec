#pragma once

#include <torch/extension.h>

#include <tuple>

namespace flamingo_fast {

// Returns (q_plan (B, ceil(S/block_q), 2), k_plan (B, ceil(num_keys/block_k), 2)), int32 [begin, end) ranges:
// the keys each query block visits and the query rows that visit each key block.
std::tuple<at::Tensor, at::Tensor> plan_media_tiles(const at::Tensor& media_index, int64_t num_keys,
                                                    int64_t latents_per_media, int64_t block_q, int64_t block_k,
                                                    bool only_immediate);

}  // namespace flamingo_fast
