// The host build of the GPU merge: topk_merge_warp.h compiled by g++ against the lockstep implementation of
// warp_collectives.h, one emulated warp per query. Registered as karma::topk_merge_warp_emulated (CPU tensors,
// same arguments and results as karma::topk_merge) so that CI runs every topk_merge parity test against the
// kernel's own algorithm. Slow by design (32 lanes run in turn); a test path, not a CPU path.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "topk_merge_errors.h"
#include "topk_merge_warp_params.h"

namespace karma {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_merge_warp_emulated(at::TensorList distances, at::TensorList ids, int64_t k,
                                                            bool largest, const c10::optional<at::Tensor>& id_offsets,
                                                            bool sorted, bool dedup) {
  WarpMergeCall call = make_warp_merge_call(distances, ids, k, largest, id_offsets, sorted, dedup);
  const KarmaTopkParams& params = call.params;
  InputErrorReport errors;  // the kernel's device-side asserts, on the host
  const int64_t words = (call.shared_bytes_per_warp + 7) / 8;
  topk::warp_merge::dispatch(params.dtype, largest, [&](auto format, auto is_largest) {
    using F = decltype(format);
    constexpr bool kLargest = decltype(is_largest)::value;
    at::parallel_for(0, params.num_queries, 16, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> shared(words);  // one warp's shared memory
      for (int64_t q = begin; q < end; ++q) {
        topk::warp_merge::merge_query<F, kLargest>(params, q, reinterpret_cast<char*>(shared.data()), errors);
      }
    });
  });
  raise_input_error(errors, largest);
  return {call.out_distances, call.out_ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(karma, m) {
  m.def(
      "topk_merge_warp_emulated(Tensor[] distances, Tensor[] ids, int k, bool largest, Tensor? id_offsets, "
      "bool sorted, bool dedup) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(karma, CPU, m) { m.impl("topk_merge_warp_emulated", &topk_merge_warp_emulated); }

}  // namespace karma
