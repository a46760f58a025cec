// Fused Perceiver resampler KV input: LayerNorm(media + time embedding) and LayerNorm(latents), written
// concatenated, forward and backward (see flamingo_fast/perceiver_kv_input.h).
//
// Memory-bound: one warp per row, each lane owns 8-element chunks (16-byte accesses for bf16/fp16) spaced
// 32 chunks apart, so a warp's loads are contiguous 512-byte segments. The row stays in registers between the
// statistics and the normalisation, so every input byte is read once and every output byte written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flamingo_fast/perceiver_kv_input.h"

namespace flamingo_fast {
namespace {

constexpr int kThreadsFwd = 256;
constexpr int kThreadsBwd = 128;
constexpr int kWarpsPerSmBwd = 32;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// 8 consecutive elements <-> 8 floats.
__device__ __forceinline__ void load8(const float* p, float (&x)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float (&x)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&x)[8]) {
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    x[2 * i] = f.x, x[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&x)[8]) {
  uint4 bits;
  auto* pairs = reinterpret_cast<__nv_bfloat162*>(&bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = bits;
}
__device__ __forceinline__ void load8(const __half* p, float (&x)[8]) {
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  const auto* pairs = reinterpret_cast<const __half2*>(&bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    x[2 * i] = f.x, x[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(__half* p, const float (&x)[8]) {
  uint4 bits;
  auto* pairs = reinterpret_cast<__half2*>(&bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = bits;
}

// One row's input (media rows get their frame's time embedding) and its LayerNorm statistics.
template <class T, int kChunks>
struct Row {
  float x[kChunks][8];
  float mean;
  float rstd;

  __device__ __forceinline__ void load(const T* src, const T* emb, int chunks, int lane, int dim, float eps) {
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int chunk = c * 32 + lane;
      if (chunk < chunks) {
        load8(src + chunk * 8, x[c]);
        if (emb != nullptr) {
          float e[8];
          load8(emb + chunk * 8, e);
#pragma unroll
          for (int i = 0; i < 8; ++i) x[c][i] += e[i];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) sum += x[c][i];
      }
    }
    mean = warp_sum(sum) / dim;
    float squares = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c * 32 + lane < chunks) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float d = x[c][i] - mean;
          squares += d * d;
        }
      }
    }
    rstd = rsqrtf(warp_sum(squares) / dim + eps);  // two-pass variance: no cancellation
  }
};

template <class T, int kChunks>
__global__ void __launch_bounds__(kThreadsFwd) perceiver_kv_input_fwd_kernel(PerceiverKvInputArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreadsFwd / 32);
  const int64_t rows_per_batch = a.media_rows + a.latent_rows;
  const int64_t rows = a.batch * rows_per_batch;
  const int chunks = a.dim / 8;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreadsFwd + threadIdx.x) / 32; row < rows; row += warps) {
    const int64_t n = row / rows_per_batch;
    const int32_t r = static_cast<int32_t>(row - n * rows_per_batch);
    const bool media = r < a.media_rows;
    const T* src = media ? static_cast<const T*>(a.media) + n * a.media_batch_stride + static_cast<int64_t>(r) * a.dim
                         : static_cast<const T*>(a.latents) + n * a.latents_batch_stride +
                               static_cast<int64_t>(r - a.media_rows) * a.dim;
    const T* emb = media && a.time_emb != nullptr
                       ? static_cast<const T*>(a.time_emb) + static_cast<int64_t>(r / a.tokens_per_frame) * a.dim
                       : nullptr;
    const T* weight = static_cast<const T*>(media ? a.media_weight : a.latents_weight);
    const T* bias = static_cast<const T*>(media ? a.media_bias : a.latents_bias);
    Row<T, kChunks> x;
    x.load(src, emb, chunks, lane, a.dim, a.eps);
    T* dst = static_cast<T*>(a.kv) + row * a.dim;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int chunk = c * 32 + lane;
      if (chunk < chunks) {
        float w[8], b[8], y[8];
        load8(weight + chunk * 8, w);
        load8(bias + chunk * 8, b);
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = (x.x[c][i] - x.mean) * x.rstd * w[i] + b[i];
        store8(dst + chunk * 8, y);
      }
    }
  }
}

