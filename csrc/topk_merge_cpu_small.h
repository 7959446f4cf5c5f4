// The small merge (sorted rows, k <= kSmallMergeMaxK, S <= kSmallMergeMaxShards, no dedup): the serving case, one
// query with k = 10 per call. Included by topk_merge_cpu.cpp (the op) and topk_merge_numpy.cpp (the small-call path
// for numpy, which runs it on the calling thread: no tensors, no allocation, no thread pool).
//
// Per query: the whole-row sorted check (rows_sorted: sorted=True's contract, every row checked whole; float32 rows
// four neighbour pairs at a time), then an S-way merge in which each output scans the S heads' keys for the
// best: no tree or blocks to set up, so a query costs about what it reads, ~k + S candidates. The stream goes into
// topk::TopKCollector (which keeps the smallest ids of the tie group cut by k); topk::order_ties then sorts ids within
// ties, when there are any. Tried and measured slower here (side by side, one process): heads as key << 32 | shard with a branch-free
// tournament, each row's first k keys converted up front (SSE2) and two queries interleaved, the next candidate of
// each row read ahead, the best key kept in a register during the scan: 1.1-1.3x the time per query of this scan.
#pragma once

#include <ATen/OpMathType.h>


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

// True when two neighbours of the key-ordered out[0, count) tie (only then has order_ties anything to do).
inline bool has_equal_keys(const Candidate* out, int64_t count) {
  int equal = 0;
  for (int64_t j = 1; j < count; ++j) equal |= static_cast<int>(out[j].key == out[j - 1].key);
  return equal != 0;
}

// Writes up to k candidates of query q to `out` and returns their count, or -1 on bad input (recorded in errors).
// Order was checked before (rows_sorted); ids are checked as they are read. Each output scans the S heads'
// keys for the best (the collector orders ties by id itself, so the heads compare by key alone).
template <typename scalar_t, bool Largest>
int64_t small_merge(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t q, int64_t k, Candidate* out,
                    InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;
  constexpr uint64_t kExhausted = ~uint64_t{0};  // after every key (NaN's included)
  uint64_t head_keys[kSmallMergeMaxShards];
  int64_t head_ids[kSmallMergeMaxShards];
  int64_t positions[kSmallMergeMaxShards];
  bool failed = false;
  const scalar_t* row_distances[kSmallMergeMaxShards];
  const int64_t* row_ids[kSmallMergeMaxShards];
  // Makes shard s's head its next real candidate at or after pos.
  const auto read = [&](int64_t s, int64_t pos) {
    const int64_t width = shards[s].width;
    const int64_t* ids = row_ids[s];
    while (pos < width && ids[pos] < 0) ++pos;
    positions[s] = pos;
    head_keys[s] = kExhausted;
    if (pos == width) return;
    if (!topk::translate_id(ids[pos], shards[s].offset, &head_ids[s])) {
      errors.record_overflow(s, ids[pos], shards[s].offset);
      failed = true;
      return;
    }
    head_keys[s] = topk::sort_key<Largest>(static_cast<Key>(row_distances[s][pos]));
  };
  for (int64_t s = 0; s < num_shards; ++s) {
    row_distances[s] = shards[s].distances + q * shards[s].distance_row_stride;
    row_ids[s] = shards[s].ids + q * shards[s].id_row_stride;
  }
  for (int64_t s = 0; s < num_shards; ++s) read(s, 0);
  topk::TopKCollector collector(out, k);
  while (!failed) {
    int64_t best = 0;
    for (int64_t s = 1; s < num_shards; ++s) best = head_keys[s] < head_keys[best] ? s : best;
    const uint64_t key = head_keys[best];
    if (key == kExhausted || !collector.offer(Candidate{key, head_ids[best]})) break;
    read(best, positions[best] + 1);
  }
  if (failed) return -1;
  if (has_equal_keys(out, collector.count)) topk::order_ties(out, collector.count);
  return collector.count;
}


// Merges queries [begin, end) into the (Q, k) outputs (rows with fewer than k real candidates padded); false on
// bad input (recorded in errors). S <= kSmallMergeMaxShards, k <= kSmallMergeMaxK.
template <typename scalar_t, bool Largest>
bool small_merge_queries(const ShardRows<scalar_t>* shards, int64_t num_shards, int64_t begin, int64_t end,
                         int64_t k, scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;
  const scalar_t padding = static_cast<scalar_t>(topk::padding_distance<Largest>());
  Candidate buffer[kSmallMergeMaxK];
  for (int64_t q = begin; q < end; ++q) {
    if (!rows_sorted<scalar_t, Largest>(shards, num_shards, q, errors)) return false;
    const int64_t count = small_merge<scalar_t, Largest>(shards, num_shards, q, k, buffer, errors);
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

}  // namespace cpu_merge
}  // namespace karma
