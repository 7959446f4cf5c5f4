// karma::topk_merge: schema and CPU implementation (parallel over queries with at::parallel_for, which is
// OpenMP in torch's CPU builds and follows torch.set_num_threads).
//
// Inputs are S per-shard rows: distances[s] (Q, k_s) and ids[s] (Q, k_s) int64, k_s may differ per shard, so a
// list of unequal shards is never padded or stacked (no copy of the candidates). Each query is independent,
// so results do not depend on the thread count.
#include <Python.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "topk_merge.h"

namespace karma {
namespace {

using topk::Candidate;

template <typename scalar_t>
struct ShardRows {
  const scalar_t* distances;
  const int64_t* ids;
  int64_t distance_row_stride;
  int64_t id_row_stride;
  int64_t width;
  int64_t offset;
};

// First translation failure seen by any thread; reported after the parallel region (no throwing inside it).
struct OverflowReport {
  std::atomic<bool> failed{false};
  int64_t shard = 0;
  int64_t local_id = 0;
  int64_t offset = 0;

  void record(int64_t s, int64_t local, int64_t off) {
    bool expected = false;
    if (failed.compare_exchange_strong(expected, true)) {
      shard = s;
      local_id = local;
      offset = off;
    }
  }
};

// Open-addressing set of ids for dedup, cleared in O(1) per query by a stamp.
class IdSet {
 public:
  explicit IdSet(int64_t max_items) {
    int64_t capacity = 16;
    while (capacity < 2 * max_items) capacity *= 2;
    mask_ = capacity - 1;
    keys_.assign(capacity, 0);
    stamps_.assign(capacity, 0);
  }
  void clear() { ++stamp_; }
  // Inserts id; returns false when it was already present.
  bool insert(int64_t id) {
    uint64_t slot = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> 17;
    while (true) {
      slot &= mask_;
      if (stamps_[slot] != stamp_) {
        stamps_[slot] = stamp_;
        keys_[slot] = id;
        return true;
      }
      if (keys_[slot] == id) return false;
      ++slot;
    }
  }

