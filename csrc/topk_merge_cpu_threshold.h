// The CPU merge of sorted float32 rows by threshold, then sort (AVX-512; the loser tree of topk_merge_cpu_sorted.h
// is the fallback and the path on other CPUs). Included by topk_merge_cpu.cpp only.
//
// Per query:
// 1. Each row is read once: its distances become 32-bit sort keys (the first min(width, k) kept) while the same
//    pass checks that the keys never decrease along the whole row. A row that fails (padding out of order, or a
//    row really unsorted) goes to the exact check (rows_sorted): an error, or the loser tree for this query.
// 2. T, the k-th smallest key of the kept prefixes (positions, padding included), is selected: the keys up to a
//    bound that holds at least k (the largest key at each row's share of k) are gathered and a quickselect with
//    vector partitions finds T among them.
// 3. Each row's prefix with keys < T survives: its ids are read (and only those: about k ids per query), checked
//    for padding and translated. Padding there means the real k-th candidate lies further: the loser tree takes
//    the query. Of the candidates with key T, the k - L smallest real ids are taken (ties by id).
// 4. The survivors, as key << 32 | index, are sorted by a bitonic network; equal keys are then ordered by id.
// The output is the loser tree's, bit for bit (tests run both: KARMA_TOPK_MERGE_AVX512=0 turns this path off).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "topk_merge_cpu_bitonic.h"
#include "topk_merge_cpu_rows.h"
#include "topk_merge_cpu_sorted.h"

#if defined(KARMA_HAS_AVX512_MERGE)

namespace karma {
namespace cpu_merge {

// Results per query the threshold merge takes at most: the survivors below T then fit the 256-value network.
constexpr int64_t kThresholdMaxK = 256;

// True when the threshold merge may run: the CPU has AVX-512 and KARMA_TOPK_MERGE_AVX512 is not "0" (the tests
// set it to run the loser tree on the same inputs). Read once per call.
inline bool threshold_merge_enabled() {
  const char* flag = std::getenv("KARMA_TOPK_MERGE_AVX512");
  return avx512::cpu_has_avx512() && !(flag != nullptr && flag[0] == '0' && flag[1] == '\0');
}

template <bool Largest>
class ThresholdMerge {
 public:
  static constexpr int64_t kNeedsTree = -1;  // merge(): this query goes to the loser tree
  static constexpr int64_t kFailed = -2;     // merge(): bad input, recorded in the errors

  ThresholdMerge(const std::vector<ShardRows<float>>& shards, int64_t k)
      : shards_(shards), num_shards_(static_cast<int64_t>(shards.size())), k_(k) {
    int64_t widest = 0;
    for (const auto& shard : shards) widest = std::max(widest, std::min(shard.width, k));
    stride_ = (widest + 15) / 16 * 16;
    keys_.assign(num_shards_ * stride_ + 16, ~uint32_t{0});
    pool_.assign(num_shards_ * stride_ + 32, 0);  // + room for a whole vector stored past the last key
    packed_.assign(kThresholdMaxK, 0);
    ids_.assign(kThresholdMaxK, 0);
    // The ids prefetched per row: a row's share of k and about two standard deviations more (see SortedMerge).
    const int64_t share = (k + num_shards_ - 1) / num_shards_;
    int64_t spread = 1;
    while (spread * spread < share) ++spread;
    id_prefetch_ = share + 2 * spread + 1;
    less_.assign(num_shards_, 0);
    equal_.assign(num_shards_, 0);
  }

