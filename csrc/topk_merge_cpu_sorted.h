// The CPU merge of sorted rows (sorted=True, beyond the small merge's k and S): an S-way loser-tree merge per
// query, two queries in flight per thread. Included by topk_merge_cpu.cpp only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "topk_merge_cpu_avx512.h"
#include "topk_merge_cpu_rows.h"

namespace karma {
namespace cpu_merge {

// The S-way merge of one query's sorted rows. Which shard wins an output is a coin flip, so each output waits on
// the one before: a chain of ~12 cycles (load the next head, then log2(S) compare-and-swaps), which is what costs.
// Two queries are merged at once, their steps interleaved in one loop (merge_sorted_queries in topk_merge_cpu.cpp),
// so that the core runs the two chains side by side.
//
// - Loser tree over the shard heads: emitting a candidate replays one leaf-to-root path, log2(S) compare-and-
//   swap steps done with conditional moves; the path's nodes follow from the shard alone, so their loads
//   start before the new head is known.
// - Blocks: each shard's row is read ahead in blocks of up to kBlock-1 candidates, converted once (sort key,
//   global id) into per-shard slots, padding dropped. A tree key is (sort key << bits | slot), so the winner
//   names its own slot: its id is at that slot and the shard's next head at slot + 1, one load away. Each
//   block ends with a marker: key 0 (ranks before everything, so it wins at once and the block is refilled)
//   while the row goes on, the all-ones key at its end (ranks after everything: when it wins, every row is
//   exhausted).
// - Equal keys leave in slot order; ties are reordered by id afterwards (rare; found by one pass over the row).
// - Rows are not checked here: rows_sorted ran on each query first.
// - The rows of the next queries are prefetched a few shards at a time while these merge: asking for all of
//   them at once overflows the core's outstanding-miss slots and most requests are dropped (measured). The
//   first block of a row is sized so that a refill, whose read was not prefetched, is rare.
// Per-thread state, reused across queries (no allocation per query).
template <typename scalar_t, bool Largest>
class SortedMerge {
  using Key = at::opmath_type<scalar_t>;  // float for fp16/bf16/fp32, double for fp64
  using KeyBits = std::conditional_t<sizeof(Key) == 4, uint32_t, uint64_t>;
  using TreeKey = std::conditional_t<sizeof(Key) == 4, uint64_t, Packed>;
  static constexpr int kSlotBits = 8 * sizeof(KeyBits);
  static constexpr int kBlockBits = 5;
  static constexpr int64_t kBlock = int64_t{1} << kBlockBits;  // slots per shard: candidates + the end marker
  static constexpr KeyBits kRefill = 0;
  static constexpr KeyBits kEnd = ~KeyBits{0};

 public:
  // Loser-tree depths up to 6 (S <= 64) have an unrolled replay; deeper trees take a loop.
  static constexpr int kRuntimeDepth = 0;

  // avx512: float32 rows take the AVX-512 passes (the caller checked the CPU: avx512::enabled()).
  SortedMerge(const std::vector<ShardRows<scalar_t>>& shards, int64_t total_width, int64_t k, bool dedup,
              bool avx512 = false)
      : shards_(shards),
        num_shards_(static_cast<int64_t>(shards.size())),
        avx512_(avx512),
        seen_(dedup ? total_width : 0) {
    leaves_ = 2;
    depth_ = 1;
    while (leaves_ < num_shards_) leaves_ *= 2, ++depth_;
    // Shard s owns slots [(leaves + s) * kBlock, (leaves + s + 1) * kBlock): a slot shifted right by
    // kBlockBits + 1 is then the loser-tree node above the shard's leaf (the lower half stays unused).
    // The losers live in that unused half, at keys_[node] (node in [1, leaves)): one pointer for both.
    keys_.assign(2 * leaves_ * kBlock, make_key(kEnd, 0));
    ids_.assign(2 * leaves_ * kBlock, -1);
    rows_.assign(num_shards_, Row{});
    winners_.assign(2 * leaves_, make_key(kEnd, 0));
    // The first block of a row: its share of k, m = ceil(k / S), plus about two standard deviations of the
    // share (~sqrt(m) for rows of similar distances), so that a refill (a cache miss on the critical path:
    // only first blocks are prefetched) stays rare: at S = 8, k = 100, 0.01 refills per query instead of 2.
    // With more shards than k (share < 1), most rows give nothing or their head: two candidates each (the
    // head and what follows it) keep the reads, and the lines touched, to what a heap merge reads.
    const int64_t share = (k + num_shards_ - 1) / num_shards_;
    int64_t spread = 1;
    while (spread * spread < share) ++spread;
    first_block_ = k < num_shards_ ? 2 : std::min<int64_t>(kBlock - 1, share + 2 * spread + 1);
    // Prefetches: every prefetch_spacing_ steps, the rows of prefetch_batch_ shards of the upcoming query, so
    // that all S are asked for within the k outputs.
    prefetch_spacing_ = std::max<int64_t>(1, std::min<int64_t>(8, k / num_shards_));
    prefetch_batch_ = std::max<int64_t>(1, (num_shards_ * prefetch_spacing_ + k - 1) / k);
  }

