// Per-query logic of the top-k merge, shared by the CPU implementation (topk_merge_cpu.cpp) and the CUDA
// kernel (topk_merge_cuda.cu). No torch or std headers here, so nvcc compiles it for the device as-is.
//
// The order is total: for "l2" ascending distance, for "ip" descending score (Largest = true); NaN after
// every number; equal distances by smaller global id. Padding (any negative local id) never enters the order:
// the callers skip it, and the tail of a row with fewer than k real candidates is filled with id -1 and the
// worst distance (+inf for l2, -inf for ip).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KARMA_HD __host__ __device__ __forceinline__
#else
#define KARMA_HD inline
#endif

namespace karma {
namespace topk {

// Keys are compared in "compute precision": float for fp16/bf16/fp32 distances, double for fp64.
template <typename Key>
struct Candidate {
  Key distance;
  int64_t id;  // global id (after the shard's offset)
};

template <typename Key>
KARMA_HD bool is_nan(Key x) {
  return x != x;
}

// True when a ranks strictly before b in the total order.
template <bool Largest, typename Key>
KARMA_HD bool ranks_before(const Candidate<Key>& a, const Candidate<Key>& b) {
  const bool a_nan = is_nan(a.distance);
  const bool b_nan = is_nan(b.distance);
  if (a_nan != b_nan) return b_nan;  // a number ranks before NaN
  if (!a_nan && a.distance != b.distance) {
    return Largest ? a.distance > b.distance : a.distance < b.distance;
  }
  return a.id < b.id;
}

// Same distance class for the tie rule: equal numbers, or both NaN (+0 and -0 are equal).
template <typename Key>
KARMA_HD bool same_distance(Key a, Key b) {
  const bool a_nan = is_nan(a);
  const bool b_nan = is_nan(b);
  return (a_nan && b_nan) || (!a_nan && !b_nan && a == b);
}

// Local id -> global id. Returns false when the sum leaves [0, INT64_MAX] (an error, never a wrap).
KARMA_HD bool translate_id(int64_t local_id, int64_t offset, int64_t* global_id) {
  if (offset >= 0) {
    if (local_id > INT64_MAX - offset) return false;
  } else if (local_id < -offset) {
    return false;  // a real id translated below zero would read as padding
  }
  *global_id = local_id + offset;
  return true;
}

// Collects the merged stream of candidates of one query. The stream arrives in non-decreasing distance order
// (an S-way merge of rows sorted by distance) but, within one distance, in any id order: a shard's row is sorted
// by distance only. The first k are kept in arrival order; once full, the boundary tie group (the candidates
// whose distance equals the k-th one, out[boundary_start, k)) is kept as a max-heap by id, so a later tied
// candidate with a smaller id replaces the largest id in O(log k). The caller then orders tie groups by id
// (order_ties below, or its own sort). `out` has room for k candidates.
template <bool Largest, typename Key>
struct TopKCollector {
  Candidate<Key>* out;
  int64_t k;
  int64_t count;
  int64_t boundary_start;  // valid once count == k

  KARMA_HD TopKCollector(Candidate<Key>* out_, int64_t k_) : out(out_), k(k_), count(0), boundary_start(0) {}

  KARMA_HD bool full() const { return count == k; }

  // Offers the next candidate of the stream. Returns false once no later candidate can enter: the stream's
  // distance has moved past the k-th one.
  KARMA_HD bool offer(const Candidate<Key>& c) {
    if (count < k) {
      out[count++] = c;
      if (count == k) {
        boundary_start = k - 1;
        while (boundary_start > 0 && same_distance(out[boundary_start - 1].distance, out[k - 1].distance)) {
          --boundary_start;
        }
        const int64_t size = k - boundary_start;
        for (int64_t pos = size / 2 - 1; pos >= 0; --pos) sift_down_by_id(pos, size);
      }
      return true;
    }
    if (!same_distance(c.distance, out[boundary_start].distance)) return false;
    if (c.id < out[boundary_start].id) {
      out[boundary_start] = c;
      sift_down_by_id(0, k - boundary_start);
    }
    return true;
  }

  // Max-heap by id over out[boundary_start, boundary_start + size).
  KARMA_HD void sift_down_by_id(int64_t pos, int64_t size) {
    Candidate<Key>* group = out + boundary_start;
    const Candidate<Key> item = group[pos];
    while (true) {
      int64_t child = 2 * pos + 1;
      if (child >= size) break;
      if (child + 1 < size && group[child + 1].id > group[child].id) ++child;
      if (group[child].id <= item.id) break;
      group[pos] = group[child];
      pos = child;
    }
    group[pos] = item;
  }
};

// Insertion sort by the total order. The collected stream is already in distance order, so this only reorders
// ids within tie groups: O(count) without ties. (The CPU path sorts long tie groups with std::sort instead.)
template <bool Largest, typename Key>
KARMA_HD void order_ties(Candidate<Key>* out, int64_t count) {
  for (int64_t i = 1; i < count; ++i) {
    const Candidate<Key> c = out[i];
    int64_t j = i;
    while (j > 0 && ranks_before<Largest>(c, out[j - 1])) {
      out[j] = out[j - 1];
      --j;
    }
    out[j] = c;
  }
}

// Worst distance, written with id -1 to the tail of a row that has fewer than k real candidates.
template <bool Largest>
KARMA_HD double padding_distance() {
  return Largest ? -__builtin_huge_val() : __builtin_huge_val();
}

// Binary min-heap (by the total order) of shard indices keyed by each shard's current head candidate: the
// S-way merge pops the best head, then replaces it with that shard's next candidate.
template <bool Largest, typename Key>
KARMA_HD void heap_sift_down(int32_t* heap, int32_t size, int32_t pos, const Candidate<Key>* heads) {
  const int32_t item = heap[pos];
  while (true) {
    int32_t child = 2 * pos + 1;
    if (child >= size) break;
    if (child + 1 < size && ranks_before<Largest>(heads[heap[child + 1]], heads[heap[child]])) ++child;
    if (!ranks_before<Largest>(heads[heap[child]], heads[item])) break;
    heap[pos] = heap[child];
    pos = child;
  }
  heap[pos] = item;
}

template <bool Largest, typename Key>
KARMA_HD void heap_build(int32_t* heap, int32_t size, const Candidate<Key>* heads) {
  for (int32_t pos = size / 2 - 1; pos >= 0; --pos) heap_sift_down<Largest>(heap, size, pos, heads);
}

}  // namespace topk
}  // namespace karma
