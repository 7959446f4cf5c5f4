// CUDA implementation of karma::topk_merge for torch: prepares the shard table and calls the plain-CUDA launcher
// (topk_merge_cuda.cu). Compiled only when setup.py builds with CUDA (KARMA_WITH_CUDA).
#ifdef KARMA_WITH_CUDA

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstring>
#include <vector>

#include "topk_merge_cuda.h"

namespace karma {

void check_topk_merge_inputs(at::TensorList distances, at::TensorList ids, int64_t k,
                             const c10::optional<at::Tensor>& id_offsets);
bool is_stacked(at::TensorList distances);

namespace {

int32_t dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return KARMA_TOPK_FLOAT32;
    case at::kHalf:
      return KARMA_TOPK_FLOAT16;
    case at::kBFloat16:
      return KARMA_TOPK_BFLOAT16;
    case at::kDouble:
      return KARMA_TOPK_FLOAT64;
    default:
      TORCH_CHECK_TYPE(false, "topk_merge: unsupported distances dtype ", dtype);
  }
}

// Rows sorted by distance for the merge kernel: "ip" sorts the negated score, so one ascending sort (NaN last)
// serves both metrics, in the input's own precision; padding may land anywhere, the kernel skips it.
std::pair<at::Tensor, at::Tensor> sort_rows(const at::Tensor& distances, const at::Tensor& ids, bool largest) {
  const at::Tensor key = largest ? distances.neg() : distances;
  const at::Tensor order = std::get<1>(key.sort(/*stable=*/false, /*dim=*/1, /*descending=*/false));
  return {distances.gather(1, order), ids.gather(1, order)};
}

std::tuple<at::Tensor, at::Tensor> topk_merge_cuda(at::TensorList distances_in, at::TensorList ids_in, int64_t k,
                                                   bool largest, const c10::optional<at::Tensor>& id_offsets,
                                                   bool sorted, bool dedup) {
  check_topk_merge_inputs(distances_in, ids_in, k, id_offsets);
  // A stacked (S, Q, k_s) input becomes S views: the shard table below takes one pointer per shard anyway.
  const bool stacked = is_stacked(distances_in);
  const std::vector<at::Tensor> distances = stacked ? distances_in[0].unbind(0) : distances_in.vec();
  const std::vector<at::Tensor> ids = stacked ? ids_in[0].unbind(0) : ids_in.vec();
  const int64_t num_shards = static_cast<int64_t>(distances.size());
  TORCH_CHECK_VALUE(num_shards <= KARMA_TOPK_MAX_SHARDS, "topk_merge: the CUDA path merges at most ",
                    KARMA_TOPK_MAX_SHARDS, " shards per call, got ", num_shards);
  const c10::cuda::CUDAGuard guard(distances[0].device());
  const int64_t num_queries = distances[0].size(0);
  std::vector<at::Tensor> kept;
  kept.reserve(2 * num_shards);
  std::vector<KarmaTopkShard> table(num_shards);
  for (int64_t s = 0; s < num_shards; ++s) {
    at::Tensor d = distances[s];
    at::Tensor i = ids[s];
    if (!sorted && d.size(1) > 1) {
      std::tie(d, i) = sort_rows(d, i, largest);
    }
    if (d.size(1) > 1 && d.stride(1) != 1) d = d.contiguous();
    if (i.size(1) > 1 && i.stride(1) != 1) i = i.contiguous();
    kept.push_back(d);
    kept.push_back(i);
    table[s] = KarmaTopkShard{d.const_data_ptr(), i.const_data_ptr<int64_t>(), d.stride(0), i.stride(0), d.size(1)};
  }
  // The shard table travels as bytes through pinned memory, so the copy does not block the host.
  auto table_host = at::empty({static_cast<int64_t>(num_shards * sizeof(KarmaTopkShard))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(table_host.mutable_data_ptr(), table.data(), num_shards * sizeof(KarmaTopkShard));
  const auto device_options = distances[0].options();
  const at::Tensor table_device = table_host.to(device_options.dtype(at::kByte), /*non_blocking=*/true);
  const int32_t dtype = dtype_code(distances[0].scalar_type());
  at::Tensor offsets;
  if (id_offsets.has_value()) offsets = id_offsets->contiguous();
  auto out_distances = at::empty({num_queries, k}, device_options);
  auto out_ids = at::empty({num_queries, k}, device_options.dtype(at::kLong));
  auto scratch = at::empty({karma_topk_merge_cuda_scratch_bytes(dtype, num_queries, k)},
                           device_options.dtype(at::kByte));
  auto error_flag = at::zeros({1}, device_options.dtype(at::kInt));
  const int status = karma_topk_merge_cuda(
      reinterpret_cast<const KarmaTopkShard*>(table_device.const_data_ptr()),
      offsets.defined() ? offsets.const_data_ptr<int64_t>() : nullptr, static_cast<int32_t>(num_shards),
      num_queries, k, dtype, largest ? 1 : 0, dedup ? 1 : 0, scratch.mutable_data_ptr(),
      out_distances.mutable_data_ptr(), out_ids.mutable_data_ptr<int64_t>(), error_flag.mutable_data_ptr<int32_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "topk_merge: CUDA launch failed with cudaError_t ", status);
  // Offsets are the only way to overflow; only then is the flag read back (one host sync).
  if (offsets.defined()) {
    TORCH_CHECK_VALUE(error_flag.item<int32_t>() == 0,
                      "topk_merge: id_offsets translate a local id out of the int64 range [0, 2^63-1] "
                      "(an error, never a wrap)");
  }
  return {out_distances, out_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(karma, CUDA, m) { m.impl("topk_merge", &topk_merge_cuda); }

}  // namespace karma

#endif  // KARMA_WITH_CUDA
