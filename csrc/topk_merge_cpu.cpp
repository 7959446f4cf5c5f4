// karma::topk_merge: schema, argument checks and the CPU implementation's dispatch over its paths (parallel over
// queries with at::parallel_for, which is OpenMP in torch's CPU builds and follows torch.set_num_threads).
//
// Inputs are S per-shard rows: distances[s] (Q, k_s) and ids[s] (Q, k_s) int64, k_s may differ per shard, so a
// list of unequal shards is never padded or stacked (no copy of the candidates). Each query is independent,
// so results do not depend on the thread count. The merges themselves: topk_merge_cpu_rows.h (row checks, the
// small merge, the thread partition) and topk_merge_cpu_sorted.h (the S-way merge of sorted rows).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "topk_merge.h"
#include "topk_merge_cpu_rows.h"
#include "topk_merge_cpu_small.h"
#include "topk_merge_cpu_sorted.h"
#include "topk_merge_errors.h"

namespace karma {

// Results per query at most, and entries of a (Q, k) output at most when k exceeds the candidates per query
// (the Python wrapper's MAX_K and MAX_PADDED_OUTPUT: a direct torch.ops call gets the same errors).
constexpr int64_t kMaxK = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxPaddedOutput = int64_t{1} << 31;

namespace {

using cpu_merge::Packed;
using cpu_merge::rows_in_order;
using cpu_merge::SortedMerge;
using cpu_merge::ShardRows;
using topk::Candidate;

// Merges queries [begin, end) (rows checked, the output rows padded), two at a time: the steps of queries q and
// q + 1 alternate in one loop, two independent chains, while the rows of q + 2 and q + 3 are prefetched. `a` and
// `b` are the thread's two merge states. Returns false on bad input (recorded in errors).
template <int Depth, bool Dedup, typename scalar_t, bool Largest, typename PadRow>
bool merge_sorted_queries(SortedMerge<scalar_t, Largest>& a, SortedMerge<scalar_t, Largest>& b,
                          const std::vector<ShardRows<scalar_t>>& shards, int64_t begin, int64_t end, int64_t k,
                          scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors,
                          const PadRow& pad_row) {
  using Merge = SortedMerge<scalar_t, Largest>;
  const int64_t spacing = a.prefetch_spacing();
  for (int64_t q = begin; q < end; q += 2) {
    if (errors.failed.load(std::memory_order_relaxed)) return false;
    const bool pair = q + 1 < end;
    if (!rows_in_order<scalar_t, Largest>(shards, q, errors, a.avx512())) return false;
    if (pair && !rows_in_order<scalar_t, Largest>(shards, q + 1, errors, a.avx512())) return false;
    auto ca = a.begin(q, k, out_distances + q * k, out_ids + q * k, errors, q + 2 < end ? q + 2 : -1);
    if (pair) {
      auto cb = b.begin(q + 1, k, out_distances + (q + 1) * k, out_ids + (q + 1) * k, errors, q + 3 < end ? q + 3 : -1);
      // A step writes at most one candidate per query, so `steps` steps cannot pass either limit; a step of a query
      // whose rows ran out (its limit lowered to its count) changes nothing. No test per step.
      while (Merge::running(ca) && Merge::running(cb)) {
        const int64_t steps = std::min(spacing, std::min(ca.limit - ca.count, cb.limit - cb.count));
        for (int64_t i = 0; i < steps; ++i) {
          a.template step<Depth, Dedup>(ca);
          b.template step<Depth, Dedup>(cb);
        }
        a.prefetch();
        b.prefetch();
      }
      while (Merge::running(cb)) b.template step<Depth, Dedup>(cb);
      const int64_t count = b.template finish<Depth, Dedup>(cb);
      if (count < 0) return false;
      pad_row(q + 1, count);
    }
    while (Merge::running(ca)) {
      const int64_t steps = std::min(spacing, ca.limit - ca.count);
      for (int64_t i = 0; i < steps; ++i) a.template step<Depth, Dedup>(ca);
      a.prefetch();
    }
    const int64_t count = a.template finish<Depth, Dedup>(ca);
    if (count < 0) return false;
    pad_row(q, count);
  }
  return true;
}

template <typename scalar_t, bool Largest>
void merge_cpu(const std::vector<ShardRows<scalar_t>>& shards, int64_t num_queries, int64_t k, bool sorted,
               bool dedup, scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  const int64_t num_shards = static_cast<int64_t>(shards.size());
  int64_t total_width = 0;
  for (const auto& shard : shards) total_width += shard.width;
  const scalar_t padding = static_cast<scalar_t>(topk::padding_distance<Largest>());
  // Queries per thread at least (and per claim, see parallel_over_queries): waking an OpenMP team costs tens of
  // microseconds (far more on a loaded machine), so a small merge runs on the calling thread. Work per query:
  // ~k + S reads (merge) or all S * k_s.
  const int64_t work_per_query = (sorted ? k + num_shards : total_width + k) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / work_per_query);