// One segment (the media rows or the latent rows) of the backward.
struct BwdSegment {
  const void* x;
  int64_t x_batch_stride;
  int32_t rows;            // per batch element
  int32_t kv_row_offset;   // 0 (media) or m (latents)
  int32_t kv_rows;         // m + l
  const void* emb;         // time embedding (media only) or null
  int32_t tokens_per_frame;
  const void* weight;
  const void* d_kv;
  void* dx;
  float* partials;  // (warps, 2, D)
};

template <class T, int kChunks>
__global__ void __launch_bounds__(kThreadsBwd) perceiver_kv_input_bwd_kernel(BwdSegment s, int32_t batch,
                                                                           int32_t dim, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreadsBwd + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreadsBwd / 32);
  const int64_t rows = static_cast<int64_t>(batch) * s.rows;
  const int chunks = dim / 8;
  const T* weight = static_cast<const T*>(s.weight);
  float dweight[kChunks][8] = {}, dbias[kChunks][8] = {};
  for (int64_t row = warp; row < rows; row += warps) {
    const int64_t n = row / s.rows;
    const int32_t r = static_cast<int32_t>(row - n * s.rows);
    const T* src = static_cast<const T*>(s.x) + n * s.x_batch_stride + static_cast<int64_t>(r) * dim;
    const T* emb =
        s.emb != nullptr ? static_cast<const T*>(s.emb) + static_cast<int64_t>(r / s.tokens_per_frame) * dim : nullptr;
    Row<T, kChunks> x;
    x.load(src, emb, chunks, lane, dim, eps);
    const T* dy_row = static_cast<const T*>(s.d_kv) + (n * s.kv_rows + s.kv_row_offset + r) * dim;
    // g = dy * w; dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int chunk = c * 32 + lane;
      if (chunk < chunks) {
        float dy[8], w[8];
        load8(dy_row + chunk * 8, dy);
        load8(weight + chunk * 8, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          x.x[c][i] = (x.x[c][i] - x.mean) * x.rstd;  // xhat from here on
          const float g = dy[i] * w[i];
          sum_g += g;
          sum_gx += g * x.x[c][i];
          dweight[c][i] += dy[i] * x.x[c][i];
          dbias[c][i] += dy[i];
        }
      }
    }
    const float mean_g = warp_sum(sum_g) / dim;
    const float mean_gx = warp_sum(sum_gx) / dim;
    T* dx_row = static_cast<T*>(s.dx) + (n * s.rows + r) * dim;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int chunk = c * 32 + lane;
      if (chunk < chunks) {
        float dy[8], w[8], dx[8];
        load8(dy_row + chunk * 8, dy);  // second read of the row: an L1 hit
        load8(weight + chunk * 8, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) dx[i] = x.rstd * (dy[i] * w[i] - mean_g - x.x[c][i] * mean_gx);
        store8(dx_row + chunk * 8, dx);
      }
    }
  }
  float* out = s.partials + warp * 2 * dim;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int chunk = c * 32 + lane;
    if (chunk < chunks) {
      store8(out + chunk * 8, dweight[c]);
      store8(out + dim + chunk * 8, dbias[c]);
    }
  }
}

