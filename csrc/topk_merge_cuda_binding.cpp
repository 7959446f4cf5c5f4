// CUDA implementation of karma::topk_merge for torch: fills the kernel's parameters and calls the plain-CUDA
// launcher (topk_merge_cuda.cu). Compiled only when setup.py builds with CUDA (KARMA_WITH_CUDA).
//
// Per call: no host-to-device copy (the shard table is the kernel's parameter; id_offsets, when given, is
// already a device tensor), no scratch, no host sync. Bad input stops the kernel with a device-side assert
// (see topk_merge_cuda.h); the host build of the same kernel (karma::topk_merge_warp_emulated) raises the CPU
// op's ValueError for the same inputs.
#ifdef KARMA_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "topk_merge_warp_params.h"

namespace karma {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_merge_cuda(at::TensorList distances, at::TensorList ids, int64_t k,
                                                   bool largest, const c10::optional<at::Tensor>& id_offsets,
                                                   bool sorted, bool dedup) {
  const c10::cuda::CUDAGuard guard(distances.at(0).device());
  WarpMergeCall call = make_warp_merge_call(distances, ids, k, largest, id_offsets, sorted, dedup);
  const int status = karma_topk_merge_cuda(&call.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "topk_merge: CUDA launch failed with cudaError_t ", status);
  return {call.out_distances, call.out_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(karma, CUDA, m) { m.impl("topk_merge", &topk_merge_cuda); }

}  // namespace karma

#endif  // KARMA_WITH_CUDA