  // Calls visit(packed candidate) for every real candidate of query q (unsorted paths); false on an error.
  const auto for_each_candidate = [&](int64_t q, auto&& visit) -> bool {
    for (int64_t s = 0; s < num_shards; ++s) {
      const ShardRows<scalar_t>& shard = shards[s];
      const scalar_t* row_distances = shard.distances + q * shard.distance_row_stride;
      const int64_t* row_ids = shard.ids + q * shard.id_row_stride;
      for (int64_t j = 0; j < shard.width; ++j) {
        if (row_ids[j] < 0) continue;
        int64_t id;
        if (!topk::translate_id(row_ids[j], shard.offset, &id)) {
          errors.record_overflow(s, row_ids[j], shard.offset);
          return false;
        }
        visit(cpu_merge::pack(topk::sort_key<Largest>(static_cast<Key>(row_distances[j])), id));
      }
    }
    return true;
  };

  // Writes the padding tail of row q after its `count` real candidates.
  const auto pad_row = [&](int64_t q, int64_t count) {
    for (int64_t j = count; j < k; ++j) {
      out_distances[q * k + j] = padding;
      out_ids[q * k + j] = -1;
    }
  };

  if (sorted && !dedup && k <= cpu_merge::kSmallMergeMaxK && num_shards <= cpu_merge::kSmallMergeMaxShards) {
    cpu_merge::parallel_over_queries(num_queries, grain, [&](const auto& claim) {
      int64_t begin, end;
      while (claim(begin, end)) {
        if (errors.failed.load(std::memory_order_relaxed) ||
            !cpu_merge::small_merge_queries<scalar_t, Largest>(shards.data(), num_shards, begin, end, k,
                                                                out_distances, out_ids, errors)) {
          return;
        }
      }
    });
    return;
  }

  if (sorted) {
    using Merge = SortedMerge<scalar_t, Largest>;
    // Slots are 32-bit: (leaves + s) * kBlock must fit (checked here: nothing may throw inside the parallel region).
#if defined(KARMA_HAS_AVX512_PASSES)
    const bool avx512 = cpu_merge::avx512::enabled();
#else
    const bool avx512 = false;
#endif
    TORCH_CHECK_VALUE(num_shards <= (int64_t{1} << 24), "topk_merge: sorted=True merges at most 2^24 shards per ",
                      "call, got ", num_shards, "; merge them in groups or pass sorted=False");
    cpu_merge::parallel_over_queries(num_queries, grain, [&](const auto& claim) {
      Merge a(shards, total_width, k, dedup, avx512), b(shards, total_width, k, dedup, avx512);  // two in flight
      // The S-way merges of each claimed range, with the tree depth as a compile-time constant where it is small.
      const auto merge_claims = [&](auto depth, auto dedup_rows) {
        constexpr int kDepth = decltype(depth)::value;
        constexpr bool kDedup = decltype(dedup_rows)::value;
        int64_t begin, end;
        while (claim(begin, end)) {
          if (!merge_sorted_queries<kDepth, kDedup>(a, b, shards, begin, end, k, out_distances, out_ids,
                                                               errors, pad_row)) {
            return;
          }
        }
      };
      using Runtime = std::integral_constant<int, Merge::kRuntimeDepth>;
      if (dedup) {
        merge_claims(Runtime{}, std::true_type{});
      } else {
        switch (a.depth()) {
          case 1: merge_claims(std::integral_constant<int, 1>{}, std::false_type{}); break;
          case 2: merge_claims(std::integral_constant<int, 2>{}, std::false_type{}); break;
          case 3: merge_claims(std::integral_constant<int, 3>{}, std::false_type{}); break;
          case 4: merge_claims(std::integral_constant<int, 4>{}, std::false_type{}); break;
          case 5: merge_claims(std::integral_constant<int, 5>{}, std::false_type{}); break;
          case 6: merge_claims(std::integral_constant<int, 6>{}, std::false_type{}); break;
          default: merge_claims(Runtime{}, std::false_type{}); break;
        }
      }
    });
    return;
  }