 private:
  uint64_t mask_;
  std::vector<int64_t> keys_;
  std::vector<uint32_t> stamps_;
  uint32_t stamp_ = 1;
};

// Sorts each run of equal distances by id (the stream is already in distance order).
template <bool Largest, typename Key>
void order_tie_groups(Candidate<Key>* out, int64_t count) {
  int64_t start = 0;
  while (start < count) {
    int64_t end = start + 1;
    while (end < count && topk::same_distance(out[end].distance, out[start].distance)) ++end;
    if (end - start > 1) {
      std::sort(out + start, out + end,
                [](const Candidate<Key>& a, const Candidate<Key>& b) { return a.id < b.id; });
    }
    start = end;
  }
}

template <typename scalar_t, bool Largest>
void merge_cpu(const std::vector<ShardRows<scalar_t>>& shards, int64_t num_queries, int64_t k, bool sorted,
               bool dedup, scalar_t* out_distances, int64_t* out_ids, OverflowReport& overflow) {
  using Key = at::opmath_type<scalar_t>;
  const int64_t num_shards = static_cast<int64_t>(shards.size());
  int64_t total_width = 0;
  for (const auto& shard : shards) total_width += shard.width;
  const scalar_t padding = static_cast<scalar_t>(topk::padding_distance<Largest>());
  const auto before = [](const Candidate<Key>& a, const Candidate<Key>& b) {
    return topk::ranks_before<Largest>(a, b);
  };
  const int64_t grain = std::max<int64_t>(1, 4096 / (k + num_shards + 1));

  // Calls visit(candidate) for every real candidate of query q (unsorted paths); false on an id overflow.
  const auto for_each_candidate = [&](int64_t q, auto&& visit) -> bool {
    for (int64_t s = 0; s < num_shards; ++s) {
      const ShardRows<scalar_t>& shard = shards[s];
      const scalar_t* row_distances = shard.distances + q * shard.distance_row_stride;
      const int64_t* row_ids = shard.ids + q * shard.id_row_stride;
      for (int64_t j = 0; j < shard.width; ++j) {
        if (row_ids[j] < 0) continue;
        Candidate<Key> c;
        if (!topk::translate_id(row_ids[j], shard.offset, &c.id)) {
          overflow.record(s, row_ids[j], shard.offset);
          return false;
        }
        c.distance = static_cast<Key>(row_distances[j]);
        visit(c);
      }
    }
    return true;
  };

  at::parallel_for(0, num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<Candidate<Key>> collected(static_cast<size_t>(k));
    std::vector<Candidate<Key>> heads(static_cast<size_t>(num_shards));
    std::vector<int64_t> positions(static_cast<size_t>(num_shards));
    std::vector<int32_t> heap(static_cast<size_t>(num_shards));
    std::vector<Candidate<Key>> buffer;
    IdSet seen(dedup && sorted ? total_width : 0);

    for (int64_t q = begin; q < end && !overflow.failed.load(std::memory_order_relaxed); ++q) {
      int64_t count = 0;
      bool failed = false;
      if (sorted) {
        // S-way merge: read each row from its head, skipping padding, until the k-th distance is passed.
        // Moves shard s's head to its next real candidate at or after positions[s]; false when exhausted.
        const auto advance = [&](int64_t s) -> bool {
          const ShardRows<scalar_t>& shard = shards[s];
          const int64_t* row_ids = shard.ids + q * shard.id_row_stride;
          int64_t pos = positions[s];
          while (pos < shard.width && row_ids[pos] < 0) ++pos;
          positions[s] = pos;
          if (pos >= shard.width) return false;
          int64_t global_id;
          if (!topk::translate_id(row_ids[pos], shard.offset, &global_id)) {
            overflow.record(s, row_ids[pos], shard.offset);
            failed = true;
            return false;
          }
          heads[s].distance = static_cast<Key>(shard.distances[q * shard.distance_row_stride + pos]);
          heads[s].id = global_id;
          return true;
        };
        int32_t heap_size = 0;
        for (int64_t s = 0; s < num_shards; ++s) {
          positions[s] = 0;
          if (advance(s)) heap[heap_size++] = static_cast<int32_t>(s);
        }
        topk::heap_build<Largest>(heap.data(), heap_size, heads.data());
        topk::TopKCollector<Largest, Key> collector(collected.data(), k);
        if (dedup) seen.clear();
        while (heap_size > 0 && !failed) {
          const int32_t s = heap[0];
          const Candidate<Key> head = heads[s];
          if (!dedup || seen.insert(head.id)) {
            if (!collector.offer(head)) break;
          }
          ++positions[s];
          if (!advance(s)) heap[0] = heap[--heap_size];
          topk::heap_sift_down<Largest>(heap.data(), heap_size, 0, heads.data());
        }
        count = collector.count;
        order_tie_groups<Largest>(collected.data(), count);
      } else if (!dedup) {
        // Selection: a bounded max-heap (worst on top) of the best k seen so far.
        int64_t size = 0;
        failed = !for_each_candidate(q, [&](const Candidate<Key>& c) {
          if (size < k) {
            collected[size++] = c;
            std::push_heap(collected.begin(), collected.begin() + size, before);
          } else if (before(c, collected[0])) {
            std::pop_heap(collected.begin(), collected.begin() + size, before);
            collected[size - 1] = c;
            std::push_heap(collected.begin(), collected.begin() + size, before);
          }
        });
        std::sort_heap(collected.begin(), collected.begin() + size, before);
        count = size;
      } else {
        // Unsorted with dedup: gather, keep the best occurrence of each id, then select.
        buffer.clear();
        failed = !for_each_candidate(q, [&](const Candidate<Key>& c) { buffer.push_back(c); });
        std::sort(buffer.begin(), buffer.end(), [&](const Candidate<Key>& a, const Candidate<Key>& b) {
          return a.id != b.id ? a.id < b.id : before(a, b);
        });
        const auto unique_end = std::unique(buffer.begin(), buffer.end(),
                                            [](const Candidate<Key>& a, const Candidate<Key>& b) {
                                              return a.id == b.id;
                                            });
        const int64_t unique_count = unique_end - buffer.begin();
        count = std::min(k, unique_count);
        std::partial_sort(buffer.begin(), buffer.begin() + count, unique_end, before);
        std::copy(buffer.begin(), buffer.begin() + count, collected.begin());
      }
      if (failed) return;
      scalar_t* row_out_distances = out_distances + q * k;
      int64_t* row_out_ids = out_ids + q * k;
      for (int64_t j = 0; j < count; ++j) {
        row_out_distances[j] = static_cast<scalar_t>(collected[j].distance);
        row_out_ids[j] = collected[j].id;
      }
      for (int64_t j = count; j < k; ++j) {
        row_out_distances[j] = padding;
        row_out_ids[j] = -1;
      }
    }
  });
}

}  // namespace

