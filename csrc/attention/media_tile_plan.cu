// Device-side media tile planning: the same plan as the host, computed where media_index already lives,
// so a kernel launch sequence never waits on a device-to-host copy.
#include "flamingo_fast/media_tile_plan_cuda.h"

namespace flamingo_fast {
namespace {

template <typename IndexT>
__global__ void plan_media_tiles_kernel(const IndexT* __restrict__ media_index, MediaMaskShape shape,
                                        int32_t block_q, int32_t block_k, int32_t blocks_per_row,
                                        int32_t num_q_blocks, int32_t num_k_blocks, IndexRange* __restrict__ q_plan,
                                        IndexRange* __restrict__ k_plan) {
  const int32_t row = blockIdx.y;
  const int32_t block = blockIdx.x * blockDim.x + threadIdx.x;
  if (block >= blocks_per_row) return;
  plan_media_block(media_index + static_cast<int64_t>(row) * shape.seq_len, shape, block_q, block_k, block,
                   q_plan + static_cast<int64_t>(row) * num_q_blocks, k_plan + static_cast<int64_t>(row) * num_k_blocks);
}

template <typename IndexT>
cudaError_t launch(const IndexT* media_index, int32_t batch, MediaMaskShape shape, int32_t block_q, int32_t block_k,
                   IndexRange* q_plan, IndexRange* k_plan, cudaStream_t stream) {
  const int32_t num_q_blocks = ceil_div(shape.seq_len, block_q);
  const int32_t num_k_blocks = ceil_div(shape.num_keys, block_k);
  const int32_t blocks_per_row = num_q_blocks > num_k_blocks ? num_q_blocks : num_k_blocks;
  if (batch == 0 || blocks_per_row == 0) return cudaSuccess;
  constexpr int32_t kThreads = 128;
  const dim3 grid(ceil_div(blocks_per_row, kThreads), batch);
  plan_media_tiles_kernel<IndexT><<<grid, kThreads, 0, stream>>>(media_index, shape, block_q, block_k, blocks_per_row,
                                                                 num_q_blocks, num_k_blocks, q_plan, k_plan);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_plan_media_tiles(const void* media_index, bool index_is_int64, int32_t batch,
                                    MediaMaskShape shape, int32_t block_q, int32_t block_k, IndexRange* q_plan,
                                    IndexRange* k_plan, cudaStream_t stream) {
  if (index_is_int64) {
    return launch(static_cast<const int64_t*>(media_index), batch, shape, block_q, block_k, q_plan, k_plan, stream);
  }
  return launch(static_cast<const int32_t*>(media_index), batch, shape, block_q, block_k, q_plan, k_plan, stream);
}

}  // namespace flamingo_fast
