// Counter-based dropout masks: Philox4x32-10 (Salmon et al., SC'11; the generator of cuRAND and of
// PyTorch's CUDA RNG), one header compiled into both the CPU (C++) and the CUDA kernels, so the CPU
// tests check the exact masks the GPU draws. rasa_megatron/ops/philox.py is its pure-torch twin
// (the fallback and the tests' oracle).
//
// Element i of a flattened [numel] tensor under (seed, offset): one Philox call gives 128 bits, 16 per
// element, for the 8 elements i = 8 * block .. 8 * block + 7:
//   key     = (seed mod 2^32, seed >> 32)
//   counter = ((i >> 3) mod 2^32, (i >> 3) >> 32, offset mod 2^32, (offset >> 32) | 2^31)
//   (the top bit of the last counter word is always set: PyTorch's and cuRAND's Philox draws put the
//   thread index there, which is < 2^31, so our counters never coincide with theirs under one seed)
//   bits    = half (i & 1) (low half first) of word ((i & 7) >> 1) of Philox4x32-10(counter, key)
//   kept    = bits >= threshold                 (threshold = floor(p * 2^16): P(drop) = threshold / 2^16)
// A kept element is scaled by 1 / (1 - p), as torch.nn.functional.dropout does.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RASA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RASA_HOST_DEVICE inline
#endif

namespace rasa {

struct Philox4 {
  uint32_t v[4];
};

RASA_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

RASA_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                       uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, c0, &hi0, &lo0);
    mulhilo32(kMul1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

constexpr int kElementsPerBlock = 8;
constexpr uint32_t kCounterTag = 0x80000000u;

// The four random words of the counter block that holds elements `block * 8 .. block * 8 + 7`.
RASA_HOST_DEVICE Philox4 dropout_block(uint64_t seed, uint64_t offset, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32) | kCounterTag,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Whether element `lane` (0..7) of a block survives dropout at `threshold`.
RASA_HOST_DEVICE bool kept(const Philox4& block, int lane, uint32_t threshold) {
  return ((block.v[lane >> 1] >> ((lane & 1) * 16)) & 0xFFFFu) >= threshold;
}

// Whether element `index` survives dropout under (seed, offset, threshold).
RASA_HOST_DEVICE bool keep_element(uint64_t seed, uint64_t offset, uint64_t index, uint32_t threshold) {
  const Philox4 block = dropout_block(seed, offset, index >> 3);
  return kept(block, static_cast<int>(index & 7), threshold);
}

}  // namespace rasa