  cpu_merge::parallel_over_queries(num_queries, grain, [&](const auto& claim) {
    std::vector<Packed> buffer;
    int64_t begin, end;
    while (claim(begin, end)) {
      for (int64_t q = begin; q < end; ++q) {
        if (errors.failed.load(std::memory_order_relaxed)) return;
        buffer.clear();
        if (!for_each_candidate(q, [&](Packed p) { buffer.push_back(p); })) return;
        int64_t count = 0;
        if (!dedup) {
          // Selection: gather every real candidate, partition the best k to the front, sort them. O(S * k_s)
          // whatever the row order (a bounded heap degrades on rows that arrive sorted).
          count = std::min<int64_t>(k, static_cast<int64_t>(buffer.size()));
          if (static_cast<int64_t>(buffer.size()) > k) std::nth_element(buffer.begin(), buffer.begin() + k, buffer.end());
          std::sort(buffer.begin(), buffer.begin() + count);
        } else {
          // With dedup: keep the best occurrence of each id, then select.
          std::sort(buffer.begin(), buffer.end(), [](Packed a, Packed b) {
            const uint64_t id_a = static_cast<uint64_t>(a), id_b = static_cast<uint64_t>(b);
            return id_a != id_b ? id_a < id_b : a < b;
          });
          const auto unique_end = std::unique(buffer.begin(), buffer.end(), [](Packed a, Packed b) {
            return static_cast<uint64_t>(a) == static_cast<uint64_t>(b);
          });
          count = std::min<int64_t>(k, unique_end - buffer.begin());
          std::partial_sort(buffer.begin(), buffer.begin() + count, unique_end);
        }
        for (int64_t j = 0; j < count; ++j) {
          const Candidate c = cpu_merge::unpack(buffer[j]);
          out_distances[q * k + j] = static_cast<scalar_t>(topk::distance_of<Largest, Key>(c.key));
          out_ids[q * k + j] = c.id;
        }
        pad_row(q, count);
      }
    }
  });
}

}  // namespace

// The merge of a stacked (S, Q, W) array on raw pointers, no tensors: the small-call path for numpy inputs
// (topk_merge_numpy.cpp), where building tensors and dispatching would cost more than merging. Strides in
// elements; rows contiguous. Returns false when sorted=True meets a row out of order (the caller then takes the
// op's path, which raises the op's error).
template <typename scalar_t>
bool merge_stacked_rows(const scalar_t* distances, const int64_t* ids, int64_t num_shards, int64_t num_queries,
                        int64_t width, const int64_t distance_strides[2], const int64_t id_strides[2], int64_t k,
                        bool largest, bool sorted, scalar_t* out_distances, int64_t* out_ids) {
  std::vector<ShardRows<scalar_t>> shards;
  shards.reserve(num_shards);
  for (int64_t s = 0; s < num_shards; ++s) {
    shards.push_back(ShardRows<scalar_t>{distances + s * distance_strides[0], ids + s * id_strides[0],
                                         distance_strides[1], id_strides[1], width, 0});
  }
  InputErrorReport errors;
  if (largest) {
    merge_cpu<scalar_t, true>(shards, num_queries, k, sorted, false, out_distances, out_ids, errors);
  } else {
    merge_cpu<scalar_t, false>(shards, num_queries, k, sorted, false, out_distances, out_ids, errors);
  }
  return !errors.failed.load();
}

