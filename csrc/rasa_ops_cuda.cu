// CUDA kernels of the rasa:: operators (schemas and CPU kernels: rasa_ops.cpp). One thread per Philox
// block of eight elements, grid-stride; the same philox.h as the CPU kernels, so the masks are identical.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "philox.h"

namespace rasa {

namespace {

constexpr int kThreads = 256;

void check_args(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "rasa::", op, ": the input must be a contiguous CUDA tensor");
  TORCH_CHECK(seed >= 0 && offset >= 0, "rasa::", op, ": seed and offset must be >= 0, got seed=", seed,
              ", offset=", offset);
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 16), "rasa::", op,
              ": threshold must be in [0, 2^16], got ", threshold);
}

int grid_for(int64_t numel) {
  const int64_t blocks = (numel + kElementsPerBlock - 1) / kElementsPerBlock;
  const int64_t grid = (blocks + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(grid < 1 ? 1 : (grid > cap ? cap : grid));
}

__global__ void keep_mask_kernel(bool* out, int64_t numel, uint64_t seed, uint64_t offset, uint32_t threshold) {
  const int64_t blocks = (numel + kElementsPerBlock - 1) / kElementsPerBlock;
  for (int64_t block = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; block < blocks;
       block += int64_t{blockDim.x} * gridDim.x) {
    const Philox4 bits = dropout_block(seed, offset, block);
#pragma unroll
    for (int lane = 0; lane < kElementsPerBlock; ++lane)
      if (block * kElementsPerBlock + lane < numel) out[block * kElementsPerBlock + lane] = kept(bits, lane, threshold);
  }
}

template <typename in_t, typename out_t, typename acc_t>
__global__ void dropout_cast_kernel(const in_t* in, out_t* out, int64_t numel, uint64_t seed, uint64_t offset,
                                    uint32_t threshold, acc_t scale) {
  const int64_t blocks = (numel + kElementsPerBlock - 1) / kElementsPerBlock;
  for (int64_t block = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; block < blocks;
       block += int64_t{blockDim.x} * gridDim.x) {
    const Philox4 bits = dropout_block(seed, offset, block);
#pragma unroll
    for (int lane = 0; lane < kElementsPerBlock; ++lane) {
      const int64_t i = block * kElementsPerBlock + lane;
      if (i < numel)
        out[i] = kept(bits, lane, threshold) ? static_cast<out_t>(static_cast<acc_t>(in[i]) * scale) : out_t(0);
    }
  }
}

template <typename out_t, typename src_t, typename acc_t>
__global__ void masked_add_kernel(out_t* out, const src_t* src, int64_t numel, uint64_t seed, uint64_t offset,
                                  uint32_t threshold, acc_t scale) {
  const int64_t blocks = (numel + kElementsPerBlock - 1) / kElementsPerBlock;
  for (int64_t block = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; block < blocks;
       block += int64_t{blockDim.x} * gridDim.x) {
    const Philox4 bits = dropout_block(seed, offset, block);
#pragma unroll
    for (int lane = 0; lane < kElementsPerBlock; ++lane) {
      const int64_t i = block * kElementsPerBlock + lane;
      if (i < numel && kept(bits, lane, threshold))
        out[i] = static_cast<out_t>(static_cast<acc_t>(out[i]) + static_cast<acc_t>(src[i]) * scale);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void dropout_cast_add_kernel(scalar_t* out, const scalar_t* src, const scalar_t* in, scalar_t* dropped,
                                        int64_t numel, uint64_t seed, uint64_t offset, uint32_t threshold,
                                        acc_t scale) {
  const int64_t blocks = (numel + kElementsPerBlock - 1) / kElementsPerBlock;
  for (int64_t block = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; block < blocks;
       block += int64_t{blockDim.x} * gridDim.x) {
    const Philox4 bits = dropout_block(seed, offset, block);
#pragma unroll
    for (int lane = 0; lane < kElementsPerBlock; ++lane) {
      const int64_t i = block * kElementsPerBlock + lane;
      if (i < numel) {
        if (kept(bits, lane, threshold)) {
          out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) + static_cast<acc_t>(src[i]) * scale);
          dropped[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * scale);
        } else {
          dropped[i] = scalar_t(0);
        }
      }
    }
  }
}

}  // namespace

at::Tensor dropout_cast_add_cuda(at::Tensor& out, const at::Tensor& src, const at::Tensor& x, int64_t seed,
                                 int64_t offset, int64_t threshold, double scale, at::ScalarType dtype) {
  check_args(out, seed, offset, threshold, "dropout_cast_add_");
  check_args(src, seed, offset, threshold, "dropout_cast_add_");
  check_args(x, seed, offset, threshold, "dropout_cast_add_");
  TORCH_CHECK(src.device() == out.device() && x.device() == out.device(),
              "rasa::dropout_cast_add_: out, src and x must be on one device");
  TORCH_CHECK(out.sizes() == src.sizes() && out.sizes() == x.sizes(), "rasa::dropout_cast_add_: out ", out.sizes(),
              ", src ", src.sizes(), " and x ", x.sizes(), " differ in shape");
  TORCH_CHECK(out.scalar_type() == src.scalar_type() && x.scalar_type() == dtype,
              "rasa::dropout_cast_add_: out and src must share a dtype and x must have dtype ", dtype);
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor result = at::empty(x.sizes(), x.options());
  const int64_t numel = out.numel();
  if (numel == 0) return result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_cast_add_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dropout_cast_add_kernel<scalar_t, acc_t><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), result.data_ptr<scalar_t>(), numel,
        seed, offset, static_cast<uint32_t>(threshold), static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

at::Tensor keep_mask_cuda(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold) {
  check_args(x, seed, offset, threshold, "keep_mask");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t numel = x.numel();
  if (numel == 0) return mask;
  keep_mask_kernel<<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<bool>(), numel, seed, offset, static_cast<uint32_t>(threshold));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

at::Tensor dropout_cast_cuda(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold, double scale,
                             at::ScalarType dtype) {
  check_args(x, seed, offset, threshold, "dropout_cast");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor result = at::empty(x.sizes(), x.options().dtype(dtype));
  const int64_t numel = x.numel();
  if (numel == 0) return result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cast_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dropout_cast_out", [&] {
      using out_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>, double, float>;
      dropout_cast_kernel<in_t, out_t, acc_t><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<in_t>(), result.data_ptr<out_t>(), numel, seed, offset, static_cast<uint32_t>(threshold),
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

void masked_add_cuda(at::Tensor& out, const at::Tensor& src, int64_t seed, int64_t offset, int64_t threshold,
                     double scale) {
  check_args(out, seed, offset, threshold, "masked_add_");
  check_args(src, seed, offset, threshold, "masked_add_");
  TORCH_CHECK(out.sizes() == src.sizes(), "rasa::masked_add_: out ", out.sizes(), " and src ", src.sizes(),
              " differ in shape");
  TORCH_CHECK(src.device() == out.device(), "rasa::masked_add_: out and src must be on one device");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t numel = out.numel();
  if (numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "masked_add_out", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "masked_add_src", [&] {
      using src_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<out_t, double>, double, float>;
      masked_add_kernel<out_t, src_t, acc_t><<<grid_for(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          out.data_ptr<out_t>(), src.data_ptr<src_t>(), numel, seed, offset, static_cast<uint32_t>(threshold),
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

TORCH_LIBRARY_IMPL(rasa, CUDA, m) {
  m.impl("keep_mask", &keep_mask_cuda);
  m.impl("dropout_cast", &dropout_cast_cuda);
  m.impl("masked_add_", &masked_add_cuda);
  m.impl("dropout_cast_add_", &dropout_cast_add_cuda);
}

}  // namespace rasa