  // Merges query q into out_*[0, k); returns the count written, kNeedsTree or kFailed. The rows of query
  // `upcoming` (or -1) are prefetched meanwhile, a row at a time.
  KARMA_AVX512 int64_t merge(int64_t q, float* out_distances, int64_t* out_ids, InputErrorReport& errors,
                             int64_t upcoming) {
    int64_t total = 0;  // kept positions, padding included
    for (int64_t s = 0; s < num_shards_; ++s) {
      if (upcoming >= 0) prefetch_row(s, upcoming);
      if (!convert_row(s, q)) {
        return rows_sorted<float, Largest>(shards_, q, errors) ? kNeedsTree : kFailed;
      }
      total += std::min(shards_[s].width, k_);
    }
    const bool all = total <= k_;  // every candidate is a result: no threshold, padding only dropped
    const uint32_t threshold = all ? ~uint32_t{0} : select_kth();
    int64_t below = 0;
    for (int64_t s = 0; s < num_shards_; ++s) {
      count_row(s, threshold);
      below += less_[s];
    }
    if (below > kThresholdMaxK) return kNeedsTree;
    // Survivors below T: packed keys and translated ids.
    int64_t count = 0;
    for (int64_t s = 0; s < num_shards_ && count >= 0; ++s) count = gather_row(s, q, count, all);
    if (count < 0) return kNeedsTree;
    avx512::sort_packed(packed_.data(), count);
    for (int64_t j = 0; j < count; j += 16) {
      const __mmask16 tail = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<uint32_t>(std::min<int64_t>(16, count - j))));
      const __m512i lo = _mm512_loadu_si512(packed_.data() + j), hi = _mm512_loadu_si512(packed_.data() + j + 8);
      const __m512i keys = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(lo, 32))),
                                              _mm512_cvtepi64_epi32(_mm512_srli_epi64(hi, 32)), 1);
      _mm512_mask_storeu_ps(out_distances + j, tail, avx512::distances_of<Largest>(keys));
      const __m512i index_mask = _mm512_set1_epi64(0xFFFFFFFF);
      const __mmask8 tail_lo = static_cast<__mmask8>(tail), tail_hi = static_cast<__mmask8>(tail >> 8);
      _mm512_mask_storeu_epi64(out_ids + j, tail_lo,
                               _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), tail_lo,
                                                           _mm512_and_si512(lo, index_mask), ids_.data(), 8));
      _mm512_mask_storeu_epi64(out_ids + j + 8, tail_hi,
                               _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), tail_hi,
                                                           _mm512_and_si512(hi, index_mask), ids_.data(), 8));
    }
    if (!all) {
      // The candidates with key T: the k - count smallest real ids, in id order.
      if (!take_ties(q, threshold, k_ - count)) return kNeedsTree;
      const float value = static_cast<float>(topk::distance_of<Largest, float>(threshold));
      for (int64_t j = count; j < k_; ++j) {
        out_distances[j] = value;
        out_ids[j] = ties_[j - count];
      }
      count = k_;
    }
    if (has_equal_neighbours(out_distances, count)) order_tie_groups<float, Largest>(out_distances, out_ids, count);
    return count;
  }

 private:
  // Asks for row s of query q: its distances (all are read) and the first ids (the survivors' are read from the
  // row's start). The hardware's stream prefetch alone left most of the time waiting on them (measured).
  void prefetch_row(int64_t s, int64_t q) const {
    const ShardRows<float>& shard = shards_[s];
    if (shard.width == 0) return;
    const char* distances = reinterpret_cast<const char*>(shard.distances + q * shard.distance_row_stride);
    const int64_t bytes = shard.width * static_cast<int64_t>(sizeof(float));
    for (int64_t b = 0; b < bytes; b += 64) prefetch_line(distances + b);
    prefetch_line(distances + bytes - 1);
    const char* ids = reinterpret_cast<const char*>(shard.ids + q * shard.id_row_stride);
    const int64_t id_bytes = std::min(shard.width, id_prefetch_) * 8;
    for (int64_t b = 0; b < id_bytes; b += 64) prefetch_line(ids + b);
    prefetch_line(ids + id_bytes - 1);
  }

  static KARMA_AVX512_INLINE __mmask16 first_lanes(int64_t n) {
    return static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<uint32_t>(std::min<int64_t>(16, std::max<int64_t>(0, n)))));
  }

  // Keys of row s's first min(width, k) distances into keys_ (lanes past them: all ones), and whether the keys
  // never decrease along the whole row.
  KARMA_AVX512 bool convert_row(int64_t s, int64_t q) {
    const ShardRows<float>& shard = shards_[s];
    const float* distances = shard.distances + q * shard.distance_row_stride;
    const int64_t width = shard.width, kept = std::min(width, k_);
    uint32_t* keys = keys_.data() + s * stride_;
    __m512i previous = _mm512_setzero_si512();
    __mmask16 disorder = 0;
    const __m512i ones = _mm512_set1_epi32(-1);
    int64_t j = 0;
    for (; j + 16 <= width; j += 16) {
      const __m512i key = avx512::sort_keys<Largest>(_mm512_loadu_ps(distances + j));
      disorder |= _mm512_cmplt_epu32_mask(key, _mm512_alignr_epi32(key, previous, 15));
      if (j < kept) _mm512_storeu_si512(keys + j, _mm512_mask_mov_epi32(ones, first_lanes(kept - j), key));
      previous = key;
    }
    if (j < width) {
      const __mmask16 tail = first_lanes(width - j);
      const __m512i key = avx512::sort_keys<Largest>(_mm512_maskz_loadu_ps(tail, distances + j));
      disorder |= _mm512_mask_cmplt_epu32_mask(tail, key, _mm512_alignr_epi32(key, previous, 15));
      if (j < kept) _mm512_storeu_si512(keys + j, _mm512_mask_mov_epi32(ones, first_lanes(kept - j), key));
    }
    return disorder == 0;
  }

  // How many kept keys are <= x (a prefix of each row).
  KARMA_AVX512 int64_t count_at_most(uint32_t x) const {
    const __m512i limit = _mm512_set1_epi32(static_cast<int>(x));
    int64_t count = 0;
    for (int64_t s = 0; s < num_shards_; ++s) {
      const uint32_t* keys = keys_.data() + s * stride_;
      const int64_t kept = std::min(shards_[s].width, k_);
      for (int64_t j = 0; j < kept; j += 16) {  // lanes past the kept keys are all ones: never <= x
        const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_loadu_si512(keys + j), limit);
        count += _mm_popcnt_u32(in);
        if (in != 0xFFFF) break;
      }
    }
    return count;
  }

  // The k-th smallest of the kept keys (more than k of them).
  KARMA_AVX512 uint32_t select_kth() {
    // Bracket (low, high]: at_low keys <= low (< k), at_high keys <= high (>= k). high starts at the largest key
    // at each row's share of k (rows shorter than their share give all their keys; when those fall short of k,
    // every key), low below the smallest key.
    const int64_t share = (k_ + num_shards_ - 1) / num_shards_;
    uint32_t high = 0, low = ~uint32_t{0};
    int64_t guaranteed = 0;
    for (int64_t s = 0; s < num_shards_; ++s) {
      const int64_t kept = std::min(shards_[s].width, k_), at = std::min(kept, share);
      if (at > 0) {
        high = std::max(high, keys_[s * stride_ + at - 1]);
        low = std::min(low, keys_[s * stride_]);
      }
      guaranteed += at;
    }
    if (guaranteed < k_) high = ~uint32_t{0} - 1;
    --low;  // no key is 0, so the smallest key minus one is a key below all
    int64_t at_low = 0, at_high = count_at_most(high);
    // Narrow the bracket by interpolation (rows of similar distances land close to T at once), then select among
    // the keys left in it.
    for (int round = 0; round < 4 && at_high - at_low > 24 && high - low > 1; ++round) {
      const uint64_t step = static_cast<uint64_t>(high - low) * static_cast<uint64_t>(k_ - at_low) /
                            static_cast<uint64_t>(at_high - at_low);
      const uint32_t x = static_cast<uint32_t>(std::clamp<uint64_t>(low + step, uint64_t{low} + 1, uint64_t{high} - 1));
      const int64_t at_x = count_at_most(x);
      if (at_x >= k_) {
        high = x, at_high = at_x;
      } else {
        low = x, at_low = at_x;
      }
    }
    // Gather the keys in (low, high] into pool_.
    uint32_t* pool = pool_.data();
    int64_t size = 0;
    const __m512i above = _mm512_set1_epi32(static_cast<int>(low)), limit = _mm512_set1_epi32(static_cast<int>(high));
    for (int64_t s = 0; s < num_shards_; ++s) {
      const uint32_t* keys = keys_.data() + s * stride_;
      const int64_t kept = std::min(shards_[s].width, k_);
      for (int64_t j = 0; j < kept; j += 16) {
        const __m512i key = _mm512_loadu_si512(keys + j);
        const __mmask16 at_most = _mm512_cmple_epu32_mask(key, limit);  // lanes past the kept ones are all ones
        const __mmask16 in = _mm512_mask_cmpgt_epu32_mask(at_most, key, above);
        _mm512_storeu_si512(pool + size, _mm512_maskz_compress_epi32(in, key));  // (a compress into memory is
        size += _mm_popcnt_u32(in);                                             // microcoded, slow, on some CPUs)
        if (at_most != 0xFFFF) break;
      }
    }
    // Quickselect of rank k - 1 with vector partitions (in place: a vector is loaded before the writes reach it).
    int64_t rank = k_ - 1 - at_low;
    while (true) {
      const uint32_t a = pool[0], b = pool[size / 2], c = pool[size - 1];
      const uint32_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
      const __m512i p = _mm512_set1_epi32(static_cast<int>(pivot));
      int64_t less = 0, not_more = 0;
      for (int64_t j = 0; j < size; j += 16) {
        const __mmask16 lanes = first_lanes(size - j);
        const __m512i key = _mm512_maskz_loadu_epi32(lanes, pool + j);
        less += _mm_popcnt_u32(_mm512_mask_cmplt_epu32_mask(lanes, key, p));
        not_more += _mm_popcnt_u32(_mm512_mask_cmple_epu32_mask(lanes, key, p));
      }
      if (rank >= less && rank < not_more) return pivot;
      const bool below = rank < less;
      int64_t kept = 0;
      for (int64_t j = 0; j < size; j += 16) {
        const __mmask16 lanes = first_lanes(size - j);
        const __m512i key = _mm512_maskz_loadu_epi32(lanes, pool + j);
        const __mmask16 keep = below ? _mm512_mask_cmplt_epu32_mask(lanes, key, p)
                                     : _mm512_mask_cmpgt_epu32_mask(lanes, key, p);
        _mm512_storeu_si512(pool + kept, _mm512_maskz_compress_epi32(keep, key));
        kept += _mm_popcnt_u32(keep);
      }
      if (!below) rank -= not_more;
      size = kept;
    }
  }

  // less_[s], equal_[s]: row s's kept keys below and at the threshold (a prefix, then a run: the row is sorted).
  KARMA_AVX512 void count_row(int64_t s, uint32_t threshold) {
    const uint32_t* keys = keys_.data() + s * stride_;
    const int64_t kept = std::min(shards_[s].width, k_);
    const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
    int64_t less = 0, equal = 0;
    for (int64_t j = 0; j < kept; j += 16) {
      const __m512i key = _mm512_loadu_si512(keys + j);
      const __mmask16 lanes = first_lanes(kept - j);
      const __mmask16 below = _mm512_mask_cmplt_epu32_mask(lanes, key, t);
      const __mmask16 at = _mm512_mask_cmpeq_epu32_mask(lanes, key, t);
      less += _mm_popcnt_u32(below);
      equal += _mm_popcnt_u32(at);
      if ((below | at) != lanes) break;
    }
    less_[s] = less;
    equal_[s] = equal;
  }

  // Row s's survivors (its first less_[s] positions) into packed_/ids_ from index `count`; returns the new count,
  // or -1 when one is padding (unless `all`: then padding is dropped) or an id does not translate.
  KARMA_AVX512 int64_t gather_row(int64_t s, int64_t q, int64_t count, bool all) {
    const ShardRows<float>& shard = shards_[s];
    const int64_t n = less_[s];
    const int64_t* ids = shard.ids + q * shard.id_row_stride;
    const uint32_t* keys = keys_.data() + s * stride_;
    const int64_t offset = shard.offset;
    const __m512i low = _mm512_set1_epi64(offset < 0 ? -offset : 0);
    const __m512i high = _mm512_set1_epi64(offset >= 0 ? std::numeric_limits<int64_t>::max() - offset
                                                       : std::numeric_limits<int64_t>::max());
    const __m512i shift = _mm512_set1_epi64(offset);
    const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    __mmask8 bad = 0, padding = 0;
    for (int64_t j = 0; j < n; j += 8) {
      const __mmask8 lanes = static_cast<__mmask8>(_bzhi_u32(0xFF, static_cast<uint32_t>(std::min<int64_t>(8, n - j))));
      const __m512i id = _mm512_maskz_loadu_epi64(lanes, ids + j);
      padding |= _mm512_mask_cmplt_epi64_mask(lanes, id, _mm512_setzero_si512());
      bad |= _mm512_mask_cmplt_epi64_mask(lanes, id, low) | _mm512_mask_cmpgt_epi64_mask(lanes, id, high);
      _mm512_mask_storeu_epi64(ids_.data() + count + j, lanes, _mm512_add_epi64(id, shift));
      const __m512i key = _mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi32(lanes, keys + j));
      const __m512i index = _mm512_add_epi64(_mm512_set1_epi64(count + j), lane);
      _mm512_mask_storeu_epi64(packed_.data() + count + j, lanes, _mm512_or_si512(_mm512_slli_epi64(key, 32), index));
    }
    if (padding == 0 && bad == 0) return count + n;
    if (!all) return -1;
    // Every candidate is a result: keep the real ones only (bad ids then go to the loser tree, which reports them).
    for (int64_t j = 0; j < n; ++j) {
      if (ids[j] < 0) continue;
      int64_t global;
      if (!topk::translate_id(ids[j], offset, &global)) return -1;
      ids_[count] = global;
      packed_[count] = (static_cast<uint64_t>(keys[j]) << 32) | static_cast<uint64_t>(count);
      ++count;
    }
    return count;
  }

  // ties_[0, need): the smallest real ids among the candidates with key T; false when there are fewer. A row
  // whose whole kept prefix is at or below T may go on with T past it: those positions are read too.
  bool take_ties(int64_t q, uint32_t threshold, int64_t need) {
    ties_.clear();
    for (int64_t s = 0; s < num_shards_; ++s) {
      const ShardRows<float>& shard = shards_[s];
      const int64_t* ids = shard.ids + q * shard.id_row_stride;
      const float* distances = shard.distances + q * shard.distance_row_stride;
      int64_t end = less_[s] + equal_[s];
      if (end == std::min(shard.width, k_)) {
        while (end < shard.width && topk::sort_key<Largest>(distances[end]) == threshold) ++end;
      }
      for (int64_t j = less_[s]; j < end; ++j) {
        if (ids[j] < 0) continue;
        int64_t global;
        if (!topk::translate_id(ids[j], shard.offset, &global)) return false;
        ties_.push_back(global);
      }
    }
    if (static_cast<int64_t>(ties_.size()) < need) return false;
    std::partial_sort(ties_.begin(), ties_.begin() + need, ties_.end());
    return true;
  }

  const std::vector<ShardRows<float>>& shards_;
  int64_t num_shards_;
  int64_t k_;
  int64_t stride_;                 // keys_ per row (a multiple of 16)
  int64_t id_prefetch_;            // ids prefetched per row
  std::vector<uint32_t> keys_;     // per row: the kept prefix's keys, all ones after them
  std::vector<uint32_t> pool_;     // the selection's candidates
  std::vector<uint64_t> packed_;   // survivors: key << 32 | index into ids_ (room for the network's 256)
  std::vector<int64_t> ids_;       // survivors' global ids
  std::vector<int64_t> less_;      // per row: kept keys below T
  std::vector<int64_t> equal_;     // per row: kept keys equal to T
  std::vector<int64_t> ties_;
};

