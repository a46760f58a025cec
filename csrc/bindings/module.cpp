// The pybind11 module flamingo_fast._C.
#include <torch/extension.h>

#include "media_tile_plan.h"
#ifdef FLAMINGO_FAST_WITH_CUDA
#include <cuda_runtime_api.h>

#include "attention.h"
#include "perceiver.h"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FLAMINGO_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = CUDART_VERSION;
  flamingo_fast::add_attention_build_info(info);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["attention_dtypes"] = pybind11::list();
#endif
#ifdef FLAMINGO_FAST_CUDA_ARCHS
  info["cuda_archs"] = FLAMINGO_FAST_CUDA_ARCHS;
#else
  info["cuda_archs"] = "";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flamingo-fast native extension: media tile planning and (when built with CUDA) Hopper kernels";
  m.def("build_info", &build_info, "How this extension was built: {'cuda', 'cuda_version', 'cuda_archs'}");
  m.def("plan_media_tiles", &flamingo_fast::plan_media_tiles, pybind11::arg("media_index"), pybind11::arg("num_keys"),
        pybind11::arg("latents_per_media"), pybind11::arg("block_q"), pybind11::arg("block_k"),
        pybind11::arg("only_immediate") = true,
        "Tile plan of the media mask: (q_plan (B, nQ, 2), k_plan (B, nK, 2)) int32 [begin, end) ranges. "
        "Runs on the tensor's device (CUDA without a host sync).");
#ifdef FLAMINGO_FAST_WITH_CUDA
  flamingo_fast::register_attention(m);
  flamingo_fast::register_perceiver(m);
#endif
}
