// Per-query logic of the top-k merge, shared by the CPU implementation (topk_merge_cpu.cpp) and the CUDA
// kernel (topk_merge_cuda.cu). No torch or std headers here, so nvcc compiles it for the device as-is.
//
// The order is total: for "l2" ascending distance, for "ip" descending score (Largest = true); NaN after
// every number; equal distances by smaller global id. Each distance is mapped once to an unsigned sort key
// with that order (metric, NaN and -0 folded in), so every comparison is a plain integer comparison of
// (key, id). Padding (any negative local id) never enters the order: the callers skip it, and the tail of a
// row with fewer than k real candidates is filled with id -1 and the worst distance (+inf l2, -inf ip).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KARMA_HD __host__ __device__ __forceinline__
#define KARMA_HD_HOT __host__ __device__ __forceinline__
#else
#define KARMA_HD inline
#define KARMA_HD_HOT inline __attribute__((always_inline))  // the per-candidate path: keep it in the loop
#endif

namespace karma {
namespace topk {

// key: the sort key of the distance (see sort_key); id: the global id (after the shard's offset).
struct Candidate {
  uint64_t key;
  int64_t id;
};

// Keys of NaN (after every number), per distance precision. A NaN key is the key a canonical NaN would get (0x7FC00000 / 0x7FF8000000000000 with the sign bit flipped), so the
// inverse map needs no special case; it sits above the key of +inf. The all-ones key of each precision stays
// free (the CPU merge marks the end of a shard's row with it), and no distance maps to key 0 (only a NaN with
// every bit set would, and NaN is mapped first).
constexpr uint64_t kNanKey32 = 0xFFC00000ull;             // above the key of +inf, 0xFF800000
constexpr uint64_t kNanKey64 = 0xFFF8000000000000ull;     // above the key of +inf, 0xFFF0000000000000

// Reinterprets the bits of a value (memcpy compiles to a register move on host and device).
template <typename To, typename From>
KARMA_HD To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To result;
  memcpy(&result, &value, sizeof result);
  return result;
}

// Distance -> unsigned key, ascending in rank. IEEE bits order like sign-magnitude integers: flipping the sign
// bit of non-negatives and every bit of negatives makes them order like unsigned integers. "ip" ranks the
// negated score; adding +0 turns -0 into +0 so that the two zeros tie (and break by id). Written with selects
// only, so that loops over many distances vectorize.
template <bool Largest>
KARMA_HD_HOT uint64_t sort_key(float distance) {
  const float value = (Largest ? -distance : distance) + 0.0f;
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return distance != distance ? kNanKey32 : static_cast<uint64_t>(bits ^ flip);
}

template <bool Largest>
KARMA_HD_HOT uint64_t sort_key(double distance) {
  const double value = (Largest ? -distance : distance) + 0.0;
  const uint64_t bits = bit_cast<uint64_t>(value);
  const uint64_t flip = static_cast<uint64_t>(static_cast<int64_t>(bits) >> 63) | 0x8000000000000000ull;
  return distance != distance ? kNanKey64 : bits ^ flip;
}

// Inverse of sort_key (NaN comes back as the canonical NaN, -0 as +0): undoes the flip (a key with its top bit
// set came from a non-negative value). Selects only.
template <bool Largest, typename Key>
KARMA_HD Key distance_of(uint64_t key);

template <>
KARMA_HD float distance_of<false, float>(uint64_t key) {
  const uint32_t k = static_cast<uint32_t>(key);
  return bit_cast<float>(k ^ (static_cast<uint32_t>(static_cast<int32_t>(~k) >> 31) | 0x80000000u));
}

template <>
KARMA_HD float distance_of<true, float>(uint64_t key) {
  return key == kNanKey32 ? distance_of<false, float>(key) : 0.0f - distance_of<false, float>(key);
}

template <>
KARMA_HD double distance_of<false, double>(uint64_t key) {
  return bit_cast<double>(key ^ (static_cast<uint64_t>(static_cast<int64_t>(~key) >> 63) | 0x8000000000000000ull));
}

template <>
KARMA_HD double distance_of<true, double>(uint64_t key) {
  return key == kNanKey64 ? distance_of<false, double>(key) : 0.0 - distance_of<false, double>(key);
}

// True when a ranks strictly before b: smaller key, then smaller id.
KARMA_HD bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.key < b.key || (a.key == b.key && a.id < b.id);
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

// Collects the merged stream of candidates of one query. The stream arrives in non-decreasing key order
// (an S-way merge of rows sorted by distance) but, within one key, in any id order: a shard's row is sorted
// by distance only. The first k are kept in arrival order; once full, the boundary tie group (the candidates
// whose key equals the k-th one, out[boundary_start, k)) is kept as a max-heap by id, so a later tied
// candidate with a smaller id replaces the largest id in O(log k). The caller then orders tie groups by id
// (order_ties below, or its own sort). `out` has room for k candidates.
struct TopKCollector {
  Candidate* out;
  int64_t k;
  int64_t count;
  int64_t boundary_start;  // valid once count == k

  KARMA_HD TopKCollector(Candidate* out_, int64_t k_)
      : out(out_), k(k_), count(0), boundary_start(0) {}

  // Offers the next candidate of the stream. Returns false once no later candidate can enter: the stream's
  // key has moved past the k-th one. The common case (still filling) stays small enough to inline.
  KARMA_HD_HOT bool offer(const Candidate& c) {
    if (count < k) {
      out[count++] = c;
      if (count == k) seal();
      return true;
    }
    return offer_past_k(c);
  }

  // The k-th candidate arrived: find the boundary tie group and heapify it by id.
  KARMA_HD void seal() {
    boundary_start = k - 1;
    while (boundary_start > 0 && out[boundary_start - 1].key == out[k - 1].key) --boundary_start;
    const int64_t size = k - boundary_start;
    for (int64_t pos = size / 2 - 1; pos >= 0; --pos) sift_down_by_id(pos, size);
  }

  KARMA_HD bool offer_past_k(const Candidate& c) {
    if (c.key != out[boundary_start].key) return false;
    if (c.id < out[boundary_start].id) {
      out[boundary_start] = c;
      sift_down_by_id(0, k - boundary_start);
    }
    return true;
  }

  // Max-heap by id over out[boundary_start, boundary_start + size).
  KARMA_HD void sift_down_by_id(int64_t pos, int64_t size) {
    Candidate* group = out + boundary_start;
    const Candidate item = group[pos];
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

// Insertion sort by (key, id). The collected stream is already in key order, so this only reorders ids
// within tie groups: O(count) without ties. (The CPU path sorts long tie groups with std::sort instead.)
KARMA_HD void order_ties(Candidate* out, int64_t count) {
  for (int64_t i = 1; i < count; ++i) {
    const Candidate c = out[i];
    int64_t j = i;
    while (j > 0 && ranks_before(c, out[j - 1])) {
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

}  // namespace topk
}  // namespace karma
