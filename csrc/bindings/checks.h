// Argument checks for the Python entry points. Every message names the argument and what was expected,
// and maps to the matching Python exception (TypeError / ValueError).
#pragma once

#include <torch/extension.h>

#include <string>

namespace flamingo_fast {

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must be a ", rank, "-D tensor ", layout, ", got shape ", t.sizes());
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got ", t.scalar_type());
}

inline void check_positive(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value > 0, name, " must be positive, got ", value);
}

}  // namespace flamingo_fast
