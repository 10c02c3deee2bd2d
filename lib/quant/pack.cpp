#include "quant/pack.h"

#include <algorithm>
#include <cstring>

namespace moe::quant {

void pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  if (bits == 8) {
    if (n) std::memcpy(out, codes, static_cast<size_t>(n));
    return;
  }
  int64_t j = 0;
  if (bits == 4) {
    for (; j + 2 <= n; j += 2) *out++ = static_cast<uint8_t>(codes[j] | (codes[j + 1] << 4));
  } else if (bits == 2) {
    for (; j + 4 <= n; j += 4)
      *out++ = static_cast<uint8_t>(codes[j] | (codes[j + 1] << 2) | (codes[j + 2] << 4) | (codes[j + 3] << 6));
  }
  uint64_t acc = 0;
  int nb = 0;
  for (; j < n; ++j) {
    acc |= static_cast<uint64_t>(codes[j]) << nb;
    nb += bits;
    while (nb >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      nb -= 8;
    }
  }
  if (nb > 0) *out = static_cast<uint8_t>(acc);
}

void unpack_bits(const uint8_t* in, int64_t n, int bits, uint8_t* codes) {
  if (bits == 8) {
    if (n) std::memcpy(codes, in, static_cast<size_t>(n));
    return;
  }
  int64_t j = 0;
  if (bits == 4) {
    for (; j + 2 <= n; j += 2) {
      codes[j] = in[j / 2] & 15;
      codes[j + 1] = in[j / 2] >> 4;
    }
  } else if (bits == 2) {
    for (; j + 4 <= n; j += 4) {
      const uint8_t b = in[j / 4];
      codes[j] = b & 3;
      codes[j + 1] = (b >> 2) & 3;
      codes[j + 2] = (b >> 4) & 3;
      codes[j + 3] = b >> 6;
    }
  }
  const int64_t nbytes = (n * bits + 7) / 8;
  const unsigned mask = (1u << bits) - 1;
  for (; j < n; ++j) {
    const int64_t bit = j * bits, byte = bit >> 3;
    unsigned v = in[byte];
    if (byte + 1 < nbytes) v |= static_cast<unsigned>(in[byte + 1]) << 8;
    codes[j] = static_cast<uint8_t>((v >> (bit & 7)) & mask);
  }
}

void pack_trits(const uint8_t* trits, int64_t n, uint8_t* out) {
  for (int64_t j = 0; j < n; j += 5) {
    unsigned b = 0;
    for (int64_t k = std::min<int64_t>(n, j + 5) - 1; k >= j; --k) b = b * 3 + trits[k];
    *out++ = static_cast<uint8_t>(b);
  }
}

void unpack_trits(const uint8_t* in, int64_t n, uint8_t* trits) {
  for (int64_t j = 0; j < n; j += 5) {
    unsigned b = *in++;
    const int64_t k1 = std::min<int64_t>(n, j + 5);
    for (int64_t k = j; k < k1; ++k) {
      trits[k] = static_cast<uint8_t>(b % 3);
      b /= 3;
    }
  }
}

}  // namespace moe::quant