template <class T, int kChunks>
cudaError_t launch_fwd(const PerceiverKvInputArgs& a, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(a.batch) * (a.media_rows + a.latent_rows);
  constexpr int kRowsPerBlock = kThreadsFwd / 32;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
  perceiver_kv_input_fwd_kernel<T, kChunks><<<grid, kThreadsFwd, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class T, int kChunks>
cudaError_t launch_bwd(const PerceiverKvInputGradArgs& g, cudaStream_t stream) {
  const PerceiverKvInputArgs& a = g.forward;
  const int32_t kv_rows = a.media_rows + a.latent_rows;
  constexpr int kWarpsPerBlock = kThreadsBwd / 32;
  const BwdSegment media{a.media,     a.media_batch_stride, a.media_rows, 0,         kv_rows,    a.time_emb,
                         a.tokens_per_frame, a.media_weight, g.d_kv, g.d_media, g.partials};
  const BwdSegment latents{a.latents, a.latents_batch_stride, a.latent_rows, a.media_rows, kv_rows, nullptr, 1,
                           a.latents_weight, g.d_kv, g.d_latents,
                           g.partials + static_cast<int64_t>(g.media_warps) * 2 * a.dim};
  if (g.media_warps > 0) {
    perceiver_kv_input_bwd_kernel<T, kChunks>
        <<<g.media_warps / kWarpsPerBlock, kThreadsBwd, 0, stream>>>(media, a.batch, a.dim, a.eps);
  }
  if (g.latent_warps > 0) {
    perceiver_kv_input_bwd_kernel<T, kChunks>
        <<<g.latent_warps / kWarpsPerBlock, kThreadsBwd, 0, stream>>>(latents, a.batch, a.dim, a.eps);
  }
  return cudaGetLastError();
}

// Register rows of up to kChunks * 256 elements: 1, 2, 4 or 8 chunks per lane.
template <class T, class Args, class Launch>
cudaError_t for_chunks(const Args& args, int32_t dim, Launch launch) {
  const int32_t chunks_per_lane = (dim / 8 + 31) / 32;
  if (chunks_per_lane <= 1) return launch.template operator()<T, 1>(args);
  if (chunks_per_lane <= 2) return launch.template operator()<T, 2>(args);
  if (chunks_per_lane <= 4) return launch.template operator()<T, 4>(args);
  if (chunks_per_lane <= 8) return launch.template operator()<T, 8>(args);
  return cudaErrorInvalidValue;
}

template <class Args, class Launch>
cudaError_t for_dtype(RowDType dtype, const Args& args, int32_t dim, Launch launch) {
  if (dim <= 0 || dim % 8 != 0 || dim > kPerceiverKvMaxDim) return cudaErrorInvalidValue;
  switch (dtype) {
    case RowDType::kFloat32: return for_chunks<float>(args, dim, launch);
    case RowDType::kBFloat16: return for_chunks<__nv_bfloat16>(args, dim, launch);
    case RowDType::kFloat16: return for_chunks<__half>(args, dim, launch);
  }
  return cudaErrorInvalidValue;
}

struct FwdLauncher {
  cudaStream_t stream;
  template <class T, int kChunks>
  cudaError_t operator()(const PerceiverKvInputArgs& a) const {
    return launch_fwd<T, kChunks>(a, stream);
  }
};

struct BwdLauncher {
  cudaStream_t stream;
  template <class T, int kChunks>
  cudaError_t operator()(const PerceiverKvInputGradArgs& g) const {
    return launch_bwd<T, kChunks>(g, stream);
  }
};

}  // namespace

int32_t perceiver_kv_input_bwd_warps(int64_t rows, int32_t num_sms) {
  // Whole blocks of kThreadsBwd / 32 warps, enough to fill the GPU, never more than one warp per row.
  constexpr int64_t kWarpsPerBlock = kThreadsBwd / 32;
  int64_t warps = static_cast<int64_t>(num_sms) * kWarpsPerSmBwd;
  const int64_t needed = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock * kWarpsPerBlock;
  if (needed < warps) warps = needed;
  return static_cast<int32_t>(warps);
}

cudaError_t launch_perceiver_kv_input_fwd(const PerceiverKvInputArgs& args, cudaStream_t stream) {
  if (static_cast<int64_t>(args.batch) * (args.media_rows + args.latent_rows) == 0) return cudaSuccess;
  return for_dtype(args.dtype, args, args.dim, FwdLauncher{stream});
}

cudaError_t launch_perceiver_kv_input_bwd(const PerceiverKvInputGradArgs& args, cudaStream_t stream) {
  return for_dtype(args.forward.dtype, args, args.forward.dim, BwdLauncher{stream});
}

}  // namespace flamingo_fast
