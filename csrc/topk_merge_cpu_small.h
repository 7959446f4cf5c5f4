// The small merge (sorted rows, k <= kSmallMergeMaxK, S <= kSmallMergeMaxShards, no dedup): the serving case, one
// query with k = 10 per call. Included by topk_merge_cpu.cpp (the op) and topk_merge_numpy.cpp (the small-call path
// for numpy, which runs it on the calling thread: no tensors, no allocation, no thread pool).
//
// Per query: the whole-row sorted check (sorted=True's contract: every row checked whole, see row_sorted), then an
// S-way merge in which each output is the minimum of the S heads, taken by a branch-free tournament over a fixed
// power-of-two number of heads. A head is one integer, the sort key above the shard index, so the minimum is plain
// integer comparisons and names its shard; equal keys come out in shard order, and topk::TopKCollector (which keeps
// the smallest ids of the tie group cut by k) and topk::order_ties put ties in id order. No tree or blocks to set up,
// so a query costs about what it reads, ~k + S candidates.
#pragma once

#include <ATen/OpMathType.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "topk_merge.h"
#include "topk_merge_cpu_rows.h"
#include "topk_merge_errors.h"

namespace karma {
namespace cpu_merge {

constexpr int64_t kSmallMergeMaxK = 32;
constexpr int64_t kSmallMergeMaxShards = 16;

// Writes up to k candidates of query q to `out` and returns their count, or -1 on bad input (recorded in errors).
// Order was checked before (small_rows_sorted). Each shard's candidate after its head is read ahead (padding
// skipped, id checked, key made), so the chain from one output to the next is the tournament and a copy, not a read
// of the row.
template <typename scalar_t, bool Largest, int N>
int64_t small_merge(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t q, int64_t k, Candidate* out,
                    InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;
  // A head: its key (32 bits for float keys, 64 for double) above its shard's index.
  using Head = std::conditional_t<sizeof(Key) == 4, uint64_t, unsigned __int128>;
  // After every key, NaN's included: the all-ones key is no distance's (see topk.h).
  constexpr uint64_t kEnd = sizeof(Key) == 4 ? 0xFFFFFFFFull : ~uint64_t{0};
  const auto end_of = [](int64_t s) { return (static_cast<Head>(kEnd) << 32) | static_cast<uint32_t>(s); };
  Head heads[N], next_heads[N];
  int64_t head_ids[N], next_ids[N], next_positions[N];
  const scalar_t* distances[N];
  const int64_t* ids[N];
  // Reads shard s's next real candidate at or after pos into next_*; false on an id overflow (recorded).
  const auto read_ahead = [&](int64_t s, int64_t pos) {
    const ShardRows<scalar_t>& shard = shards[s];
    while (pos < shard.width && ids[s][pos] < 0) ++pos;
    next_positions[s] = pos;
    if (pos == shard.width) {
      next_heads[s] = end_of(s);
      return true;
    }
    if (!topk::translate_id(ids[s][pos], shard.offset, &next_ids[s])) {
      errors.record_overflow(s, ids[s][pos], shard.offset);
      return false;
    }
    next_heads[s] = (static_cast<Head>(topk::sort_key<Largest>(static_cast<Key>(distances[s][pos]))) << 32) |
                    static_cast<uint32_t>(s);
    return true;
  };
  // Makes the read-ahead candidate shard s's head and reads the one after it.
  const auto step = [&](int64_t s) {
    heads[s] = next_heads[s];
    head_ids[s] = next_ids[s];
    return static_cast<uint64_t>(heads[s] >> 32) == kEnd || read_ahead(s, next_positions[s] + 1);
  };
  for (int64_t s = 0; s < num_shards; ++s) {
    const ShardRows<scalar_t>& shard = shards[s];
    distances[s] = shard.distances + q * shard.distance_row_stride;
    ids[s] = shard.ids + q * shard.id_row_stride;
    if (!read_ahead(s, 0) || !step(s)) return -1;
  }
  for (int64_t s = num_shards; s < N; ++s) heads[s] = end_of(s);
  topk::TopKCollector collector(out, k);
  while (true) {
    Head best = heads[0];
    for (int s = 1; s < N; ++s) best = heads[s] < best ? heads[s] : best;
    const uint64_t key = static_cast<uint64_t>(best >> 32);
    const uint32_t s = static_cast<uint32_t>(best);
    if (key == kEnd || !collector.offer(Candidate{key, head_ids[s]})) break;
    if (!step(s)) return -1;
  }
  topk::order_ties(out, collector.count);
  return collector.count;
}

#if defined(__SSE2__)
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

// sorted=True's whole-row check for the S rows of query q (row_sorted's contract, its exact pass only for a row
// whose distances alone are not monotone). Records the first row out of order; false then.
template <typename scalar_t, bool Largest>
bool small_rows_sorted(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t q, InputErrorReport& errors) {
  for (int64_t s = 0; s < num_shards; ++s) {
    const ShardRows<scalar_t>& shard = shards[s];
    const scalar_t* distances = shard.distances + q * shard.distance_row_stride;
    int monotone;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      monotone = shard.width >= 5 ? floats_monotone_sse2<Largest>(distances, shard.width)
                                  : distances_monotone<float, Largest>(distances, shard.width);
    } else {
      monotone = distances_monotone<scalar_t, Largest>(distances, shard.width);
    }
#else
    monotone = distances_monotone<scalar_t, Largest>(distances, shard.width);
#endif
    if (!monotone && !row_sorted<scalar_t, Largest>(shard, q)) {
      errors.record_unsorted(s, q);
      return false;
    }
  }
  return true;
}

// Merges queries [begin, end) into the (Q, k) outputs (rows with fewer than k real candidates padded); false on
// bad input (recorded in errors). S <= kSmallMergeMaxShards, k <= kSmallMergeMaxK.
template <typename scalar_t, bool Largest, int N>
bool small_merge_queries(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t begin, int64_t end,
                         int64_t k, scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;
  const scalar_t padding = static_cast<scalar_t>(topk::padding_distance<Largest>());
  Candidate buffer[kSmallMergeMaxK];
  for (int64_t q = begin; q < end; ++q) {
    if (!small_rows_sorted<scalar_t, Largest>(shards, num_shards, q, errors)) return false;
    const int64_t count = small_merge<scalar_t, Largest, N>(shards, num_shards, q, k, buffer, errors);
    if (count < 0) return false;
    scalar_t* row_distances = out_distances + q * k;
    int64_t* row_ids = out_ids + q * k;
    for (int64_t j = 0; j < count; ++j) {
      row_distances[j] = static_cast<scalar_t>(topk::distance_of<Largest, Key>(buffer[j].key));
      row_ids[j] = buffer[j].id;
    }
    for (int64_t j = count; j < k; ++j) {
      row_distances[j] = padding;
      row_ids[j] = -1;
    }
  }
  return true;
}

// small_merge_queries with the tournament's width picked for num_shards (<= kSmallMergeMaxShards).
template <typename scalar_t, bool Largest>
bool small_merge_queries(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t begin, int64_t end,
                         int64_t k, scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors) {
  if (num_shards <= 4) {
    return small_merge_queries<scalar_t, Largest, 4>(shards, num_shards, begin, end, k, out_distances, out_ids, errors);
  }
  if (num_shards <= 8) {
    return small_merge_queries<scalar_t, Largest, 8>(shards, num_shards, begin, end, k, out_distances, out_ids, errors);
  }
  return small_merge_queries<scalar_t, Largest, 16>(shards, num_shards, begin, end, k, out_distances, out_ids, errors);
}

}  // namespace cpu_merge
}  // namespace karma
