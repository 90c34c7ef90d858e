// rasa:: operators: their schemas (TORCH_LIBRARY) and CPU kernels. The CUDA kernels of the same ops are
// in rasa_ops_cuda.cu; the fake (meta) kernels for torch.compile and the autograd around them are in
// rasa_megatron/ops/ (Python), the torch fallback of each op in rasa_megatron/ops/philox.py.
//
// Ops (x, out, src contiguous; seed >= 0, offset >= 0, 0 <= threshold <= 2^16; see philox.h):
//   keep_mask(x, seed, offset, threshold) -> bool tensor shaped like x: which elements dropout keeps
//   dropout_cast(x, seed, offset, threshold, scale, dtype) -> kept ? x * scale : 0, cast to dtype
//   masked_add_(out, src, seed, offset, threshold, scale): out += kept ? src * scale : 0 (in place)
//   dropout_cast_add_(out, src, x, seed, offset, threshold, scale, dtype) -> kept ? x * scale : 0, and
//     out += kept ? src * scale : 0 (one mask for both: the fused backward's dropped input and dx);
//     out, src and x share one dtype
// Arithmetic is in float (double when a tensor is double), then rounded once to the output dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox.h"

namespace rasa {

namespace {

void check_args(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold, const char* op) {
  TORCH_CHECK(x.is_contiguous(), "rasa::", op, ": the input must be contiguous");
  TORCH_CHECK(seed >= 0 && offset >= 0, "rasa::", op, ": seed and offset must be >= 0, got seed=", seed,
              ", offset=", offset);
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 16), "rasa::", op,
              ": threshold must be in [0, 2^16], got ", threshold);
}

template <typename Body>
void for_each_block(int64_t numel, Body body) {
  const int64_t blocks = (numel + kElementsPerBlock - 1) / kElementsPerBlock;
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) body(block);
  });
}

}  // namespace

at::Tensor keep_mask_cpu(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold) {
  check_args(x, seed, offset, threshold, "keep_mask");
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const int64_t numel = x.numel();
  const auto limit = static_cast<uint32_t>(threshold);
  for_each_block(numel, [&](int64_t block) {
    const Philox4 bits = dropout_block(seed, offset, block);
    for (int lane = 0; lane < kElementsPerBlock && block * kElementsPerBlock + lane < numel; ++lane)
      out[block * kElementsPerBlock + lane] = kept(bits, lane, limit);
  });
  return mask;
}

at::Tensor dropout_cast_cpu(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold, double scale,
                            at::ScalarType dtype) {
  check_args(x, seed, offset, threshold, "dropout_cast");
  at::Tensor result = at::empty(x.sizes(), x.options().dtype(dtype));
  const int64_t numel = x.numel();
  const auto limit = static_cast<uint32_t>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cast_in", [&] {
    using in_t = scalar_t;
    const in_t* in = x.data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dropout_cast_out", [&] {
      using out_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>, double, float>;
      out_t* out = result.data_ptr<out_t>();
      const auto factor = static_cast<acc_t>(scale);
      for_each_block(numel, [&](int64_t block) {
        const Philox4 bits = dropout_block(seed, offset, block);
        for (int lane = 0; lane < kElementsPerBlock && block * kElementsPerBlock + lane < numel; ++lane) {
          const int64_t i = block * kElementsPerBlock + lane;
          out[i] = kept(bits, lane, limit) ? static_cast<out_t>(static_cast<acc_t>(in[i]) * factor) : out_t(0);
        }
      });
    });
  });
  return result;
}

void masked_add_cpu(at::Tensor& out, const at::Tensor& src, int64_t seed, int64_t offset, int64_t threshold,
                    double scale) {
  check_args(out, seed, offset, threshold, "masked_add_");
  check_args(src, seed, offset, threshold, "masked_add_");
  TORCH_CHECK(out.sizes() == src.sizes(), "rasa::masked_add_: out ", out.sizes(), " and src ", src.sizes(),
              " differ in shape");
  const int64_t numel = out.numel();
  const auto limit = static_cast<uint32_t>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "masked_add_out", [&] {
    using out_t = scalar_t;
    out_t* acc_out = out.data_ptr<out_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "masked_add_src", [&] {
      using src_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<out_t, double>, double, float>;
      const src_t* in = src.data_ptr<src_t>();
      const auto factor = static_cast<acc_t>(scale);
      for_each_block(numel, [&](int64_t block) {
        const Philox4 bits = dropout_block(seed, offset, block);
        for (int lane = 0; lane < kElementsPerBlock && block * kElementsPerBlock + lane < numel; ++lane) {
          const int64_t i = block * kElementsPerBlock + lane;
          if (kept(bits, lane, limit))
            acc_out[i] = static_cast<out_t>(static_cast<acc_t>(acc_out[i]) + static_cast<acc_t>(in[i]) * factor);
        }
      });
    });
  });
}

at::Tensor dropout_cast_add_cpu(at::Tensor& out, const at::Tensor& src, const at::Tensor& x, int64_t seed,
                                int64_t offset, int64_t threshold, double scale, at::ScalarType dtype) {
  check_args(out, seed, offset, threshold, "dropout_cast_add_");
  check_args(src, seed, offset, threshold, "dropout_cast_add_");
  check_args(x, seed, offset, threshold, "dropout_cast_add_");
  TORCH_CHECK(out.sizes() == src.sizes() && out.sizes() == x.sizes(), "rasa::dropout_cast_add_: out ", out.sizes(),
              ", src ", src.sizes(), " and x ", x.sizes(), " differ in shape");
  TORCH_CHECK(out.scalar_type() == src.scalar_type() && x.scalar_type() == dtype,
              "rasa::dropout_cast_add_: out and src must share a dtype and x must have dtype ", dtype);
  at::Tensor result = at::empty(x.sizes(), x.options());
  const int64_t numel = out.numel();
  const auto limit = static_cast<uint32_t>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_cast_add_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* acc_out = out.data_ptr<scalar_t>();
    const scalar_t* through = src.data_ptr<scalar_t>();
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* dropped = result.data_ptr<scalar_t>();
    const auto factor = static_cast<acc_t>(scale);
    for_each_block(numel, [&](int64_t block) {
      const Philox4 bits = dropout_block(seed, offset, block);
      for (int lane = 0; lane < kElementsPerBlock && block * kElementsPerBlock + lane < numel; ++lane) {
        const int64_t i = block * kElementsPerBlock + lane;
        if (kept(bits, lane, limit)) {
          acc_out[i] = static_cast<scalar_t>(static_cast<acc_t>(acc_out[i]) + static_cast<acc_t>(through[i]) * factor);
          dropped[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * factor);
        } else {
          dropped[i] = scalar_t(0);
        }
      }
    });
  });
  return result;
}

TORCH_LIBRARY(rasa, m) {
  m.def("keep_mask(Tensor x, int seed, int offset, int threshold) -> Tensor");
  m.def("dropout_cast(Tensor x, int seed, int offset, int threshold, float scale, ScalarType dtype) -> Tensor");
  m.def("masked_add_(Tensor(a!) out, Tensor src, int seed, int offset, int threshold, float scale) -> ()");
  m.def("dropout_cast_add_(Tensor(a!) out, Tensor src, Tensor x, int seed, int offset, int threshold, float scale, "
        "ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(rasa, CPU, m) {
  m.impl("keep_mask", &keep_mask_cpu);
  m.impl("dropout_cast", &dropout_cast_cpu);
  m.impl("masked_add_", &masked_add_cpu);
  m.impl("dropout_cast_add_", &dropout_cast_add_cpu);
}

}  // namespace rasa
