// karma::topk_merge: schema and CPU implementation (parallel over queries with at::parallel_for, which is
// OpenMP in torch's CPU builds and follows torch.set_num_threads).
//
// Inputs are S per-shard rows: distances[s] (Q, k_s) and ids[s] (Q, k_s) int64, k_s may differ per shard, so a
// list of unequal shards is never padded or stacked (no copy of the candidates). Each query is independent,
// so results do not depend on the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "topk_merge.h"
#include "topk_merge_errors.h"

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

// A candidate as one 128-bit integer (key high, id low): the total order is the integer order, one compare.
using Packed = unsigned __int128;

inline Packed pack(uint64_t key, int64_t id) { return (static_cast<Packed>(key) << 64) | static_cast<uint64_t>(id); }
inline Candidate unpack(Packed p) { return Candidate{static_cast<uint64_t>(p >> 64), static_cast<int64_t>(p)}; }

// The S-way merge of one query's sorted rows, built for a short dependency chain per output: which shard wins
// is a coin flip, so each step waits on the one before, and the chain is what costs.
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
// - Equal keys leave in slot order; ties are reordered by id afterwards (rare).
// - The rows of a later query are prefetched a few shards at a time while this one merges: asking for all of
//   them at once overflows the core's outstanding-miss slots and most requests are dropped (measured). The
//   first block of a row is sized so that a refill, whose read was not prefetched, is rare.
// Measured at S=8, Q=20000, k=100 (float32, 2 shared cores): ~0.9 us per query per core, 4x faiss's
// merge_knn_results; about a fifth of it memory stalls, the rest this chain (~15 cycles per output) and the
// block conversions. Per-thread state, reused across queries.
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

  SortedMerge(const std::vector<ShardRows<scalar_t>>& shards, int64_t total_width, int64_t k, bool dedup)
      : shards_(shards), num_shards_(static_cast<int64_t>(shards.size())), seen_(dedup ? total_width : 0) {
    leaves_ = 2;
    depth_ = 1;
    while (leaves_ < num_shards_) leaves_ *= 2, ++depth_;
    // Shard s owns slots [(leaves + s) * kBlock, (leaves + s + 1) * kBlock): a slot shifted right by
    // kBlockBits + 1 is then the loser-tree node above the shard's leaf (the lower half stays unused).
    keys_.assign(2 * leaves_ * kBlock, make_key(kEnd, 0));
    ids_.assign(2 * leaves_ * kBlock, -1);
    rows_.assign(num_shards_, Row{});
    losers_.assign(leaves_, make_key(kEnd, 0));
    winners_.assign(2 * leaves_, make_key(kEnd, 0));
    last_read_.assign(num_shards_, 1);
    // The first block of a row: its share of k, m = ceil(k / S), plus about two standard deviations of the
    // share (~sqrt(m) for rows of similar distances), so that a refill (a cache miss on the critical path:
    // only first blocks are prefetched) stays rare: at S = 8, k = 100, 0.01 refills per query instead of 2.
    // With more shards than k (share < 1), most rows give nothing or their head: two candidates each (the
    // head and what follows it) keep the reads, and the lines touched, to what a heap merge reads.
    const int64_t share = (k + num_shards_ - 1) / num_shards_;
    int64_t spread = 1;
    while (spread * spread < share) ++spread;
    first_block_ = k < num_shards_ ? 2 : std::min<int64_t>(kBlock - 1, share + 2 * spread + 1);
    // Prefetches: every prefetch_spacing_ outputs, the rows of prefetch_batch_ shards of the upcoming query,
    // so that all S are asked for within the k outputs.
    prefetch_spacing_ = std::max<int64_t>(1, std::min<int64_t>(8, k / num_shards_));
    prefetch_batch_ = std::max<int64_t>(1, (num_shards_ * prefetch_spacing_ + k - 1) / k);
  }

  int depth() const { return depth_; }

  // Writes query q's best candidates to out_distances/out_ids[0, count) (ties ordered by id) and returns the
  // count, or -1 on bad input (recorded in errors). Prefetches the rows of query `upcoming` (if >= 0).
  template <int Depth, bool Dedup>
  int64_t run(int64_t q, int64_t k, scalar_t* __restrict out_distances, int64_t* __restrict out_ids,
              InputErrorReport& errors, int64_t upcoming) {
    errors_ = &errors;
    failed_ = false;
    unsorted_shard_ = -1;
    query_ = q;
    upcoming_ = upcoming;
    prefetched_ = upcoming >= 0 ? 0 : num_shards_;
    TreeKey winner = start(q);
    if (Dedup) seen_.clear();
    // The hot loop reads the state through a local view (the output stores could alias members otherwise),
    // which also keeps the root's loser in a register.
    View view = this->view();
    int64_t count = 0;
    KeyBits last = 0;  // key of the last candidate written
    bool tied = false;
    bool exhausted = false;
    while (!exhausted && count < k) {
      // Outputs in chunks, shards of the upcoming query prefetched between two chunks.
      const int64_t chunk_end = prefetched_ < num_shards_ ? std::min(k, count + prefetch_spacing_) : k;
      while (count < chunk_end) {
        const KeyBits key = key_of(winner);
        const uint64_t slot = slot_of(winner);
        if (__builtin_expect(static_cast<KeyBits>(key + 1) <= 1, 0)) {  // a block's end marker
          if (key == kEnd) {
            exhausted = true;
            break;
          }
          winner = view.template replay<Depth>(slot, refill(slot));
          continue;
        }
        if (!Dedup || seen_.insert(view.ids[slot])) {
          out_distances[count] = value_of(key);
          out_ids[count] = view.ids[slot];
          ++count;
          if (__builtin_expect(key == last, 0)) tied = true;
          last = key;
        }
        winner = view.template advance<Depth>(slot, key, unsorted_shard_);
      }
      for (int64_t b = 0; b < prefetch_batch_ && prefetched_ < num_shards_; ++b) prefetch_shard(upcoming_, prefetched_++);
    }
    while (prefetched_ < num_shards_) prefetch_shard(upcoming_, prefetched_++);
    if (count == k) {
      // Candidates tied with the k-th one may still follow, with smaller ids.
      while (key_of(winner) == kRefill) {
        winner = view.template replay<Depth>(slot_of(winner), refill(slot_of(winner)));
      }
      if (key_of(winner) == last) {
        take_smallest_ids_of_boundary_ties<Depth, Dedup>(view, k, last, winner, out_distances, out_ids);
        tied = true;
      }
    }
    if (unsorted_shard_ >= 0) record_unsorted(unsorted_shard_);
    if (failed_) return -1;
    if (tied) order_tie_groups(out_distances, out_ids, count);
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
  static int64_t shard_of(uint64_t slot, int64_t leaves) { return static_cast<int64_t>(slot >> kBlockBits) - leaves; }
  static KeyBits sort_key_of(scalar_t value) {
    return static_cast<KeyBits>(topk::sort_key<Largest>(static_cast<Key>(value)));
  }
  // The distance written out for a key: the input value, with NaN as the canonical NaN and -0 as +0.
  static scalar_t value_of(KeyBits key) { return static_cast<scalar_t>(topk::distance_of<Largest, Key>(key)); }
  // True when a head ranks before the candidate it follows in its row. A marker never does: its key - 1 wraps
  // to the largest value.
  static bool out_of_order(KeyBits next, KeyBits previous) {
    return static_cast<KeyBits>(next - 1) < static_cast<KeyBits>(previous - 1);
  }

  // Asks for the cache lines of shard s's first block in query q.
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
    // Copy the ids while looking for padding (a negative id): with none and offset 0, the copy is all.
    int64_t any_negative = 0;
    for (int64_t j = 0; j < n; ++j) {
      out_ids[j] = ids[j];
      any_negative |= ids[j];
    }
    int64_t count = n;
    if (any_negative >= 0) {  // no padding: straight loops
      const int64_t done = tree_keys_simd(distances, keys, base, n);
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

  // Loads query q's first blocks and plays the initial tournament; returns the winner.
  TreeKey start(int64_t q) {
    TreeKey* winners = winners_.data();
    for (int64_t s = 0; s < leaves_; ++s) {
      if (s < num_shards_) {
        const ShardRows<scalar_t>& shard = shards_[s];
        rows_[s] = Row{shard.distances + q * shard.distance_row_stride, shard.ids + q * shard.id_row_stride, 0};
        last_read_[s] = 1;
        fill(s, first_block_);
        winners[leaves_ + s] = keys_[first_slot(s)];
      } else {
        winners[leaves_ + s] = make_key(kEnd, 0);
      }
    }
    for (int64_t node = leaves_ - 1; node >= 1; --node) {
      const TreeKey a = winners[2 * node], b = winners[2 * node + 1];
      winners[node] = b < a ? b : a;
      losers_[node] = b < a ? a : b;
    }
    return winners[1];
  }

  // Raw views of the merge state, for the hot loop; the root's loser lives here rather than in losers_[1].
  struct View {
    const TreeKey* keys;
    const int64_t* ids;
    TreeKey* losers;
    uint64_t leaves;
    int depth;
    TreeKey root;

    // Replays the leaf-to-root path of the shard that owns `slot` with its new head; returns the new winner.
    // Every step is a compare and two conditional moves: a branch here would mispredict half the time.
    template <int Depth>
    TreeKey replay(uint64_t slot, TreeKey candidate) {
      uint64_t node = slot >> (kBlockBits + 1);
      const int levels_below_root = (Depth == kRuntimeDepth ? depth : Depth) - 1;
#pragma GCC unroll 6
      for (int level = 0; level < levels_below_root; ++level) {
        const TreeKey loser = losers[node];
        const bool swap = loser < candidate;
        losers[node] = swap ? candidate : loser;
        candidate = swap ? loser : candidate;
        node >>= 1;
      }
      const bool swap = root < candidate;
      const TreeKey winner = swap ? root : candidate;
      root = swap ? candidate : root;
      return winner;
    }

    // The candidate at slot (key `key`) left: its shard's next head is at slot + 1. A head that ranks before
    // the candidate it follows names its shard in unsorted_shard.
    template <int Depth>
    TreeKey advance(uint64_t slot, KeyBits key, int64_t& unsorted_shard) {
      const TreeKey next = keys[slot + 1];
      if (__builtin_expect(out_of_order(key_of(next), key), 0)) unsorted_shard = shard_of(slot, leaves);
      return replay<Depth>(slot, next);
    }
  };
  View view() {
    return View{keys_.data(), ids_.data(), losers_.data(), static_cast<uint64_t>(leaves_), depth_, losers_[1]};
  }

  // The end marker at slot won: reads the shard's next block; returns its new head (the caller replays it).
  TreeKey refill(uint64_t slot) {
    const int64_t s = shard_of(slot, leaves_);
    if ((slot & (kBlock - 1)) != 0) last_read_[s] = key_of(keys_[slot - 1]);
    fill(s, kBlock - 1);
    const TreeKey head = keys_[first_slot(s)];
    if (__builtin_expect(out_of_order(key_of(head), last_read_[s]), 0)) record_unsorted(s);
    return head;
  }

  void record_unsorted(int64_t s) {
    errors_->record_unsorted(s, query_);
    failed_ = true;
  }

  // The output is full and the next winner ties with the k-th key: gather the whole boundary tie group (the
  // written tail with that key and every later candidate with it) and keep its smallest ids.
  template <int Depth, bool Dedup>
  void take_smallest_ids_of_boundary_ties(View view, int64_t k, KeyBits key, TreeKey winner,
                                          const scalar_t* out_distances, int64_t* out_ids) {
    int64_t group_start = k - 1;
    while (group_start > 0 && sort_key_of(out_distances[group_start - 1]) == key) --group_start;
    tie_ids_.assign(out_ids + group_start, out_ids + k);
    while (!failed_) {
      const KeyBits head = key_of(winner);
      const uint64_t slot = slot_of(winner);
      if (head == kRefill) {
        winner = view.template replay<Depth>(slot, refill(slot));
        continue;
      }
      if (head != key) break;
      if (!Dedup || seen_.insert(ids_[slot])) tie_ids_.push_back(ids_[slot]);
      winner = view.template advance<Depth>(slot, head, unsorted_shard_);
    }
    std::partial_sort(tie_ids_.begin(), tie_ids_.begin() + (k - group_start), tie_ids_.end());
    std::copy(tie_ids_.begin(), tie_ids_.begin() + (k - group_start), out_ids + group_start);
  }

  // Sorts the ids of each run of equal keys (the written row is already in key order; a run's distances are
  // all the same value).
  static void order_tie_groups(const scalar_t* out_distances, int64_t* out_ids, int64_t count) {
    int64_t start = 0;
    while (start < count) {
      const KeyBits key = sort_key_of(out_distances[start]);
      int64_t end = start + 1;
      while (end < count && sort_key_of(out_distances[end]) == key) ++end;
      std::sort(out_ids + start, out_ids + end);
      start = end;
    }
  }

  const std::vector<ShardRows<scalar_t>>& shards_;
  int64_t num_shards_;
  int64_t leaves_;
  int depth_;
  int64_t first_block_;
  int64_t prefetch_spacing_;  // outputs between two rounds of shard prefetches
  int64_t prefetch_batch_;    // shards per round
  std::vector<TreeKey> keys_;     // per shard: kBlock slots
  std::vector<int64_t> ids_;      // global ids, by slot
  std::vector<Row> rows_;
  std::vector<TreeKey> losers_;   // losers_[node], node in [1, leaves); the merge loop keeps node 1 in its View
  std::vector<TreeKey> winners_;  // scratch for the initial tournament
  std::vector<KeyBits> last_read_;  // key of the last candidate of the shard's previous block
  std::vector<int64_t> tie_ids_;
  IdSet seen_;
  InputErrorReport* errors_ = nullptr;
  bool failed_ = false;
  int64_t unsorted_shard_ = -1;  // a shard whose row was read out of order in this query
  int64_t query_ = 0;
  int64_t upcoming_ = -1;        // the query whose rows are prefetched during this one
  int64_t prefetched_ = 0;       // its shards prefetched so far
};

// The small merge (k and S small, no dedup): the serving case, one query with k = 10 per call. Each output scans
// the S shard heads' keys for the best: no tree and no blocks to set up, so a
// query costs about what it reads, ~k + S candidates, where the loser tree's setup would dominate. The stream
// goes into topk::TopKCollector (which keeps the smallest ids of the tie group cut by k); order_ties then sorts
// ids within ties. Checks what the loser tree checks: ids as they are read, and each head against the one it
// follows. Writes up to k candidates to `out` and returns their count, or -1 on bad input (recorded in errors).
constexpr int64_t kSmallMergeMaxK = 32;
constexpr int64_t kSmallMergeMaxShards = 16;

template <typename scalar_t, bool Largest>
int64_t small_merge(const std::vector<ShardRows<scalar_t>>& shards, int64_t q, int64_t k, Candidate* out,
                    InputErrorReport& errors) {
  using Key = at::opmath_type<scalar_t>;
  constexpr uint64_t kExhausted = ~uint64_t{0};  // after every key (NaN's included)
  const int64_t num_shards = static_cast<int64_t>(shards.size());
  // The collector orders ties by id itself, so the heads compare by key alone.
  uint64_t head_keys[kSmallMergeMaxShards];
  int64_t head_ids[kSmallMergeMaxShards];
  int64_t positions[kSmallMergeMaxShards];
  bool failed = false;
  // Makes shard s's head its next real candidate at or after pos.
  const auto read = [&](int64_t s, int64_t pos) {
    const ShardRows<scalar_t>& shard = shards[s];
    const int64_t* ids = shard.ids + q * shard.id_row_stride;
    while (pos < shard.width && ids[pos] < 0) ++pos;
    positions[s] = pos;
    head_keys[s] = kExhausted;
    if (pos == shard.width) return;
    if (!topk::translate_id(ids[pos], shard.offset, &head_ids[s])) {
      errors.record_overflow(s, ids[pos], shard.offset);
      failed = true;
      return;
    }
    head_keys[s] = topk::sort_key<Largest>(static_cast<Key>(shard.distances[q * shard.distance_row_stride + pos]));
  };
  for (int64_t s = 0; s < num_shards; ++s) read(s, 0);
  topk::TopKCollector collector(out, k);
  while (!failed) {
    int64_t best = 0;
    for (int64_t s = 1; s < num_shards; ++s) best = head_keys[s] < head_keys[best] ? s : best;
    const uint64_t key = head_keys[best];
    if (key == kExhausted || !collector.offer(Candidate{key, head_ids[best]})) break;
    read(best, positions[best] + 1);
    if (head_keys[best] < key) {  // a row out of order (an exhausted row's head never is)
      errors.record_unsorted(best, q);
      return -1;
    }
  }
  if (failed) return -1;
  topk::order_ties(out, collector.count);
  return collector.count;
}

// sorted=True's contract checked over the whole row, not only the candidates the merge reads: every real
// candidate of row q of a shard against the real candidate before it (padding, wherever it sits, skipped), so a
// row out of order anywhere raises instead of giving a wrong top-k. A first pass reads the distances alone: a row
// sorted including its padding (faiss's rows: padding at the end) passes there; only a row that fails it is
// read again with its ids.
template <typename scalar_t, bool Largest>
bool row_sorted(const ShardRows<scalar_t>& shard, int64_t q) {
  using Key = at::opmath_type<scalar_t>;
  const scalar_t* distances = shard.distances + q * shard.distance_row_stride;
  // Plain comparisons, no branch: the compiler vectorises this pass. A NaN compares false, so a row holding one
  // takes the exact pass below (NaN last is sorted there).
  int monotone = 1;
  for (int64_t j = 1; j < shard.width; ++j) {
    const Key before = static_cast<Key>(distances[j - 1]), here = static_cast<Key>(distances[j]);
    monotone &= static_cast<int>(Largest ? here <= before : here >= before);
  }
  if (monotone) return true;
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

// Records the first shard whose row q is out of order; false then.
template <typename scalar_t, bool Largest>
bool rows_sorted(const std::vector<ShardRows<scalar_t>>& shards, int64_t q, InputErrorReport& errors) {
  for (size_t s = 0; s < shards.size(); ++s) {
    if (__builtin_expect(!row_sorted<scalar_t, Largest>(shards[s], q), 0)) {
      errors.record_unsorted(static_cast<int64_t>(s), q);
      return false;
    }
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
  // Queries per thread at least: waking an OpenMP team costs tens of microseconds (far more on a loaded
  // machine), so a small merge runs on the calling thread. Work per query: ~k + S reads (merge) or all S * k_s.
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
        visit(pack(topk::sort_key<Largest>(static_cast<Key>(row_distances[j])), id));
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

  if (sorted && !dedup && k <= kSmallMergeMaxK && num_shards <= kSmallMergeMaxShards) {
    at::parallel_for(0, num_queries, grain, [&](int64_t begin, int64_t end) {
      std::vector<Candidate> buffer(k);
      for (int64_t q = begin; q < end && !errors.failed.load(std::memory_order_relaxed); ++q) {
        if (!rows_sorted<scalar_t, Largest>(shards, q, errors)) return;
        const int64_t count = small_merge<scalar_t, Largest>(shards, q, k, buffer.data(), errors);
        if (count < 0) return;
        for (int64_t j = 0; j < count; ++j) {
          out_distances[q * k + j] = static_cast<scalar_t>(topk::distance_of<Largest, Key>(buffer[j].key));
          out_ids[q * k + j] = buffer[j].id;
        }
        pad_row(q, count);
      }
    });
    return;
  }

  if (sorted) {
    // Slots are 32-bit: (leaves + s) * kBlock must fit (checked here: nothing may throw inside the parallel region).
    TORCH_CHECK_VALUE(num_shards <= (int64_t{1} << 24), "topk_merge: sorted=True merges at most 2^24 shards per ",
                      "call, got ", num_shards, "; merge them in groups or pass sorted=False");
    at::parallel_for(0, num_queries, grain, [&](int64_t begin, int64_t end) {
      SortedMerge<scalar_t, Largest> merge(shards, total_width, k, dedup);
      // The S-way merge, with the tree depth as a compile-time constant where it is small.
      const auto merge_rows = [&](auto depth, auto dedup_rows) {
        constexpr int kDepth = decltype(depth)::value;
        constexpr bool kDedup = decltype(dedup_rows)::value;
        // The rows of the query this many ahead are prefetched while a query merges.
        constexpr int64_t kPrefetchAhead = 2;
        for (int64_t q = begin; q < end && !errors.failed.load(std::memory_order_relaxed); ++q) {
          if (!rows_sorted<scalar_t, Largest>(shards, q, errors)) return;
          const int64_t upcoming = q + kPrefetchAhead < end ? q + kPrefetchAhead : -1;
          const int64_t count =
              merge.template run<kDepth, kDedup>(q, k, out_distances + q * k, out_ids + q * k, errors, upcoming);
          if (count < 0) return;
          pad_row(q, count);
        }
      };
      using Runtime = std::integral_constant<int, SortedMerge<scalar_t, Largest>::kRuntimeDepth>;
      if (dedup) {
        merge_rows(Runtime{}, std::true_type{});
      } else {
        switch (merge.depth()) {
          case 1: merge_rows(std::integral_constant<int, 1>{}, std::false_type{}); break;
          case 2: merge_rows(std::integral_constant<int, 2>{}, std::false_type{}); break;
          case 3: merge_rows(std::integral_constant<int, 3>{}, std::false_type{}); break;
          case 4: merge_rows(std::integral_constant<int, 4>{}, std::false_type{}); break;
          case 5: merge_rows(std::integral_constant<int, 5>{}, std::false_type{}); break;
          case 6: merge_rows(std::integral_constant<int, 6>{}, std::false_type{}); break;
          default: merge_rows(Runtime{}, std::false_type{}); break;
        }
      }
    });
    return;
  }

  at::parallel_for(0, num_queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<Packed> buffer;
    for (int64_t q = begin; q < end && !errors.failed.load(std::memory_order_relaxed); ++q) {
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
        const Candidate c = unpack(buffer[j]);
        out_distances[q * k + j] = static_cast<scalar_t>(topk::distance_of<Largest, Key>(c.key));
        out_ids[q * k + j] = c.id;
      }
      pad_row(q, count);
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
