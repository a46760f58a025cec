// Launcher of the device-side media tile planner (csrc/attention/media_tile_plan.cu). Torch-free, so the
// CMake build compiles it without PyTorch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flamingo_fast/media_tile_plan.h"

namespace flamingo_fast {

// media_index: (batch, shape.seq_len) contiguous, int32 or int64 (index_is_int64).
// q_plan: (batch, ceil(seq_len / block_q)) ranges; k_plan: (batch, ceil(num_keys / block_k)) ranges.
// Runs on `stream` without synchronising the host.
cudaError_t launch_plan_media_tiles(const void* media_index, bool index_is_int64, int32_t batch,
                                    MediaMaskShape shape, int32_t block_q, int32_t block_k, IndexRange* q_plan,
                                    IndexRange* k_plan, cudaStream_t stream);

}  // namespace flamingo_fast
