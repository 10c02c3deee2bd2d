#include "quant/gguf_blocks.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"

namespace moe::quant {

namespace {

using core::Error;

constexpr int64_t kQK = 256;  // K-quant / TQ super-block

// Sizes from ggml-common.h (static_asserts of each block struct).
const GgmlTypeInfo kTypes[] = {
    {GgmlType::F32, "f32", 1, 4, true},
    {GgmlType::F16, "f16", 1, 2, true},
    {GgmlType::Q4_0, "q4_0", 32, 2 + 16, true},
    {GgmlType::Q4_1, "q4_1", 32, 2 + 2 + 16, true},
    {GgmlType::Q5_0, "q5_0", 32, 2 + 4 + 16, true},
    {GgmlType::Q5_1, "q5_1", 32, 2 + 2 + 4 + 16, true},
    {GgmlType::Q8_0, "q8_0", 32, 2 + 32, true},
    {GgmlType::Q8_1, "q8_1", 32, 2 + 2 + 32, false},
    {GgmlType::Q2_K, "q2_k", kQK, 2 + 2 + kQK / 16 + kQK / 4, false},
    {GgmlType::Q3_K, "q3_k", kQK, 2 + kQK / 4 + kQK / 8 + 12, false},
    {GgmlType::Q4_K, "q4_k", kQK, 2 + 2 + kQK / 2 + 12, false},
    {GgmlType::Q5_K, "q5_k", kQK, 2 + 2 + kQK / 2 + kQK / 8 + 12, false},
    {GgmlType::Q6_K, "q6_k", kQK, 2 + kQK / 2 + kQK / 4 + kQK / 16, false},
    {GgmlType::Q8_K, "q8_k", kQK, 4 + kQK + kQK / 8, false},
    {GgmlType::IQ2_XXS, "iq2_xxs", kQK, 2 + kQK / 4, false},
    {GgmlType::IQ2_XS, "iq2_xs", kQK, 2 + kQK / 4 + kQK / 32, false},
    {GgmlType::IQ3_XXS, "iq3_xxs", kQK, 2 + kQK / 4 + kQK / 8, false},
    {GgmlType::IQ1_S, "iq1_s", kQK, 2 + kQK / 8 + kQK / 16, false},
    {GgmlType::IQ4_NL, "iq4_nl", 32, 2 + 16, false},
    {GgmlType::IQ3_S, "iq3_s", kQK, 2 + kQK / 4 + kQK / 8 + kQK / 32 + 4, false},
    {GgmlType::IQ2_S, "iq2_s", kQK, 2 + kQK / 4 + kQK / 16, false},
    {GgmlType::IQ4_XS, "iq4_xs", kQK, 2 + 2 + kQK / 2 + kQK / 64, false},
    {GgmlType::I8, "i8", 1, 1, false},
    {GgmlType::I16, "i16", 1, 2, false},
    {GgmlType::I32, "i32", 1, 4, false},
    {GgmlType::I64, "i64", 1, 8, false},
    {GgmlType::F64, "f64", 1, 8, false},
    {GgmlType::IQ1_M, "iq1_m", kQK, kQK / 8 + kQK / 16 + kQK / 32, false},
    {GgmlType::BF16, "bf16", 1, 2, true},
    {GgmlType::TQ1_0, "tq1_0", kQK, 2 + 4 * 13, true},
    {GgmlType::TQ2_0, "tq2_0", kQK, 2 + 64, true},
};

[[noreturn]] void no_codec(GgmlType t, const char* what) {
  throw Error::unsupported(std::string("ggml type ") + ggml_type_info(t).name + ": no " + what +
                           " yet (types with one: " + ggml_codec_names() + ")");
}

// The f16 scale stored for `d` and its value as decode sees it.
uint16_t f16_scale(float d, float* stored) {
  const uint16_t h = core::f32_to_f16(d);
  *stored = core::f16_to_f32(h);
  if (!std::isfinite(*stored)) throw Error::invalid("block scale " + std::to_string(d) + " overflows f16");
  return h;
}

void put_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
uint16_t get_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

int clamp_round(float v, int lo, int hi) {
  const float r = std::nearbyint(v);
  return static_cast<int>(std::clamp(r, static_cast<float>(lo), static_cast<float>(hi)));
}

// The element of largest magnitude, with its sign (the first one on ties).
float signed_absmax(const float* x, int n) {
  float m = 0.0f;
  for (int j = 0; j < n; ++j)
    if (std::fabs(x[j]) > std::fabs(m)) m = x[j];
  return m;
}

// Packs 32 codes (0..31) into nibbles qs[16] (element j low, j + 16 high) and, when qh is not
// null, bit 4 of element j into bit j of the little-endian u32 at qh.
void pack_nibbles(const int* q, uint8_t* qs, uint8_t* qh) {
  uint32_t high = 0;
  for (int j = 0; j < 16; ++j) {
    qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
    high |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    high |= static_cast<uint32_t>((q[j + 16] >> 4) & 1) << (j + 16);
  }
  if (qh) std::memcpy(qh, &high, 4);
}

void unpack_nibbles(const uint8_t* qs, const uint8_t* qh, int* q) {
  uint32_t high = 0;
  if (qh) std::memcpy(&high, qh, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0xF) | static_cast<int>(((high >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | static_cast<int>(((high >> (j + 16)) & 1) << 4);
  }
}

// Symmetric 32-blocks (Q4_0, Q5_0): d = (signed absmax) / -half, q = round(x / d) + half in
// [0, 2 * half - 1], so the largest-magnitude element maps exactly onto the grid's end -half.
void encode_sym(const float* x, uint8_t* b, int half, bool five_bit) {
  const float m = signed_absmax(x, 32);
  float d;
  put_u16(b, f16_scale(m / static_cast<float>(-half), &d));
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = clamp_round(x[j] * id, -half, half - 1) + half;
  pack_nibbles(q, five_bit ? b + 6 : b + 2, five_bit ? b + 2 : nullptr);
}

void decode_sym(const uint8_t* b, float* y, int half, bool five_bit) {
  const float d = core::f16_to_f32(get_u16(b));
  int q[32];
  unpack_nibbles(five_bit ? b + 6 : b + 2, five_bit ? b + 2 : nullptr, q);
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(q[j] - half);
}

// Asymmetric 32-blocks (Q4_1, Q5_1): m = min, d = (max - min) / levels, q = round((x - m) / d).
void encode_asym(const float* x, uint8_t* b, int levels, bool five_bit) {
  const auto [lo, hi] = std::minmax_element(x, x + 32);
  float d, m;
  put_u16(b, f16_scale((*hi - *lo) / static_cast<float>(levels), &d));
  put_u16(b + 2, f16_scale(*lo, &m));
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = clamp_round((x[j] - m) * id, 0, levels);
  pack_nibbles(q, five_bit ? b + 8 : b + 4, five_bit ? b + 4 : nullptr);
}

void decode_asym(const uint8_t* b, float* y, bool five_bit) {
  const float d = core::f16_to_f32(get_u16(b));
  const float m = core::f16_to_f32(get_u16(b + 2));
  int q[32];
  unpack_nibbles(five_bit ? b + 8 : b + 4, five_bit ? b + 4 : nullptr, q);
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(q[j]) + m;
}

void encode_q8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  float d;
  put_u16(b, f16_scale(amax / 127.0f, &d));
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(clamp_round(x[j] * id, -127, 127)));
}

void decode_q8_0(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b));
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
}