template bool merge_stacked_rows<float>(const float*, const int64_t*, int64_t, int64_t, int64_t, const int64_t[2],
                                        const int64_t[2], int64_t, bool, bool, float*, int64_t*);
template bool merge_stacked_rows<double>(const double*, const int64_t*, int64_t, int64_t, int64_t, const int64_t[2],
                                         const int64_t[2], int64_t, bool, bool, double*, int64_t*);

// The S shards arrive either as a list of S (Q, k_s) tensors (k_s may differ) or stacked, as one (S, Q, k_s)
// tensor in a one-element list: the Python wrapper passes a stacked array that way, so that no tensor per
// shard is made (which costs more than merging a small batch).
bool is_stacked(at::TensorList distances) { return distances.size() == 1 && distances[0].dim() == 3; }

int64_t num_shards_of(at::TensorList distances) {
  return is_stacked(distances) ? distances[0].size(0) : static_cast<int64_t>(distances.size());
}

// Checks shared by the CPU and CUDA implementations. Python validates first with friendlier messages; these
// guard direct torch.ops calls.
void check_topk_merge_inputs(at::TensorList distances, at::TensorList ids, int64_t k,
                             const c10::optional<at::Tensor>& id_offsets) {
  TORCH_CHECK_VALUE(!distances.empty(), "topk_merge: distances must hold at least one shard");
  TORCH_CHECK_VALUE(distances.size() == ids.size(), "topk_merge: distances has ", distances.size(),
                    " shards but ids has ", ids.size());
  TORCH_CHECK_VALUE(k >= 1, "topk_merge: k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= kMaxK, "topk_merge: k must be <= 2^31-1, got ", k);
  const auto dtype = distances[0].scalar_type();
  const auto device = distances[0].device();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "topk_merge: distances must be floating, got ", dtype);
  const bool stacked = is_stacked(distances);
  for (size_t s = 0; s < distances.size(); ++s) {
    TORCH_CHECK_VALUE(distances[s].dim() == (stacked ? 3 : 2), "topk_merge: distances[", s, "] must be ",
                      stacked ? "3-D (S, Q, k_s)" : "2-D (Q, k_s)", ", got ", distances[s].sizes());
    TORCH_CHECK_VALUE(ids[s].sizes() == distances[s].sizes(), "topk_merge: ids[", s, "] has shape ",
                      ids[s].sizes(), " but distances[", s, "] has shape ", distances[s].sizes());
    TORCH_CHECK_VALUE(distances[s].size(0) == distances[0].size(0), "topk_merge: every shard must have the ",
                      "same number of queries; distances[", s, "] has ", distances[s].size(0), ", distances[0] has ",
                      distances[0].size(0));
    TORCH_CHECK_TYPE(distances[s].scalar_type() == dtype, "topk_merge: distances[", s, "] is ",
                     distances[s].scalar_type(), " but distances[0] is ", dtype);
    TORCH_CHECK_TYPE(ids[s].scalar_type() == at::kLong, "topk_merge: ids[", s, "] must be int64, got ",
                     ids[s].scalar_type());
    TORCH_CHECK_VALUE(distances[s].device() == device && ids[s].device() == device,
                      "topk_merge: every shard must be on ", device);
  }
  const int64_t num_shards = num_shards_of(distances);
  TORCH_CHECK_VALUE(num_shards >= 1, "topk_merge: distances must hold at least one shard");
  // k may exceed the candidates per query (the rows end with padding), but not into an output of more than 2^31
  // entries that is mostly padding: a wrong k, not a request for a huge padded result.
  const int64_t num_queries = distances[0].size(stacked ? 1 : 0);
  int64_t candidates = 0;
  for (const at::Tensor& d : distances) candidates += stacked ? d.size(0) * d.size(2) : d.size(1);
  TORCH_CHECK_VALUE(k <= candidates || num_queries <= kMaxPaddedOutput / k, "topk_merge: k = ", k, " exceeds the ",
                    candidates, " candidates per query, and the (", num_queries, ", k) output would hold more than ",
                    "2^31 entries, mostly padding; pass a k of at most the candidates per query");
  if (id_offsets.has_value()) {
    const at::Tensor& offsets = *id_offsets;
    TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "topk_merge: id_offsets must be int64, got ",
                     offsets.scalar_type());
    TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == num_shards, "topk_merge: id_offsets must have shape (",
                      num_shards, ",), got ", offsets.sizes());
    TORCH_CHECK_VALUE(offsets.device() == device, "topk_merge: id_offsets must be on ", device);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_merge_cpu(at::TensorList distances, at::TensorList ids, int64_t k,
                                                  bool largest, const c10::optional<at::Tensor>& id_offsets,
                                                  bool sorted, bool dedup) {
  check_topk_merge_inputs(distances, ids, k, id_offsets);
  const bool stacked = is_stacked(distances);
  const int64_t num_shards = num_shards_of(distances);
  const int64_t num_queries = distances[0].size(stacked ? 1 : 0);
  at::Tensor offsets_cpu;
  if (id_offsets.has_value()) offsets_cpu = id_offsets->contiguous();
  // Rows must be contiguous (the shard and query strides may be anything). Keep any contiguous copy alive
  // while the raw pointers are in use.
  std::vector<at::Tensor> kept;
  const auto rows_contiguous = [&](const at::Tensor& t) {
    const int64_t last = t.dim() - 1;
    at::Tensor r = (t.size(last) <= 1 || t.stride(last) == 1) ? t : t.contiguous();
    kept.push_back(r);
    return r;
  };
  auto out_distances = at::empty({num_queries, k}, distances[0].options());
  auto out_ids = at::empty({num_queries, k}, ids[0].options());
  InputErrorReport errors;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, distances[0].scalar_type(), "topk_merge_cpu", [&] {
    std::vector<ShardRows<scalar_t>> shards;
    shards.reserve(num_shards);
    const int64_t* offsets = offsets_cpu.defined() ? offsets_cpu.const_data_ptr<int64_t>() : nullptr;
    if (stacked) {
      const at::Tensor d = rows_contiguous(distances[0]);
      const at::Tensor i = rows_contiguous(ids[0]);
      for (int64_t s = 0; s < num_shards; ++s) {
        shards.push_back(ShardRows<scalar_t>{d.const_data_ptr<scalar_t>() + s * d.stride(0),
                                             i.const_data_ptr<int64_t>() + s * i.stride(0), d.stride(1), i.stride(1),
                                             d.size(2), offsets ? offsets[s] : 0});
      }
    } else {
      for (int64_t s = 0; s < num_shards; ++s) {
        const at::Tensor d = rows_contiguous(distances[s]);
        const at::Tensor i = rows_contiguous(ids[s]);
        shards.push_back(ShardRows<scalar_t>{d.const_data_ptr<scalar_t>(), i.const_data_ptr<int64_t>(), d.stride(0),
                                             i.stride(0), d.size(1), offsets ? offsets[s] : 0});
      }
    }
    if (largest) {
      merge_cpu<scalar_t, true>(shards, num_queries, k, sorted, dedup, out_distances.mutable_data_ptr<scalar_t>(),
                                out_ids.mutable_data_ptr<int64_t>(), errors);
    } else {
      merge_cpu<scalar_t, false>(shards, num_queries, k, sorted, dedup, out_distances.mutable_data_ptr<scalar_t>(),
                                 out_ids.mutable_data_ptr<int64_t>(), errors);
    }
  });
  raise_input_error(errors, largest);
  return {out_distances, out_ids};
}

// A fragment: the Python custom ops of the other kernels register into the same "karma" namespace.
TORCH_LIBRARY_FRAGMENT(karma, m) {
  // distances/ids: S tensors (Q, k_s), or one stacked (S, Q, k_s) tensor each (see is_stacked).
  m.def(
      "topk_merge(Tensor[] distances, Tensor[] ids, int k, bool largest, Tensor? id_offsets, bool sorted, "
      "bool dedup) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(karma, CPU, m) { m.impl("topk_merge", &topk_merge_cpu); }

}  // namespace karma
