// The CPU merge's building blocks over raw shard rows (no tensors): the row table, the whole-row sorted check, the
// tie-group ordering of a written row and the thread partition. The small merge (the serving case) is
// topk_merge_cpu_small.h; the S-way merge of long rows is topk_merge_cpu_sorted.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "topk_merge.h"
#include "topk_merge_errors.h"

namespace karma {
namespace cpu_merge {

using topk::Candidate;

// One shard's rows: distances[q * distance_row_stride + j], ids[q * id_row_stride + j], j < width.
template <typename scalar_t>
struct ShardRows {
  const scalar_t* distances;
  const int64_t* ids;
  int64_t distance_row_stride;
  int64_t id_row_stride;
  int64_t width;
  int64_t offset;
};

// A candidate as one 128-bit integer (key high, id low): the total order is the integer order, one compare.
using Packed = unsigned __int128;

inline Packed pack(uint64_t key, int64_t id) { return (static_cast<Packed>(key) << 64) | static_cast<uint64_t>(id); }
inline Candidate unpack(Packed p) { return Candidate{static_cast<uint64_t>(p >> 64), static_cast<int64_t>(p)}; }

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

// A software prefetch the optimizer keeps: GCC 12's dead-code elimination removed a whole loop made only of
// __builtin_prefetch calls (measured: the merge ran 1.6x slower), so the address also goes to an empty asm.
inline void prefetch_line(const void* address) {
  __builtin_prefetch(address);
  __asm__ volatile("" : : "r"(address));
}

// Splits queries [0, num_queries) among the threads at::parallel_for starts (it decides how many from `grain`),
// `grain` queries at a time handed out by a shared counter rather than one fixed share per thread: on a machine
// where other processes take cores away, a descheduled thread's share would hold up the whole call, while here
// the running threads take it over. body(claim) runs once per thread with its per-thread state;
// claim(begin, end) gives the next range, false when none is left.
template <typename Body>
void parallel_over_queries(int64_t num_queries, int64_t grain, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, num_queries, grain, [&](int64_t, int64_t) {
    const auto claim = [&](int64_t& begin, int64_t& end) {
      begin = next.fetch_add(grain, std::memory_order_relaxed);
      if (begin >= num_queries) return false;
      end = std::min(num_queries, begin + grain);
      return true;
    };
    body(claim);
  });
}

// sorted=True's contract checked over the whole row, not only the candidates the merge reads: every real
// candidate of row q of a shard against the real candidate before it (padding, wherever it sits, skipped), so a
// row out of order anywhere raises instead of giving a wrong top-k. A first pass reads the distances alone: a row
// sorted including its padding (faiss's rows: padding at the end) passes there; only a row that fails it is
// read again with its ids. The merges after it rely on it: they do not check order themselves.
//
// The distance pass: plain comparisons, no branch, so the compiler vectorises it. A NaN compares false, so a row
// holding one takes the exact pass (NaN last is sorted there). float32 rows also have SSE2 and AVX2 builds of it
// (row_distances_monotone picks one; the extension's baseline is SSE2).
template <typename scalar_t, bool Largest>
inline int distances_monotone(const scalar_t* distances, int64_t n) {
  using Key = at::opmath_type<scalar_t>;
  int monotone = 1;
  for (int64_t j = 1; j < n; ++j) {
    const Key before = static_cast<Key>(distances[j - 1]), here = static_cast<Key>(distances[j]);
    monotone &= static_cast<int>(Largest ? here <= before : here >= before);
  }
  return monotone;
}

#if defined(__x86_64__) && defined(__GNUC__)
// Eight neighbour pairs per step with ordered comparisons (false for NaN, like the scalar ones); written with
// intrinsics: GCC's own vectorisation of the loop above took about twice the instructions.
template <bool Largest>
__attribute__((target("avx2"))) int floats_monotone_avx2(const float* distances, int64_t n) {
  __m256 in_order = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t j = 1;
  for (; j + 8 <= n; j += 8) {
    const __m256 before = _mm256_loadu_ps(distances + j - 1), here = _mm256_loadu_ps(distances + j);
    in_order = _mm256_and_ps(in_order, Largest ? _mm256_cmp_ps(here, before, _CMP_LE_OQ)
                                               : _mm256_cmp_ps(here, before, _CMP_GE_OQ));
  }
  int monotone = static_cast<int>(_mm256_movemask_ps(in_order) == 0xFF);
  for (; j < n; ++j) {
    monotone &= static_cast<int>(Largest ? distances[j] <= distances[j - 1] : distances[j] >= distances[j - 1]);
  }
  return monotone;
}

constexpr int64_t kAvx2RowCheckMinWidth = 48;

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// distances_monotone for float32 rows of at least 5, four neighbour pairs per step (SSE2, the x86-64 baseline), the
// last step overlapping the one before it instead of a scalar tail. Ordered comparisons: false for NaN, which the
// exact pass then judges.
template <bool Largest>
inline int floats_monotone_sse2(const float* distances, int64_t n) {
  __m128 in_order = _mm_castsi128_ps(_mm_set1_epi32(-1));
  const auto pairs = [&](int64_t j) {
    const __m128 before = _mm_loadu_ps(distances + j - 1), here = _mm_loadu_ps(distances + j);
    in_order = _mm_and_ps(in_order, Largest ? _mm_cmple_ps(here, before) : _mm_cmpge_ps(here, before));
  };
  int64_t j = 1;
  for (; j + 4 <= n; j += 4) pairs(j);
  if (j < n) pairs(n - 4);
  return static_cast<int>(_mm_movemask_ps(in_order) == 0xF);
}
#endif

// The distance pass for one row: AVX2 for long float32 rows where the CPU has it (a call into the AVX2 build
// costs more than a short row's inlined pass: the serving case, k_s ~ 10, measured 0.7x faiss at Q = 64 with the
// call for every row), SSE2 for float32 rows of 5 or more, the portable loop otherwise.
template <typename scalar_t, bool Largest>
inline int row_distances_monotone(const scalar_t* distances, int64_t width) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (width >= kAvx2RowCheckMinWidth && cpu_has_avx2()) return floats_monotone_avx2<Largest>(distances, width);
    if (width >= 5) return floats_monotone_sse2<Largest>(distances, width);
  }
