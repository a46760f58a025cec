// Python entry point of the media tile planner: host loop for CPU tensors, the CUDA kernel for GPU ones.
#include "media_tile_plan.h"

#include <ATen/Parallel.h>

#include "checks.h"
#include "flamingo_fast/media_tile_plan.h"
#ifdef FLAMINGO_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flamingo_fast/media_tile_plan_cuda.h"
#endif

namespace flamingo_fast {
namespace {

static_assert(sizeof(IndexRange) == 2 * sizeof(int32_t), "IndexRange must be two packed int32");

template <typename IndexT>
void plan_on_host(const at::Tensor& media_index, MediaMaskShape shape, int32_t block_q, int32_t block_k,
                  at::Tensor& q_plan, at::Tensor& k_plan) {
  const auto* index = media_index.data_ptr<IndexT>();
  auto* q_out = reinterpret_cast<IndexRange*>(q_plan.data_ptr<int32_t>());
  auto* k_out = reinterpret_cast<IndexRange*>(k_plan.data_ptr<int32_t>());
  const int32_t num_q_blocks = q_plan.size(1), num_k_blocks = k_plan.size(1);
  const int32_t blocks_per_row = std::max(num_q_blocks, num_k_blocks);
  at::parallel_for(0, media_index.size(0), 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      for (int32_t block = 0; block < blocks_per_row; ++block) {
        plan_media_block(index + row * shape.seq_len, shape, block_q, block_k, block, q_out + row * num_q_blocks,
                         k_out + row * num_k_blocks);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> plan_media_tiles(const at::Tensor& media_index, int64_t num_keys,
                                                    int64_t latents_per_media, int64_t block_q, int64_t block_k,
                                                    bool only_immediate) {
  check_rank(media_index, "media_index", 2, "(batch, seq_len)");
  check_index_dtype(media_index, "media_index");
  check_positive(latents_per_media, "latents_per_media");
  check_positive(block_q, "block_q");
  check_positive(block_k, "block_k");
  TORCH_CHECK_VALUE(num_keys >= 0 && num_keys % latents_per_media == 0, "num_keys must be a non-negative multiple of ",
                    "latents_per_media (", latents_per_media, "), got ", num_keys);
  TORCH_CHECK_VALUE(media_index.size(1) < INT32_MAX && num_keys < INT32_MAX, "media_index length and num_keys ",
                    "must fit in int32");

  const at::Tensor index = media_index.contiguous();
  const MediaMaskShape shape{static_cast<int32_t>(index.size(1)), static_cast<int32_t>(num_keys),
                             static_cast<int32_t>(latents_per_media), only_immediate};
  const int64_t num_q_blocks = ceil_div(shape.seq_len, static_cast<int32_t>(block_q));
  const int64_t num_k_blocks = ceil_div(shape.num_keys, static_cast<int32_t>(block_k));
  const auto options = index.options().dtype(at::kInt);
  at::Tensor q_plan = at::empty({index.size(0), num_q_blocks, 2}, options);
  at::Tensor k_plan = at::empty({index.size(0), num_k_blocks, 2}, options);

  if (index.is_cuda()) {
#ifdef FLAMINGO_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(index.device());
    const cudaError_t status = launch_plan_media_tiles(
        index.data_ptr(), index.scalar_type() == at::kLong, static_cast<int32_t>(index.size(0)), shape,
        static_cast<int32_t>(block_q), static_cast<int32_t>(block_k),
        reinterpret_cast<IndexRange*>(q_plan.data_ptr<int32_t>()), reinterpret_cast<IndexRange*>(k_plan.data_ptr<int32_t>()),
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "plan_media_tiles kernel launch failed: ", cudaGetErrorString(status));
#else
    TORCH_CHECK(false, "media_index is on ", index.device(), " but flamingo_fast._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK_VALUE(index.is_cpu(), "media_index must be a CPU or CUDA tensor, got ", index.device());
    if (index.scalar_type() == at::kLong) {
      plan_on_host<int64_t>(index, shape, block_q, block_k, q_plan, k_plan);
    } else {
      plan_on_host<int32_t>(index, shape, block_q, block_k, q_plan, k_plan);
    }
  }
  return {q_plan, k_plan};
}

}  // namespace flamingo_fast