  int depth() const { return depth_; }

  bool avx512() const { return avx512_; }

  // One query in flight: the hot loop's state, a local of the caller so that it stays in registers (the output
  // stores could alias members otherwise). The root's loser lives in view.root rather than in keys_[1].
  struct View {
    TreeKey* keys;  // the slots' keys, and the loser tree's nodes below its root (keys[node])
    const int64_t* ids;
    int depth;
    TreeKey root;

    // Replays the leaf-to-root path of the shard that owns `slot` with its new head; returns the new winner.
    // Every step is a compare and two conditional moves: a branch here would mispredict half the time.
    template <int Depth>
    __attribute__((always_inline)) TreeKey replay(uint64_t slot, TreeKey candidate) {
      uint64_t node = slot >> (kBlockBits + 1);
      const int levels_below_root = (Depth == kRuntimeDepth ? depth : Depth) - 1;
#pragma GCC unroll 6
      for (int level = 0; level < levels_below_root; ++level) {
        const TreeKey loser = keys[node];
        const bool swap = loser < candidate;
        keys[node] = swap ? candidate : loser;
        candidate = swap ? loser : candidate;
        node >>= 1;
      }
      const bool swap = root < candidate;
      const TreeKey winner = swap ? root : candidate;
      root = swap ? candidate : root;
      return winner;
    }
  };
  struct Cursor {
    View view;
    TreeKey winner;
    int64_t count;  // candidates written
    int64_t limit;  // k, or the count when every row ran out
    scalar_t* out_distances;
    int64_t* out_ids;
  };

  // Loads query q's first blocks and plays the initial tournament; the cursor writes to out_*[0, k).
  // `upcoming` (or -1): the query whose rows prefetch() asks for while this one merges.
  Cursor begin(int64_t q, int64_t k, scalar_t* out_distances, int64_t* out_ids, InputErrorReport& errors,
               int64_t upcoming) {
    errors_ = &errors;
    failed_ = false;
    upcoming_ = upcoming;
    prefetched_ = upcoming >= 0 ? 0 : num_shards_;
    seen_.clear();
    TreeKey* winners = winners_.data();
    for (int64_t s = 0; s < leaves_; ++s) {
      if (s < num_shards_) {
        const ShardRows<scalar_t>& shard = shards_[s];
        rows_[s] = Row{shard.distances + q * shard.distance_row_stride, shard.ids + q * shard.id_row_stride, 0};
        fill(s, first_block_);
        winners[leaves_ + s] = keys_[first_slot(s)];
      } else {
        winners[leaves_ + s] = make_key(kEnd, 0);
      }
    }
    for (int64_t node = leaves_ - 1; node >= 1; --node) {
      const TreeKey a = winners[2 * node], b = winners[2 * node + 1];
      winners[node] = b < a ? b : a;
      keys_[node] = b < a ? a : b;  // the loser
    }
    const View view{keys_.data(), ids_.data(), depth_, keys_[1]};
    return Cursor{view, winners[1], 0, k, out_distances, out_ids};
  }

  static bool running(const Cursor& c) { return c.count < c.limit; }