// Merges queries [begin, end) by threshold (rows checked, output rows padded); a query the threshold merge
// hands back goes to the loser tree `tree`, one query at a time. Returns false on bad input (recorded in errors).
template <bool Largest, typename PadRow>
bool merge_threshold_queries(ThresholdMerge<Largest>& merge, SortedMerge<float, Largest>& tree, int64_t begin,
                             int64_t end, int64_t k, float* out_distances, int64_t* out_ids,
                             InputErrorReport& errors, const PadRow& pad_row) {
  using Tree = SortedMerge<float, Largest>;
  constexpr int kDepth = Tree::kRuntimeDepth;
  for (int64_t q = begin; q < end; ++q) {
    if (errors.failed.load(std::memory_order_relaxed)) return false;
    int64_t count = merge.merge(q, out_distances + q * k, out_ids + q * k, errors, q + 2 < end ? q + 2 : -1);
    if (count == ThresholdMerge<Largest>::kFailed) return false;
    if (count == ThresholdMerge<Largest>::kNeedsTree) {
      auto cursor = tree.begin(q, k, out_distances + q * k, out_ids + q * k, errors, -1);
      while (Tree::running(cursor)) tree.template step<kDepth, false>(cursor);
      count = tree.template finish<kDepth, false>(cursor);
      if (count < 0) return false;
    }
    pad_row(q, count);
  }
  return true;
}

}  // namespace cpu_merge
}  // namespace karma

#endif  // KARMA_HAS_AVX512_MERGE
