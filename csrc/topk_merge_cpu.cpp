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
#include <memory>
#include <type_traits>
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

// The first bad input seen by any thread, reported after the parallel region (no throwing inside it): an id
// translation out of the int64 range, or (sorted=True) a row whose distances are not sorted best-first.
struct InputErrorReport {
  enum Kind { kOverflow, kUnsorted };
  std::atomic<bool> failed{false};
  Kind kind = kOverflow;
  int64_t shard = 0;
  int64_t query = 0;
  int64_t local_id = 0;
  int64_t offset = 0;

  void record_overflow(int64_t s, int64_t local, int64_t off) {
    bool expected = false;
    if (failed.compare_exchange_strong(expected, true)) {
      kind = kOverflow;
      shard = s;
      local_id = local;
      offset = off;
    }
  }
  void record_unsorted(int64_t s, int64_t q) {
    bool expected = false;
    if (failed.compare_exchange_strong(expected, true)) {
      kind = kUnsorted;
      shard = s;
      query = q;
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

// A candidate as one 128-bit integer (key high, id low): the total order is the integer order, one compare.
using Packed = unsigned __int128;

inline Packed pack(uint64_t key, int64_t id) { return (static_cast<Packed>(key) << 64) | static_cast<uint64_t>(id); }
inline Candidate unpack(Packed p) { return Candidate{static_cast<uint64_t>(p >> 64), static_cast<int64_t>(p)}; }

// Sorts each run of equal keys by id (the merged stream is already in key order).
void order_tie_groups(Candidate* out, int64_t count) {
  int64_t start = 0;
  while (start < count) {
    int64_t end = start + 1;
    while (end < count && out[end].key == out[start].key) ++end;
    if (end - start > 1) {
      std::sort(out + start, out + end, [](const Candidate& a, const Candidate& b) { return a.id < b.id; });
    }
    start = end;
  }
}

// Tournament of minima over the S shard heads, 8 children per node: a level is recomputed as the minimum of
// one group of 8 (independent loads, a depth-3 selection), so advancing one shard costs ceil(log8 S) small
// groups instead of a chain of dependent comparisons. A tree key holds the head's sort key in its high bits and
// the shard index in its low bits: no two heads tie, the minimum names its shard, and distance ties leave in
// shard order (the collector reorders them by id). Unused slots hold kExhausted.
template <typename TreeKey>
class MinTree8 {
 public:
  static constexpr TreeKey kExhausted = ~static_cast<TreeKey>(0);
  static constexpr int kShift = sizeof(TreeKey) == 8 ? 32 : 64;
  static constexpr int64_t kFanout = 8;

  explicit MinTree8(int64_t num_leaves) {
    // Level sizes are multiples of 8; the last level has exactly one group, whose minimum is the winner.
    int64_t size = round_up(std::max<int64_t>(num_leaves, 1));
    while (true) {
      level_offsets_.push_back(static_cast<int64_t>(nodes_.size()));
      nodes_.resize(nodes_.size() + size, kExhausted);
      if (size == kFanout) break;
      size = round_up(size / kFanout);
    }
  }
  static TreeKey make_key(uint64_t sort_key, int64_t leaf) {
    return (static_cast<TreeKey>(sort_key) << kShift) | static_cast<TreeKey>(leaf);
  }
  static uint64_t sort_key_of(TreeKey key) { return static_cast<uint64_t>(key >> kShift); }
  static int32_t leaf_of(TreeKey key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }
  TreeKey* keys() { return nodes_.data(); }  // the leaves

  // Recomputes every level; returns the best key.
  TreeKey build() {
    const int64_t levels = static_cast<int64_t>(level_offsets_.size());
    for (int64_t level = 0; level + 1 < levels; ++level) {
      const int64_t groups = (level_offsets_[level + 1] - level_offsets_[level]) / kFanout;
      for (int64_t g = 0; g < groups; ++g) {
        nodes_[level_offsets_[level + 1] + g] = min8(nodes_.data() + level_offsets_[level] + kFanout * g);
      }
    }
    return min8(nodes_.data() + level_offsets_.back());
  }

  // Call after leaf's key changed; returns the best key.
  TreeKey update(int64_t leaf) {
    TreeKey* nodes = nodes_.data();
    const int64_t levels = static_cast<int64_t>(level_offsets_.size());
    int64_t index = leaf;
    for (int64_t level = 0; level + 1 < levels; ++level) {
      const int64_t group = index / kFanout;
      nodes[level_offsets_[level + 1] + group] = min8(nodes + level_offsets_[level] + kFanout * group);
      index = group;
    }
    return min8(nodes + level_offsets_.back());
  }

 private:
  static int64_t round_up(int64_t n) { return (n + kFanout - 1) / kFanout * kFanout; }
  // Pairwise, so the eight loads are independent and the selection is three deep. Plain selects on integers
  // compile to conditional moves here: which head wins is a coin flip, a branch would mispredict.
  static TreeKey min8(const TreeKey* k) {
    const TreeKey a = k[1] < k[0] ? k[1] : k[0];
    const TreeKey b = k[3] < k[2] ? k[3] : k[2];
    const TreeKey c = k[5] < k[4] ? k[5] : k[4];
    const TreeKey d = k[7] < k[6] ? k[7] : k[6];
    const TreeKey ab = b < a ? b : a;
    const TreeKey cd = d < c ? d : c;
    return cd < ab ? cd : ab;
  }

  std::vector<TreeKey> nodes_;
  std::vector<int64_t> level_offsets_;
};

// The S-way merge of one query's sorted rows: reads each row from its head, skipping padding, until the k-th
// key is passed (about k + S candidates). Per-thread state, reused across queries.
template <typename scalar_t, bool Largest>
class SortedMerge {
  using Key = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  using TreeKey = std::conditional_t<sizeof(Key) == 4, uint64_t, Packed>;
  using Tree = MinTree8<TreeKey>;

 public:
  SortedMerge(const std::vector<ShardRows<scalar_t>>& shards, int64_t total_width, bool dedup)
      : shards_(shards),
        num_shards_(static_cast<int64_t>(shards.size())),
        tree_(num_shards_),
        cursors_(num_shards_),
        seen_(dedup ? total_width : 0) {}

  // Collects query q's best candidates (stream order, ties reordered) into out; returns the count, or -1 when
  // an id translation overflowed (recorded in errors), or a row read out of order.
  int64_t run(int64_t q, int64_t k, bool dedup, Candidate* out, InputErrorReport& errors) {
    return dedup ? run_impl<true>(q, k, out, errors) : run_impl<false>(q, k, out, errors);
  }

 private:
  // One shard's row of the current query and its read position: one small struct per shard, so advancing a
  // shard touches one cache line.
  struct Cursor {
    const scalar_t* distances;
    const int64_t* ids;
    int64_t pos;
    int64_t width;
    int64_t offset;
    int64_t head_id;  // global id of the candidate at pos
  };

  // Moves the cursor to its next real candidate at or after pos; returns its tree key (kExhausted when none).
  TreeKey load_head(Cursor& cursor, int64_t s, bool& failed, InputErrorReport& errors) {
    int64_t pos = cursor.pos;
    while (pos < cursor.width && cursor.ids[pos] < 0) ++pos;
    cursor.pos = pos;
    if (pos >= cursor.width) return Tree::kExhausted;
    if (!topk::translate_id(cursor.ids[pos], cursor.offset, &cursor.head_id)) {
      errors.record_overflow(s, cursor.ids[pos], cursor.offset);
      failed = true;
      return Tree::kExhausted;
    }
    return Tree::make_key(topk::sort_key<Largest>(static_cast<Key>(cursor.distances[pos])), s);
  }

  template <bool Dedup>
  int64_t run_impl(int64_t q, int64_t k, Candidate* out, InputErrorReport& errors) {
    Cursor* cursors = cursors_.data();
    TreeKey* keys = tree_.keys();
    bool failed = false;
    for (int64_t s = 0; s < num_shards_; ++s) {
      const ShardRows<scalar_t>& shard = shards_[s];
      cursors[s] = Cursor{shard.distances + q * shard.distance_row_stride, shard.ids + q * shard.id_row_stride, 0,
                          shard.width, shard.offset, 0};
      keys[s] = load_head(cursors[s], s, failed, errors);
    }
    TreeKey head = tree_.build();
    int32_t s = Tree::leaf_of(head);
    topk::TopKCollector collector(out, k);
    if (Dedup) seen_.clear();
    while (head != Tree::kExhausted && !failed) {
      Cursor& cursor = cursors[s];
      const Candidate c{Tree::sort_key_of(head), cursor.head_id};
      if (!Dedup || seen_.insert(c.id)) {
        if (!collector.offer(c)) break;
      }
      ++cursor.pos;
      const TreeKey next = load_head(cursor, s, failed, errors);
      // The rows must be sorted best-first: checked on every candidate read, which is all that can matter
      // here (an unread tail is never compared).
      if (next < head) {
        errors.record_unsorted(s, q);
        failed = true;
      }
      keys[s] = next;
      head = tree_.update(s);
      s = Tree::leaf_of(head);
    }
    if (failed) return -1;
    bool tied = false;  // a branch-free scan; ties are rare, so the sort below rarely runs
    for (int64_t j = 1; j < collector.count; ++j) tied |= out[j].key == out[j - 1].key;
    if (tied) order_tie_groups(out, collector.count);
    return collector.count;
  }

  const std::vector<ShardRows<scalar_t>>& shards_;
  int64_t num_shards_;
  Tree tree_;
  std::vector<Cursor> cursors_;
  IdSet seen_;
};

template <typename scalar_t, bool Largest>
void merge_cpu(const std::vector<ShardRows<scalar_t>>& shards, int64_t num_queries, int64_t k, bool sorted,
               bool dedup, scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  const int64_t num_shards = static_cast<int64_t>(shards.size());
  int64_t total_width = 0;
  for (const auto& shard : shards) total_width += shard.width;
  const scalar_t padding = static_cast<scalar_t>(topk::padding_distance<Largest>());
  // Queries per thread at least: waking an OpenMP team costs tens of microseconds (far more on a loaded
  // machine), so a small merge runs on the calling thread. Work per query: ~k + S reads (merge) or all S * k_s.
  const int64_t work_per_query = (sorted ? k + num_shards : total_width + k) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / work_per_query);

  // Calls visit(packed candidate) for every real candidate of query q (unsorted paths); false on an errors.
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
        visit(pack(topk::sort_key<Largest>(static_cast<Key>(row_distances[j])), id));
      }
    }
    return true;
  };

  at::parallel_for(0, num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> collected(static_cast<size_t>(k));
    std::vector<Packed> buffer;
    std::unique_ptr<SortedMerge<scalar_t, Largest>> merge;
    if (sorted) merge = std::make_unique<SortedMerge<scalar_t, Largest>>(shards, total_width, dedup);

    for (int64_t q = begin; q < end && !errors.failed.load(std::memory_order_relaxed); ++q) {
      int64_t count = 0;
      bool failed = false;
      if (sorted) {
        count = merge->run(q, k, dedup, collected.data(), errors);
        failed = count < 0;
      } else if (!dedup) {
        // Selection: gather every real candidate, partition the best k to the front, sort them. O(S * k_s)
        // whatever the row order (a bounded heap degrades on rows that arrive sorted).
        buffer.clear();
        failed = !for_each_candidate(q, [&](Packed p) { buffer.push_back(p); });
        count = std::min<int64_t>(k, static_cast<int64_t>(buffer.size()));
        if (static_cast<int64_t>(buffer.size()) > k) std::nth_element(buffer.begin(), buffer.begin() + k, buffer.end());
        std::sort(buffer.begin(), buffer.begin() + count);
        for (int64_t j = 0; j < count; ++j) collected[j] = unpack(buffer[j]);
      } else {
        // Unsorted with dedup: gather, keep the best occurrence of each id, then select.
        buffer.clear();
        failed = !for_each_candidate(q, [&](Packed p) { buffer.push_back(p); });
        std::sort(buffer.begin(), buffer.end(), [](Packed a, Packed b) {
          const uint64_t id_a = static_cast<uint64_t>(a), id_b = static_cast<uint64_t>(b);
          return id_a != id_b ? id_a < id_b : a < b;
        });
        const auto unique_end = std::unique(buffer.begin(), buffer.end(), [](Packed a, Packed b) {
          return static_cast<uint64_t>(a) == static_cast<uint64_t>(b);
        });
        count = std::min<int64_t>(k, unique_end - buffer.begin());
        std::partial_sort(buffer.begin(), buffer.begin() + count, unique_end);
        for (int64_t j = 0; j < count; ++j) collected[j] = unpack(buffer[j]);
      }
      if (failed) return;
      scalar_t* row_out_distances = out_distances + q * k;
      int64_t* row_out_ids = out_ids + q * k;
      for (int64_t j = 0; j < count; ++j) {
        row_out_distances[j] = static_cast<scalar_t>(topk::distance_of<Largest, Key>(collected[j].key));
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
  InputErrorReport errors;
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
                                out_ids.mutable_data_ptr<int64_t>(), errors);
    } else {
      merge_cpu<scalar_t, false>(shards, num_queries, k, sorted, dedup, out_distances.mutable_data_ptr<scalar_t>(),
                                 out_ids.mutable_data_ptr<int64_t>(), errors);
    }
  });
  if (errors.failed.load()) {
    TORCH_CHECK_VALUE(errors.kind != InputErrorReport::kUnsorted, "topk_merge: row ", errors.query,
                      " of distances[", errors.shard, "] is not sorted best-first (",
                      largest ? "descending" : "ascending", ", NaN last); pass sorted=False for unsorted rows");
    TORCH_CHECK_VALUE(false, "topk_merge: id_offsets[", errors.shard, "] = ", errors.offset,
                      " translates local id ", errors.local_id,
                      " out of the int64 range [0, 2^63-1] (an error, never a wrap)");
  }
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