// Checks shared by the CPU and CUDA implementations. Python validates first with friendlier messages; these
// guard direct torch.ops calls.
void check_topk_merge_inputs(at::TensorList distances, at::TensorList ids, int64_t k,
                             const c10::optional<at::Tensor>& id_offsets) {
  TORCH_CHECK_VALUE(!distances.empty(), "topk_merge: distances must hold at least one shard");
  TORCH_CHECK_VALUE(distances.size() == ids.size(), "topk_merge: distances has ", distances.size(),
                    " shards but ids has ", ids.size());
  TORCH_CHECK_VALUE(k >= 1, "topk_merge: k must be >= 1, got ", k);
  const auto dtype = distances[0].scalar_type();
  const auto device = distances[0].device();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "topk_merge: distances must be floating, got ", dtype);
  for (size_t s = 0; s < distances.size(); ++s) {
    TORCH_CHECK_VALUE(distances[s].dim() == 2, "topk_merge: distances[", s, "] must be 2-D (Q, k_s), got ",
                      distances[s].sizes());
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
  if (id_offsets.has_value()) {
    const at::Tensor& offsets = *id_offsets;
    TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "topk_merge: id_offsets must be int64, got ",
                     offsets.scalar_type());
    TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == static_cast<int64_t>(distances.size()),
                      "topk_merge: id_offsets must have shape (", distances.size(), ",), got ", offsets.sizes());
    TORCH_CHECK_VALUE(offsets.device() == device, "topk_merge: id_offsets must be on ", device);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_merge_cpu(at::TensorList distances, at::TensorList ids, int64_t k,
                                                  bool largest, const c10::optional<at::Tensor>& id_offsets,
                                                  bool sorted, bool dedup) {
  check_topk_merge_inputs(distances, ids, k, id_offsets);
  const int64_t num_queries = distances[0].size(0);
  const int64_t num_shards = static_cast<int64_t>(distances.size());
  at::Tensor offsets_cpu;
  if (id_offsets.has_value()) offsets_cpu = id_offsets->contiguous();
  // Keep the (possibly made contiguous) inputs alive while the raw pointers are in use.
  std::vector<at::Tensor> kept;
  kept.reserve(2 * num_shards);
  const auto row_major = [&](const at::Tensor& t) {
    at::Tensor r = (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
    kept.push_back(r);
    return r;
  };
  auto out_distances = at::empty({num_queries, k}, distances[0].options());
  auto out_ids = at::empty({num_queries, k}, ids[0].options());
  OverflowReport overflow;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, distances[0].scalar_type(), "topk_merge_cpu", [&] {
    std::vector<ShardRows<scalar_t>> shards;
    shards.reserve(num_shards);
    for (int64_t s = 0; s < num_shards; ++s) {
      const at::Tensor d = row_major(distances[s]);
      const at::Tensor i = row_major(ids[s]);
      shards.push_back(ShardRows<scalar_t>{d.const_data_ptr<scalar_t>(), i.const_data_ptr<int64_t>(), d.stride(0),
                                           i.stride(0), d.size(1),
                                           offsets_cpu.defined() ? offsets_cpu.const_data_ptr<int64_t>()[s] : 0});
    }
    if (largest) {
      merge_cpu<scalar_t, true>(shards, num_queries, k, sorted, dedup, out_distances.mutable_data_ptr<scalar_t>(),
                                out_ids.mutable_data_ptr<int64_t>(), overflow);
    } else {
      merge_cpu<scalar_t, false>(shards, num_queries, k, sorted, dedup, out_distances.mutable_data_ptr<scalar_t>(),
                                 out_ids.mutable_data_ptr<int64_t>(), overflow);
    }
  });
  TORCH_CHECK_VALUE(!overflow.failed.load(), "topk_merge: id_offsets[", overflow.shard, "] = ", overflow.offset,
                    " translates local id ", overflow.local_id,
                    " out of the int64 range [0, 2^63-1] (an error, never a wrap)");
  return {out_distances, out_ids};
}

// A fragment: the Python custom ops of the other kernels register into the same "karma" namespace.
TORCH_LIBRARY_FRAGMENT(karma, m) {
  m.def(
      "topk_merge(Tensor[] distances, Tensor[] ids, int k, bool largest, Tensor? id_offsets, bool sorted, "
      "bool dedup) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(karma, CPU, m) { m.impl("topk_merge", &topk_merge_cpu); }

}  // namespace karma

// Importing karma_kernels._C registers the ops above; the module itself has no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