#endif
  return distances_monotone<scalar_t, Largest>(distances, width);
}

// The exact pass for a row that failed its distance pass: every real candidate's sort key against the one before
// (padding skipped).
template <typename scalar_t, bool Largest>
bool row_keys_sorted(const ShardRows<scalar_t>& shard, int64_t q) {
  using Key = at::opmath_type<scalar_t>;
  const scalar_t* distances = shard.distances + q * shard.distance_row_stride;
  const int64_t* ids = shard.ids + q * shard.id_row_stride;
  uint64_t previous = 0;
  for (int64_t j = 0; j < shard.width; ++j) {
    if (ids[j] < 0) continue;
    const uint64_t key = topk::sort_key<Largest>(static_cast<Key>(distances[j]));
    if (key < previous) return false;
    previous = key;
  }
  return true;
}

// Whether row q of every shard is sorted, each row's distance pass by `monotone(distances, width)` (a build's own
// vector pass) and the exact pass only for a row that fails it. Records the first shard out of order; false then.
template <typename scalar_t, bool Largest, typename DistancePass>
bool rows_sorted_by(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t q, InputErrorReport& errors,
                    const DistancePass& monotone) {
  for (int64_t s = 0; s < num_shards; ++s) {
    const ShardRows<scalar_t>& shard = shards[s];
    if (monotone(shard.distances + q * shard.distance_row_stride, shard.width)) continue;
    if (__builtin_expect(!row_keys_sorted<scalar_t, Largest>(shard, q), 0)) {
      errors.record_unsorted(s, q);
      return false;
    }
  }
  return true;
}

template <typename scalar_t, bool Largest>
bool rows_sorted(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t q, InputErrorReport& errors) {
  return rows_sorted_by<scalar_t, Largest>(shards, num_shards, q, errors, row_distances_monotone<scalar_t, Largest>);
}

template <typename scalar_t, bool Largest>
bool rows_sorted(const std::vector<ShardRows<scalar_t>>& shards, int64_t q, InputErrorReport& errors) {
  return rows_sorted<scalar_t, Largest>(shards.data(), static_cast<int64_t>(shards.size()), q, errors);
}

// Sorts the ids of each run of equal keys of a written row (already in key order; a run's distances are all the
// same value).
template <typename scalar_t, bool Largest>
void order_tie_groups(const scalar_t* out_distances, int64_t* out_ids, int64_t count) {
  const auto key_of = [](scalar_t value) {
    return topk::sort_key<Largest>(static_cast<at::opmath_type<scalar_t>>(value));
  };
  int64_t start = 0;
  while (start < count) {
    const uint64_t key = key_of(out_distances[start]);
    int64_t end = start + 1;
    while (end < count && key_of(out_distances[end]) == key) ++end;
    std::sort(out_ids + start, out_ids + end);
    start = end;
  }
}

// True when two neighbours of values[0, n) have the same bits, i.e. the same sort key (a written distance is a
// function of its key: -0 and NaN come out canonical). Branch-free, so it vectorises.
template <typename scalar_t>
bool has_equal_neighbours(const scalar_t* values, int64_t n) {
  using Bits = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(Bits) == sizeof(scalar_t), "distance of an unexpected width");
  int equal = 0;
  for (int64_t j = 1; j < n; ++j) {
    Bits a, b;
    std::memcpy(&a, values + j - 1, sizeof a);
    std::memcpy(&b, values + j, sizeof b);
    equal |= static_cast<int>(a == b);
  }
  return equal != 0;
}

}  // namespace cpu_merge
}  // namespace karma
