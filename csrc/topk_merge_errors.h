// Bad input found inside a parallel region (no throwing there) and the error it raises afterwards: shared by the
// CPU merge (topk_merge_cpu.cpp) and the host build of the GPU merge (topk_merge_warp_host.cpp), whose
// record_* calls stand where the kernel has its device-side asserts.
#pragma once

#include <torch/types.h>

#include <atomic>
#include <cstdint>

namespace karma {

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

// Raises the recorded error (ValueError with the op's message), if any.
inline void raise_input_error(const InputErrorReport& errors, bool largest) {
  if (!errors.failed.load()) return;
  TORCH_CHECK_VALUE(errors.kind != InputErrorReport::kUnsorted, "topk_merge: row ", errors.query,
                    " of distances[", errors.shard, "] is not sorted best-first (",
                    largest ? "descending" : "ascending", ", NaN last); pass sorted=False for unsorted rows");
  TORCH_CHECK_VALUE(false, "topk_merge: id_offsets[", errors.shard, "] = ", errors.offset,
                    " translates local id ", errors.local_id,
                    " out of the int64 range [0, 2^63-1] (an error, never a wrap)");
}

}  // namespace karma