// Ternary 256-blocks: d = absmax (f16), t = round(x / d) + 1 in {0, 1, 2}, x = d * (t - 1).
void ternary_codes(const float* x, float* d, uint16_t* dh, int* t) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  *dh = f16_scale(amax, d);
  const float id = *d != 0.0f ? 1.0f / *d : 0.0f;
  for (int j = 0; j < kQK; ++j) t[j] = clamp_round(x[j] * id, -1, 1) + 1;
}

// TQ2_0 {u8 qs[64]; f16 d}: element 128 * h + 32 * l + m in bits 2l..2l+1 of qs[32 * h + m].
void encode_tq2_0(const float* x, uint8_t* b) {
  float d;
  uint16_t dh;
  int t[kQK];
  ternary_codes(x, &d, &dh, t);
  std::memset(b, 0, 64);
  for (int e = 0; e < kQK; ++e) b[32 * (e / 128) + e % 32] |= static_cast<uint8_t>(t[e] << (2 * ((e % 128) / 32)));
  put_u16(b + 64, dh);
}

void decode_tq2_0(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b + 64));
  for (int e = 0; e < kQK; ++e)
    y[e] = d * static_cast<float>(((b[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3) - 1);
}

// TQ1_0 {u8 qs[48]; u8 qh[4]; f16 d}: bytes of 5 trits (4 in qh, the fifth 0), the trit with
// weight 3^4 first: byte = ceil(sum t_k 3^(4-k) * 256 / 243); trit n of a byte q is
// ((q * 3^n mod 256) * 3) >> 8. Element order: qs[0..31] trit n gives elements 32n + m (160),
// qs[32..47] trit n gives 160 + 16n + m (80), qh[j] trit n gives 240 + 4n + j (16).
struct Tq1Place {
  int byte, trit;
};
Tq1Place tq1_place(int e) {
  if (e < 160) return {e % 32, e / 32};
  if (e < 240) return {32 + (e - 160) % 16, (e - 160) / 16};
  return {48 + (e - 240) % 4, (e - 240) / 4};
}

void encode_tq1_0(const float* x, uint8_t* b) {
  float d;
  uint16_t dh;
  int t[kQK];
  ternary_codes(x, &d, &dh, t);
  int sum[52] = {};
  static constexpr int kPow3[5] = {81, 27, 9, 3, 1};
  for (int e = 0; e < kQK; ++e) {
    const Tq1Place p = tq1_place(e);
    sum[p.byte] += t[e] * kPow3[p.trit];
  }
  for (int k = 0; k < 52; ++k) b[k] = static_cast<uint8_t>((sum[k] * 256 + 242) / 243);
  put_u16(b + 52, dh);
}

void decode_tq1_0(const uint8_t* b, float* y) {
  const float d = core::f16_to_f32(get_u16(b + 52));
  static constexpr int kPow3[5] = {1, 3, 9, 27, 81};
  for (int e = 0; e < kQK; ++e) {
    const Tq1Place p = tq1_place(e);
    const auto q = static_cast<uint8_t>(b[p.byte] * kPow3[p.trit]);
    y[e] = d * static_cast<float>(((q * 3) >> 8) - 1);
  }
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const auto& t : kTypes)
    if (static_cast<uint32_t>(t.type) == id) return &t;
  return nullptr;
}