  // One step of the merge: writes the winner (unless Dedup has seen its id) and replays its shard's next head,
  // or handles a block's end marker (the all-rows-exhausted one lowers the limit to the count, again at every
  // later step). Call while running(c).
  template <int Depth, bool Dedup>
  __attribute__((always_inline)) void step(Cursor& c) {
    const KeyBits key = key_of(c.winner);
    const uint64_t slot = slot_of(c.winner);
    if (__builtin_expect(static_cast<KeyBits>(key + 1) <= 1, 0)) {  // a block's end marker
      if (key == kEnd) {
        c.limit = c.count;
      } else {
        c.winner = c.view.template replay<Depth>(slot, refill(slot));
      }
      return;
    }
    if (!Dedup || seen_.insert(c.view.ids[slot])) {
      c.out_distances[c.count] = value_of(key);
      c.out_ids[c.count] = c.view.ids[slot];
      ++c.count;
    }
    c.winner = c.view.template replay<Depth>(slot, c.view.keys[slot + 1]);
  }

  // Asks for the rows of the next prefetch_batch_ shards of the upcoming query (nothing once all are asked for).
  void prefetch() {
    for (int64_t b = 0; b < prefetch_batch_ && prefetched_ < num_shards_; ++b) prefetch_shard(upcoming_, prefetched_++);
  }
  int64_t prefetch_spacing() const { return prefetch_spacing_; }

  // After the loop: takes the smallest ids of the tie group cut by k, orders ties by id, finishes the prefetches.
  // Returns the count written, or -1 on bad input (recorded in errors). The cursor comes by value: a reference
  // would make the caller keep its cursors in memory rather than registers, all through the loop (measured).
  template <int Depth, bool Dedup>
  int64_t finish(Cursor c) {
    while (prefetched_ < num_shards_) prefetch_shard(upcoming_, prefetched_++);
    const int64_t count = c.count;
    if (count > 0 && count == c.limit) {
      // Candidates tied with the k-th one may still follow, with smaller ids.
      while (key_of(c.winner) == kRefill) c.winner = c.view.template replay<Depth>(slot_of(c.winner), refill(slot_of(c.winner)));
      const KeyBits last = sort_key_of(c.out_distances[count - 1]);
      if (key_of(c.winner) == last) take_smallest_ids_of_boundary_ties<Depth, Dedup>(c, last);
    }
    if (failed_) return -1;
    if (has_equal_neighbours(c.out_distances, count)) {
      order_tie_groups<scalar_t, Largest>(c.out_distances, c.out_ids, count);
    }
    return count;
  }

 private:
  struct Row {
    const scalar_t* distances = nullptr;
    const int64_t* ids = nullptr;
    int64_t next = 0;  // first position not yet read into a block
  };

  static TreeKey make_key(KeyBits key, uint64_t slot) { return (static_cast<TreeKey>(key) << kSlotBits) | slot; }
  static KeyBits key_of(TreeKey t) { return static_cast<KeyBits>(t >> kSlotBits); }
  static uint64_t slot_of(TreeKey t) { return static_cast<uint32_t>(t); }
  uint64_t first_slot(int64_t s) const { return static_cast<uint64_t>(leaves_ + s) << kBlockBits; }
  int64_t shard_of(uint64_t slot) const { return static_cast<int64_t>(slot >> kBlockBits) - leaves_; }
  static KeyBits sort_key_of(scalar_t value) {
    return static_cast<KeyBits>(topk::sort_key<Largest>(static_cast<Key>(value)));
  }
  // The distance written out for a key: the input value, with NaN as the canonical NaN and -0 as +0.
  static scalar_t value_of(KeyBits key) { return static_cast<scalar_t>(topk::distance_of<Largest, Key>(key)); }

  // Asks for the cache lines of shard s's first block in query q. (The rest of the row's distances, which the
  // whole-row check reads, are sequential: the hardware's stream prefetch has them; asking for them too cost
  // more instructions than it saved, measured.)
  void prefetch_shard(int64_t q, int64_t s) const {
    const ShardRows<scalar_t>& shard = shards_[s];
    const int64_t n = std::min(first_block_, shard.width);
    if (n == 0) return;
    const char* d = reinterpret_cast<const char*>(shard.distances + q * shard.distance_row_stride);
    const char* i = reinterpret_cast<const char*>(shard.ids + q * shard.id_row_stride);
    const int64_t distance_bytes = n * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t b = 0; b < distance_bytes; b += 64) prefetch_line(d + b);
    prefetch_line(d + distance_bytes - 1);
    for (int64_t b = 0; b < n * 8; b += 64) prefetch_line(i + b);
    prefetch_line(i + n * 8 - 1);
  }

