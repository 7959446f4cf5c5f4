// KarmaTopkParams from the op's torch arguments: shared by the CUDA binding (topk_merge_cuda_binding.cpp) and the
// host build of the warp merge (topk_merge_warp_host.cpp), so both take and refuse exactly the same inputs.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "topk_merge_cuda.h"
#include "topk_merge_warp.h"

namespace karma {

void check_topk_merge_inputs(at::TensorList distances, at::TensorList ids, int64_t k,
                             const c10::optional<at::Tensor>& id_offsets);
bool is_stacked(at::TensorList distances);
int64_t num_shards_of(at::TensorList distances);

inline int32_t topk_dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return KARMA_TOPK_FLOAT32;
    case at::kHalf: return KARMA_TOPK_FLOAT16;
    case at::kBFloat16: return KARMA_TOPK_BFLOAT16;
    case at::kDouble: return KARMA_TOPK_FLOAT64;
    default: TORCH_CHECK_TYPE(false, "topk_merge: unsupported distances dtype ", dtype);
  }
}

// Everything a launch needs, with the tensors the parameters point into kept alive.
struct WarpMergeCall {
  KarmaTopkParams params;
  at::Tensor out_distances;
  at::Tensor out_ids;
  at::Tensor offsets;
  std::vector<at::Tensor> kept;  // contiguous copies of rows that were strided
  int64_t shared_bytes_per_warp;
};

// Checks the inputs (the op's shared checks plus the warp path's limits) and fills the parameters; the
// outputs are allocated on the inputs' device.
inline WarpMergeCall make_warp_merge_call(at::TensorList distances, at::TensorList ids, int64_t k, bool largest,
                                          const c10::optional<at::Tensor>& id_offsets, bool sorted, bool dedup) {
  check_topk_merge_inputs(distances, ids, k, id_offsets);
  const bool stacked = is_stacked(distances);
  const int64_t num_shards = num_shards_of(distances);
  TORCH_CHECK_VALUE(num_shards <= KARMA_TOPK_MAX_SHARDS, "topk_merge: the GPU path merges at most ",
                    KARMA_TOPK_MAX_SHARDS, " shards per call, got ", num_shards, "; merge them in groups");
  TORCH_CHECK_VALUE(k <= INT32_MAX, "topk_merge: the GPU path takes k < 2^31, got ", k);
  WarpMergeCall call;
  KarmaTopkParams& p = call.params;
  p = KarmaTopkParams{};
  const auto rows_contiguous = [&](const at::Tensor& t) {
    const int64_t last = t.dim() - 1;
    if (t.size(last) <= 1 || t.stride(last) == 1) return t;
    call.kept.push_back(t.contiguous());
    return call.kept.back();
  };
  int64_t total_width = 0;
  const at::Tensor stacked_distances = stacked ? rows_contiguous(distances[0]) : at::Tensor();
  const at::Tensor stacked_ids = stacked ? rows_contiguous(ids[0]) : at::Tensor();
  const int64_t element_size = static_cast<int64_t>(distances[0].element_size());
  for (int64_t s = 0; s < num_shards; ++s) {
    KarmaTopkShard& shard = p.shards[s];
    int64_t width;
    if (stacked) {
      shard.distances = static_cast<const char*>(stacked_distances.const_data_ptr()) +
                        s * stacked_distances.stride(0) * element_size;
      shard.ids = stacked_ids.const_data_ptr<int64_t>() + s * stacked_ids.stride(0);
      shard.distance_row_stride = stacked_distances.stride(1);
      shard.id_row_stride = stacked_ids.stride(1);
      width = stacked_distances.size(2);
    } else {
      const at::Tensor d = rows_contiguous(distances[s]);
      const at::Tensor i = rows_contiguous(ids[s]);
      shard.distances = d.const_data_ptr();
      shard.ids = i.const_data_ptr<int64_t>();
      shard.distance_row_stride = d.stride(0);
      shard.id_row_stride = i.stride(0);
      width = d.size(1);
    }
    shard.width = static_cast<int32_t>(width);
    shard.begin = static_cast<int32_t>(total_width);
    total_width += width;
    TORCH_CHECK_VALUE(total_width <= INT32_MAX, "topk_merge: the GPU path takes fewer than 2^31 candidates per query");
  }
  const int64_t num_queries = distances[0].size(stacked ? 1 : 0);
  const int32_t dtype = topk_dtype_code(distances[0].scalar_type());
  const topk::warp_merge::Layout layout(static_cast<int32_t>(total_width), static_cast<int32_t>(k),
                                        static_cast<int>(element_size));
  TORCH_CHECK_VALUE(layout.bytes <= topk::warp_merge::kMaxSharedBytesPerWarp, "topk_merge: the GPU path holds a ",
                    "query's candidates and k results in one warp's shared memory (at most ",
                    topk::warp_merge::kMaxSharedBytesPerWarp, " bytes); ", total_width, " candidates and k = ", k,
                    " need ", layout.bytes, "; merge the shards in groups or lower k");
  if (id_offsets.has_value()) call.offsets = id_offsets->contiguous();
  call.out_distances = at::empty({num_queries, k}, distances[0].options());
  call.out_ids = at::empty({num_queries, k}, ids[0].options());
  p.num_queries = num_queries;
  p.id_offsets = call.offsets.defined() ? call.offsets.const_data_ptr<int64_t>() : nullptr;
  p.out_distances = call.out_distances.mutable_data_ptr();
  p.out_ids = call.out_ids.mutable_data_ptr<int64_t>();
  p.num_shards = static_cast<int32_t>(num_shards);
  p.total_width = static_cast<int32_t>(total_width);
  p.k = static_cast<int32_t>(k);
  p.dtype = dtype;
  p.largest = largest ? 1 : 0;
  p.dedup = dedup ? 1 : 0;
  p.check_sorted = sorted ? 1 : 0;
  // Sorted rows: the smallest m whose row prefixes hold k candidates bounds the k-th key by the largest key at
  // position m - 1 (the kernel lists only the keys under it). Unsorted rows, or k >= every candidate: none.
  if (sorted && total_width > k) {
    int64_t m = 0;
    for (int64_t covered = 0; covered < k;) {
      ++m;
      covered = 0;
      for (int64_t s = 0; s < num_shards; ++s) covered += std::min<int64_t>(m, p.shards[s].width);
    }
    p.bound_position = static_cast<int32_t>(m);
  }
  call.shared_bytes_per_warp = layout.bytes;
  return call;
}

}  // namespace karma