const GgmlTypeInfo& ggml_type_info(GgmlType t) {
  const GgmlTypeInfo* i = ggml_type_info(static_cast<uint32_t>(t));
  if (!i) throw Error::internal("ggml type " + std::to_string(static_cast<uint32_t>(t)) + " not in the table");
  return *i;
}

const GgmlTypeInfo* parse_ggml_type(std::string_view name) {
  std::string lower(name);
  for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& t : kTypes)
    if (lower == t.name) return &t;
  return nullptr;
}

std::string ggml_codec_names() {
  std::string s;
  for (const auto& t : kTypes)
    if (t.codec) s += (s.empty() ? "" : ", ") + std::string(t.name);
  return s;
}

uint64_t ggml_row_bytes(GgmlType t, int64_t n) {
  const auto& info = ggml_type_info(t);
  if (n < 0 || n % info.block != 0)
    throw Error::invalid(std::string("row of ") + std::to_string(n) + " values is not a multiple of the " + info.name +
                         " block size " + std::to_string(info.block));
  return static_cast<uint64_t>(n / info.block) * info.type_size;
}

namespace {

// The block types: one encoder and one decoder per block.
struct BlockCodec {
  GgmlType type;
  void (*encode)(const float* x, uint8_t* b);
  void (*decode)(const uint8_t* b, float* y);
};
const BlockCodec kBlockCodecs[] = {
    {GgmlType::Q8_0, encode_q8_0, decode_q8_0},
    {GgmlType::Q4_0, [](const float* x, uint8_t* b) { encode_sym(x, b, 8, false); },
     [](const uint8_t* b, float* y) { decode_sym(b, y, 8, false); }},
    {GgmlType::Q5_0, [](const float* x, uint8_t* b) { encode_sym(x, b, 16, true); },
     [](const uint8_t* b, float* y) { decode_sym(b, y, 16, true); }},
    {GgmlType::Q4_1, [](const float* x, uint8_t* b) { encode_asym(x, b, 15, false); },
     [](const uint8_t* b, float* y) { decode_asym(b, y, false); }},
    {GgmlType::Q5_1, [](const float* x, uint8_t* b) { encode_asym(x, b, 31, true); },
     [](const uint8_t* b, float* y) { decode_asym(b, y, true); }},
    {GgmlType::TQ1_0, encode_tq1_0, decode_tq1_0},
    {GgmlType::TQ2_0, encode_tq2_0, decode_tq2_0},
};

// The dtype of a one-value-per-element type (F32, F16, BF16), else nullopt.
std::optional<core::DType> element_dtype(GgmlType t) {
  if (t == GgmlType::F32) return core::DType::F32;
  if (t == GgmlType::F16) return core::DType::F16;
  if (t == GgmlType::BF16) return core::DType::BF16;
  return std::nullopt;
}

// The codec of a block type after the checks both directions share.
const BlockCodec* checked_codec(GgmlType t, int64_t n, const char* what) {
  if (!ggml_type_info(t).codec) no_codec(t, what);
  (void)ggml_row_bytes(t, n);
  for (const auto& c : kBlockCodecs)
    if (c.type == t) return &c;
  return nullptr;  // an element type
}

}  // namespace