  // Tree keys of distances[0, n) into keys (slots from `base`), four at a time with SSE2 for float32 (the
  // common case; the scalar loop does not vectorize: it widens 32-bit keys into 64-bit tree keys). Returns
  // how many it wrote, a multiple of 4; the caller converts the rest. Same keys as sort_key_of + make_key.
  static int64_t tree_keys_simd(const scalar_t* distances, TreeKey* keys, uint64_t base, int64_t n) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      const __m128i sign = _mm_set1_epi32(static_cast<int>(0x80000000u));
      const __m128i nan_key = _mm_set1_epi32(static_cast<int>(topk::kNanKey32));
      const __m128i four = _mm_set1_epi32(4);
      __m128i slots = _mm_add_epi32(_mm_set1_epi32(static_cast<int>(base)), _mm_setr_epi32(0, 1, 2, 3));
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const __m128 d = _mm_loadu_ps(distances + j);
        const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(d, d));
        const __m128 value = _mm_add_ps(Largest ? _mm_xor_ps(d, _mm_castsi128_ps(sign)) : d, _mm_setzero_ps());
        const __m128i bits = _mm_castps_si128(value);
        __m128i key = _mm_xor_si128(bits, _mm_or_si128(_mm_srai_epi32(bits, 31), sign));
        key = _mm_or_si128(_mm_andnot_si128(nan, key), _mm_and_si128(nan, nan_key));
        // Little-endian 64-bit tree keys: the slot in the low half, the sort key in the high half.
        _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + j), _mm_unpacklo_epi32(slots, key));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + j + 2), _mm_unpackhi_epi32(slots, key));
        slots = _mm_add_epi32(slots, four);
      }
      return j;
    }
#endif
    (void)distances, (void)keys, (void)base, (void)n;
    return 0;
  }

  // Reads the next block of shard s's row (up to `len` positions), drops padding, translates ids.
  void fill(int64_t s, int64_t len) {
    const ShardRows<scalar_t>& shard = shards_[s];
    Row& row = rows_[s];
    const int64_t n = std::min(len, shard.width - row.next);
    const scalar_t* distances = row.distances + row.next;
    const int64_t* ids = row.ids + row.next;
    const uint64_t base = first_slot(s);
    TreeKey* keys = keys_.data() + base;
    int64_t* out_ids = ids_.data() + base;
    // Ids that translate into [0, INT64_MAX]: [low, high] (see topk::translate_id). translate() adds the offset
    // without a branch and notes an id outside them (reported after the block).
    const int64_t offset = shard.offset;
    const int64_t low = offset < 0 ? -offset : 0;
    const int64_t high = offset >= 0 ? std::numeric_limits<int64_t>::max() - offset
                                     : std::numeric_limits<int64_t>::max();
    bool out_of_range = false;
    const auto translate = [&](int64_t id) {
      out_of_range |= (id < low) | (id > high);
      return static_cast<int64_t>(static_cast<uint64_t>(id) + static_cast<uint64_t>(offset));
    };
    // Copy the ids while looking for padding (a negative id: the OR of all has its sign bit set): with none and
    // offset 0, the copy is all.
    int64_t any_negative = 0;
    int64_t copied = 0;
#if defined(KARMA_HAS_AVX512_PASSES)
    if (avx512_) {
      any_negative = avx512::copy_ids(ids, out_ids, n) ? -1 : 0;
      copied = n;
    }
#endif
#if defined(__SSE2__)
    if (copied == 0) {
      __m128i sign_bits = _mm_setzero_si128();
      for (; copied + 2 <= n; copied += 2) {
        const __m128i pair = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ids + copied));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out_ids + copied), pair);
        sign_bits = _mm_or_si128(sign_bits, pair);
      }
      any_negative = _mm_cvtsi128_si64(sign_bits) | _mm_cvtsi128_si64(_mm_unpackhi_epi64(sign_bits, sign_bits));
    }
