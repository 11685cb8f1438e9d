// Fused kernels for the router's CUDA path, behind a plain C ABI (loaded with ctypes by
// service/router/kernels.py). Every function takes device pointers and a cudaStream_t and only
// enqueues work on that stream, so callers can capture it in a CUDA graph. Each returns a
// cudaError_t (0 = success) from the launch.
//
// Torch references (the CPU path and the tests' oracle): service/router/pooling.py.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

// Only the C ABI below is exported (the library is built with hidden visibility).
#define ROUTER_API __attribute__((visibility("default")))

namespace {

constexpr int kAbiVersion = 1;
constexpr int kWarp = 32;
constexpr int kPoolThreads = 128;
constexpr int kScoreThreads = 256;
constexpr int kMaxTopK = 32;  // the router reports a handful of clusters; a larger k is rejected
constexpr float kNormEps = 1e-12f;  // torch.nn.functional.normalize's default eps

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// One block per sequence: out[b] = normalize(sum_{l: mask[b,l]} x[b,l] / max(1, count_b)).
// The row is kept in shared memory between the two passes, so x is read once.
template <typename T>
__global__ void mean_pool_l2norm_kernel(const T* __restrict__ hidden, const uint8_t* __restrict__ mask, int seq,
                                        int dim, float* __restrict__ out) {
  extern __shared__ float smem[];
  float* row = smem;                // [dim]
  float* scratch = smem + dim;      // [warps]
  const int b = blockIdx.x;
  const T* base = hidden + static_cast<int64_t>(b) * seq * dim;
  const uint8_t* m = mask + static_cast<int64_t>(b) * seq;
  int count = 0;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) row[d] = 0.f;
  for (int l = 0; l < seq; ++l) {
    if (!m[l]) continue;  // uniform across the block: every thread reads the same mask byte
    ++count;
    const T* tok = base + static_cast<int64_t>(l) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) row[d] += to_float(tok[d]);
  }
  const float inv_count = 1.f / static_cast<float>(count > 0 ? count : 1);
  float squares = 0.f;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    const float v = row[d] * inv_count;
    row[d] = v;
    squares += v * v;
  }
  const float norm = sqrtf(block_sum(squares, scratch));
  const float inv_norm = 1.f / fmaxf(norm, kNormEps);
  float* dst = out + static_cast<int64_t>(b) * dim;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = row[d] * inv_norm;
}

// One block per query: scores against every centroid (fp32), then the k best, best first;
// ties go to the lower centroid index (as FAISS's flat index orders them).
__global__ void centroid_topk_kernel(const float* __restrict__ queries, const float* __restrict__ centroids,
                                     int num_centroids, int dim, int k, int64_t* __restrict__ ids,
                                     float* __restrict__ scores) {
  extern __shared__ float smem[];
  float* query = smem;                 // [dim]
  float* sims = smem + dim;            // [num_centroids]
  const int b = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) query[d] = queries[static_cast<int64_t>(b) * dim + d];
  __syncthreads();
  for (int c = warp; c < num_centroids; c += warps) {
    const float* centroid = centroids + static_cast<int64_t>(c) * dim;
    float acc = 0.f;
    for (int d = lane; d < dim; d += kWarp) acc += query[d] * centroid[d];
    acc = warp_sum(acc);
    if (lane == 0) sims[c] = acc;
  }
  __syncthreads();
  if (warp != 0) return;
  // k rounds of a warp-wide argmax; a chosen entry is set to -inf so the next round skips it. Any other entry,
  // NaN included (read as -FLT_MAX), beats or ties the starting -FLT_MAX, so every round picks a valid id.
  for (int r = 0; r < k; ++r) {
    float best = -FLT_MAX;
    int best_id = num_centroids;
    for (int c = lane; c < num_centroids; c += kWarp) {
      const float v = isnan(sims[c]) ? -FLT_MAX : sims[c];
      if (v > best || (v == best && c < best_id)) {
        best = v;
        best_id = c;
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
      if (other > best || (other == best && other_id < best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    if (lane == 0) {
      // Only a row left all -inf (an infinite input; the service sends finite, normalised vectors) has no pick:
      // -1, as FAISS answers a missing neighbour, and nothing written past sims.
      const bool found = best_id < num_centroids;
      ids[static_cast<int64_t>(b) * k + r] = found ? best_id : -1;
      scores[static_cast<int64_t>(b) * k + r] = found ? best : -INFINITY;
      if (found) sims[best_id] = -INFINITY;
    }
    __syncwarp();
  }
}

int launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" {

// Bumped whenever a signature below changes; the loader refuses a library of another version.
ROUTER_API int router_kernels_abi_version(void) { return kAbiVersion; }

ROUTER_API int router_max_top_k(void) { return kMaxTopK; }

// hidden: [batch, seq, dim] contiguous, dtype per DType; mask: [batch, seq] bytes (0 = padding);
// out: [batch, dim] float32.
ROUTER_API int router_mean_pool_l2norm(const void* hidden, int dtype, const uint8_t* mask, int batch, int seq, int dim,
                            float* out, cudaStream_t stream) {
  if (batch == 0) return 0;
  if (batch < 0 || seq <= 0 || dim <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int warps = kPoolThreads / kWarp;
  const size_t shared = (static_cast<size_t>(dim) + warps) * sizeof(float);
  switch (dtype) {
    case kFloat32:
      mean_pool_l2norm_kernel<float><<<batch, kPoolThreads, shared, stream>>>(static_cast<const float*>(hidden), mask,
                                                                               seq, dim, out);
      break;
    case kFloat16:
      mean_pool_l2norm_kernel<__half><<<batch, kPoolThreads, shared, stream>>>(static_cast<const __half*>(hidden),
                                                                                mask, seq, dim, out);
      break;
    case kBFloat16:
      mean_pool_l2norm_kernel<__nv_bfloat16><<<batch, kPoolThreads, shared, stream>>>(
          static_cast<const __nv_bfloat16*>(hidden), mask, seq, dim, out);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return launched();
}

// queries: [batch, dim] float32; centroids: [num_centroids, dim] float32; ids: [batch, k] int64;
// scores: [batch, k] float32. 1 <= k <= min(num_centroids, router_max_top_k()).
ROUTER_API int router_centroid_topk(const float* queries, const float* centroids, int batch, int num_centroids, int dim, int k,
                         int64_t* ids, float* scores, cudaStream_t stream) {
  if (batch == 0) return 0;
  if (batch < 0 || num_centroids <= 0 || dim <= 0 || k < 1 || k > num_centroids || k > kMaxTopK) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const size_t shared = (static_cast<size_t>(dim) + num_centroids) * sizeof(float);
  centroid_topk_kernel<<<batch, kScoreThreads, shared, stream>>>(queries, centroids, num_centroids, dim, k, ids,
                                                                  scores);
  return launched();
}

}  // extern "C"