void encode_row(GgmlType t, const float* x, int64_t n, uint8_t* dst) {
  const BlockCodec* c = checked_codec(t, n, "encoder");
  const int64_t bad = core::first_non_finite(core::DType::F32, x, static_cast<size_t>(n));
  if (bad >= 0) throw Error::invalid("non-finite value " + std::to_string(x[bad]) + " at column " + std::to_string(bad));
  if (!c) return core::from_f32(*element_dtype(t), x, dst, static_cast<size_t>(n));
  const auto& info = ggml_type_info(t);
  for (int64_t i = 0; i < n / info.block; ++i) c->encode(x + i * info.block, dst + i * info.type_size);
}

void decode_row(GgmlType t, const uint8_t* src, int64_t n, float* dst) {
  const BlockCodec* c = checked_codec(t, n, "decoder");
  if (!c) return core::to_f32(*element_dtype(t), src, dst, static_cast<size_t>(n));
  const auto& info = ggml_type_info(t);
  for (int64_t i = 0; i < n / info.block; ++i) c->decode(src + i * info.type_size, dst + i * info.block);
}

void pack_codes_row(GgmlType t, const uint8_t* codes, const float* scales, int64_t n, uint8_t* dst) {
  if (t != GgmlType::Q4_0 && t != GgmlType::Q8_0)
    throw Error::invalid(std::string("codes cannot be stored as ") + ggml_type_info(t).name + " without re-quantizing");
  const auto& info = ggml_type_info(t);
  (void)ggml_row_bytes(t, n);
  const int maxq = t == GgmlType::Q4_0 ? 15 : 255;
  for (int64_t i = 0; i < n / 32; ++i) {
    const uint8_t* q = codes + i * 32;
    uint8_t* b = dst + i * info.type_size;
    float stored;
    put_u16(b, f16_scale(scales[i], &stored));
    if (stored != scales[i]) throw Error::invalid("scale " + std::to_string(scales[i]) + " of block " + std::to_string(i) + " is not exact in f16");
    int c[32];
    for (int j = 0; j < 32; ++j) {
      if (q[j] > maxq) throw Error::invalid("code " + std::to_string(q[j]) + " above " + std::to_string(maxq));
      c[j] = q[j];
    }
    if (t == GgmlType::Q4_0) {
      pack_nibbles(c, b + 2, nullptr);
    } else {
      for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(c[j] - 128));
    }
  }
}

}  // namespace moe::quant