#endif
    for (; copied < n; ++copied) {
      out_ids[copied] = ids[copied];
      any_negative |= ids[copied];
    }
    int64_t count = n;
    if (any_negative >= 0) {  // no padding: straight loops
      int64_t done = 0;
#if defined(KARMA_HAS_AVX512_PASSES)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (avx512_) {
          avx512::tree_keys<Largest>(distances, keys, static_cast<uint32_t>(base), n);
          done = n;
        }
      }
#endif
      if (done == 0) done = tree_keys_simd(distances, keys, base, n);
      for (int64_t j = done; j < n; ++j) keys[j] = make_key(sort_key_of(distances[j]), base + j);
      if (offset != 0) {
        for (int64_t j = 0; j < n; ++j) out_ids[j] = translate(ids[j]);
      }
    } else {
      count = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (ids[j] < 0) continue;
        keys[count] = make_key(sort_key_of(distances[j]), base + count);
        out_ids[count] = translate(ids[j]);
        ++count;
      }
    }
    row.next += n;
    keys[count] = make_key(row.next < shard.width ? kRefill : kEnd, base + count);
    if (__builtin_expect(out_of_range, 0)) {
      for (int64_t j = 0; j < n; ++j) {
        int64_t global;
        if (ids[j] >= 0 && !topk::translate_id(ids[j], offset, &global)) {
          errors_->record_overflow(s, ids[j], offset);
          break;
        }
      }
      failed_ = true;
    }
  }

  // The end marker at slot won: reads the shard's next block; returns its new head (the caller replays it).
  __attribute__((noinline)) TreeKey refill(uint64_t slot) {
    const int64_t s = shard_of(slot);
    fill(s, kBlock - 1);
    return keys_[first_slot(s)];
  }

  // The output is full and the next winner ties with the k-th key: gather the whole boundary tie group (the
  // written tail with that key and every later candidate with it) and keep its smallest ids.
  template <int Depth, bool Dedup>
  void take_smallest_ids_of_boundary_ties(Cursor& c, KeyBits key) {
    const int64_t k = c.count;
    int64_t group_start = k - 1;
    while (group_start > 0 && sort_key_of(c.out_distances[group_start - 1]) == key) --group_start;
    tie_ids_.assign(c.out_ids + group_start, c.out_ids + k);
    while (!failed_) {
      const KeyBits head = key_of(c.winner);
      const uint64_t slot = slot_of(c.winner);
      if (head == kRefill) {
        c.winner = c.view.template replay<Depth>(slot, refill(slot));
        continue;
      }
      if (head != key) break;
      if (!Dedup || seen_.insert(ids_[slot])) tie_ids_.push_back(ids_[slot]);
      c.winner = c.view.template replay<Depth>(slot, keys_[slot + 1]);
    }
    std::partial_sort(tie_ids_.begin(), tie_ids_.begin() + (k - group_start), tie_ids_.end());
    std::copy(tie_ids_.begin(), tie_ids_.begin() + (k - group_start), c.out_ids + group_start);
  }

  const std::vector<ShardRows<scalar_t>>& shards_;
  int64_t num_shards_;
  bool avx512_;  // float32 rows: the AVX-512 passes
  int64_t leaves_;
  int depth_;
  int64_t first_block_;
  int64_t prefetch_spacing_;  // steps between two rounds of shard prefetches
  int64_t prefetch_batch_;    // shards per round
  std::vector<TreeKey> keys_;     // per shard: kBlock slots; below the first: the losers (keys_[node], node in
                                  // [1, leaves); the merge loop keeps node 1's in its View)
  std::vector<int64_t> ids_;      // global ids, by slot
  std::vector<Row> rows_;
  std::vector<TreeKey> winners_;  // scratch for the initial tournament
  std::vector<int64_t> tie_ids_;
  IdSet seen_;
  InputErrorReport* errors_ = nullptr;
  bool failed_ = false;
  int64_t upcoming_ = -1;   // the query whose rows are prefetched during this one
  int64_t prefetched_ = 0;  // its shards prefetched so far
};

}  // namespace cpu_merge
}  // namespace karma
