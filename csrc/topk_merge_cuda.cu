// CUDA kernel of karma::topk_merge: one warp per query runs the warp merge of topk_merge_warp.h (the same source
// the host build runs in CI). Plain CUDA (no torch headers, which do not compile with every CUDA toolkit); the
// torch-facing binding in topk_merge_cuda_binding.cpp fills KarmaTopkParams and calls the C-ABI launcher below.
//
// The shard table is the kernel's parameter (__grid_constant__: read in place from the constant bank, never
// copied to local memory), the working set is the warp's slice of dynamic shared memory, the output is written
// once. Bad input (an id offset overflowing int64, a row out of order under sorted=True) stops the kernel with a
// device-side assert: no flag to copy back and no host sync on the happy path; the error surfaces at the next
// synchronising call, as with torch's own device-side index checks.
#include <assert.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "topk_merge_cuda.h"
#include "topk_merge_warp.h"

namespace karma {
namespace topk {
namespace warp_merge {
namespace {

// At most 8 warps (queries) per block; at least one block per SM: ptxas may then use up to 255 registers a thread
// (without the minimum it capped the fp32 kernel at 64 and spilled).
constexpr int kMaxWarpsPerBlock = 8;

// The merge records an error and goes on (its result is then unused); the kernel asserts once, at its end: an
// assert is a function call, and a call inside the merge would make registers live across it spill.
struct DeviceErrors {
  const char* message = nullptr;
  __device__ void record_overflow(int32_t, int64_t, int64_t) {
    message = "topk_merge: id_offsets translate a local id out of the int64 range [0, 2^63-1]";
  }
  __device__ void record_unsorted(int32_t, int64_t) {
    message = "topk_merge: a row is not sorted best-first; pass sorted=False for unsorted rows";
  }
};

template <typename F, bool Largest>
__global__ void __launch_bounds__(kLanes * kMaxWarpsPerBlock, 1)
    topk_merge_warp_kernel(const __grid_constant__ KarmaTopkParams params, int32_t shared_bytes_per_warp) {
  extern __shared__ __align__(16) char shared[];
  const int warp_in_block = static_cast<int>(threadIdx.x) / kLanes;
  const int64_t query = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + warp_in_block;
  if (query >= params.num_queries) return;  // whole warps only
  DeviceErrors errors;
  merge_query<F, Largest>(params, query, shared + static_cast<int64_t>(warp_in_block) * shared_bytes_per_warp,
                          errors);
  if (errors.message != nullptr) __assert_fail(errors.message, __FILE__, __LINE__, __func__);
}

template <typename F, bool Largest>
cudaError_t launch(const KarmaTopkParams& params, cudaStream_t stream) {
  const Layout layout(params.total_width, params.k, sizeof(typename F::Bits));
  if (layout.bytes > kMaxSharedBytesPerWarp) return cudaErrorInvalidValue;
  // As many warps (queries) per block as fit in 48 KiB, at least one; beyond 48 KiB the kernel opts in.
  int64_t warps = (48 * 1024) / layout.bytes;
  warps = warps < 1 ? 1 : (warps > kMaxWarpsPerBlock ? kMaxWarpsPerBlock : warps);
  const int64_t shared_bytes = warps * layout.bytes;
  const auto kernel = topk_merge_warp_kernel<F, Largest>;
  if (shared_bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (status != cudaSuccess) return status;
  }
  const int64_t blocks = (params.num_queries + warps - 1) / warps;
  kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(warps * kLanes), static_cast<size_t>(shared_bytes),
           stream>>>(params, static_cast<int32_t>(layout.bytes));
  return cudaGetLastError();
}

}  // namespace
}  // namespace warp_merge
}  // namespace topk
}  // namespace karma

extern "C" int karma_topk_merge_cuda(const KarmaTopkParams* params, void* stream) {
  using namespace karma::topk::warp_merge;
  if (params->num_shards < 1 || params->num_shards > KARMA_TOPK_MAX_SHARDS || params->k < 1 ||
      params->total_width < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (params->num_queries == 0) return static_cast<int>(cudaSuccess);
  cudaError_t status = cudaErrorInvalidValue;
  dispatch(params->dtype, params->largest != 0, [&](auto format, auto largest) {
    status = launch<decltype(format), decltype(largest)::value>(*params, static_cast<cudaStream_t>(stream));
  });
  return static_cast<int>(status);
}
