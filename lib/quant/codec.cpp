#include "quant/codec.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/suggest.h"
#include "quant/intn.h"
#include "quant/pack.h"

namespace moe::quant {

using core::DType;
using core::Error;

namespace {

struct NamedCodec {
  const char* name;
  CodecSpec::Kind kind;
  int bits;
  TernaryGrid grid;
};
constexpr NamedCodec kCodecs[] = {
    {"int8", CodecSpec::Kind::Int, 8, TernaryGrid::MinMax},
    {"int4", CodecSpec::Kind::Int, 4, TernaryGrid::MinMax},
    {"int3", CodecSpec::Kind::Int, 3, TernaryGrid::MinMax},
    {"int2", CodecSpec::Kind::Int, 2, TernaryGrid::MinMax},
    {"ternary", CodecSpec::Kind::Ternary, 0, TernaryGrid::MinMax},
    {"ternary-absmean", CodecSpec::Kind::Ternary, 0, TernaryGrid::AbsMean},
    {"ternary-minmax", CodecSpec::Kind::Ternary, 0, TernaryGrid::MinMax},
    {"ternary-tq", CodecSpec::Kind::Ternary, 0, TernaryGrid::TQ},
};
static_assert(sizeof(kCodecs) / sizeof(kCodecs[0]) == 8, "codec table: 4 integer widths, ternary and its 3 grids");

bool parse_int(std::string_view s, int64_t& v) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && p == s.data() + s.size();
}

}  // namespace

CodecSpec parse_codec(std::string_view s) {
  const std::string whole(s);
  std::vector<std::string_view> fields;
  for (size_t b = 0;;) {
    const size_t e = s.find(':', b);
    fields.push_back(s.substr(b, e == std::string_view::npos ? std::string_view::npos : e - b));
    if (e == std::string_view::npos) break;
    b = e + 1;
  }
  const std::string name(fields[0]);
  const NamedCodec* nc = nullptr;
  std::vector<std::string> names;
  for (const auto& c : kCodecs) {
    names.push_back(c.name);
    if (name == c.name) nc = &c;
  }
  const GgmlTypeInfo* gt = nullptr;
  for (const GgmlType t : ggml_grid_types()) {
    names.push_back(ggml_type_info(t).name);
    if (name == names.back()) gt = &ggml_type_info(t);
  }
  if (gt) {
    if (fields.size() > 1)
      throw Error::invalid("codec \"" + whole + "\": " + name + " is a ggml block type with a fixed layout (blocks of " +
                           std::to_string(gt->block) + "): no options");
    CodecSpec c;
    c.kind = CodecSpec::Kind::Ggml;
    c.ggml = gt->type;
    c.bits = 0;
    c.group = gt->block;
    c.symmetric = ggml_grid_info(gt->type)->qmin < 0;  // codes centred on zero: no min
    return c;
  }
  if (!nc) throw Error::invalid("unknown codec \"" + name + "\"" + core::allowed_suffix(name, names));
  CodecSpec c;
  c.kind = nc->kind;
  c.bits = nc->bits;
  c.grid = nc->grid;
  const bool tern = c.kind == CodecSpec::Kind::Ternary;
  c.group = !tern ? 128 : c.grid == TernaryGrid::TQ ? 256 : 0;
  c.symmetric = !tern || c.grid != TernaryGrid::MinMax;
  bool seen_group = false, seen_sym = false, seen_refit = false, seen_t = false;
  auto bad = [&](const std::string& why) { return Error::invalid("codec \"" + whole + "\": " + why); };
  auto once = [&](bool& seen, std::string_view f) {
    if (seen) throw bad("option \"" + std::string(f) + "\" repeats an earlier one");
    seen = true;
  };
  for (size_t i = 1; i < fields.size(); ++i) {
    const std::string_view f = fields[i];
    int64_t v = 0;
    if (f == "row") {
      once(seen_group, f);
      c.group = 0;
    } else if (f.size() > 1 && f[0] == 'g' && parse_int(f.substr(1), v)) {
      once(seen_group, f);
      if (v < 1) throw bad("group " + std::to_string(v) + ": expected >= 1 (or \"row\")");
      c.group = v;
    } else if (f == "sym" || f == "asym") {
      once(seen_sym, f);
      c.symmetric = f == "sym";
    } else if (f.substr(0, 5) == "refit" && (f.size() == 5 || parse_int(f.substr(5), v))) {
      once(seen_refit, f);
      if (!tern) throw bad("refit applies to ternary codecs only");
      c.refit_iters = f.size() == 5 ? kDefaultRefitIters : static_cast<int>(v);
      if (c.refit_iters < 1 || c.refit_iters > 1000) throw bad("refit rounds: expected 1 to 1000");
    } else if (f.size() > 1 && f[0] == 't' && tern) {
      once(seen_t, f);
      double t = 0;
      auto [p, ec] = std::from_chars(f.data() + 1, f.data() + f.size(), t);
      if (ec != std::errc() || p != f.data() + f.size() || !(t > 0.0 && t < 1.0))
        throw bad("threshold \"" + std::string(f.substr(1)) + "\": expected a number in (0, 1)");
      if (c.grid == TernaryGrid::TQ) throw bad("ternary-tq has llama.cpp's fixed rounding, no threshold");
      c.threshold = t;
    } else {
      throw bad("unknown option \"" + std::string(f) + "\" (allowed: gN, row, sym, asym" +
                (tern ? ", refit, refitK, tX)" : ")"));
    }
  }
  if (c.grid == TernaryGrid::TQ && tern) {
    if (c.group != 256) throw bad("ternary-tq uses groups of 256 (llama.cpp's TQ1_0/TQ2_0 block)");
    if (!c.symmetric) throw bad("ternary-tq is symmetric (one f16 scale per 256 weights)");
  }
  return c;
}

std::string to_string(const CodecSpec& c) {
  if (c.kind == CodecSpec::Kind::Ggml) return ggml_type_info(c.ggml).name;
  std::string s;
  if (c.kind == CodecSpec::Kind::Int) s = "int" + std::to_string(c.bits);
  else s = std::string("ternary-") + grid_name(c.grid);
  s += c.group == 0 ? ":row" : ":g" + std::to_string(c.group);
  s += c.symmetric ? ":sym" : ":asym";
  if (c.refit_iters > 0) s += c.refit_iters == kDefaultRefitIters ? ":refit" : ":refit" + std::to_string(c.refit_iters);
  if (c.kind == CodecSpec::Kind::Ternary && c.threshold != 0.5) {
    char buf[64];
    auto [p, ec] = std::to_chars(buf, buf + sizeof(buf), c.threshold);
    s += ":t" + std::string(buf, p);
  }
  return s;
}

bool operator==(const CodecSpec& a, const CodecSpec& b) {
  return a.kind == b.kind && a.bits == b.bits && a.group == b.group && a.symmetric == b.symmetric &&
         a.grid == b.grid && a.threshold == b.threshold && a.refit_iters == b.refit_iters &&
         (a.kind != CodecSpec::Kind::Ggml || a.ggml == b.ggml);
}

double bits_per_param(const CodecSpec& c, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0.0;
  double per_row;
  if (c.kind == CodecSpec::Kind::Ggml) {
    per_row = 8.0 * static_cast<double>(ggml_row_bytes(c.ggml, cols));
  } else if (c.kind == CodecSpec::Kind::Int) {
    const int64_t ng = IntN::num_groups(c.group, cols);
    per_row = 8.0 * IntN::row_bytes(c.bits, cols) + 16.0 * ng + (c.symmetric ? 0.0 : 8.0 * ng);
  } else {
    const int64_t ng = Ternary::num_groups(c.group, cols);
    per_row = 8.0 * Ternary::row_bytes(cols) + 16.0 * ng * (c.symmetric ? 1 : 2);
  }
  return per_row / static_cast<double>(cols);
}

namespace {

void check_finite(const float* W, int64_t rows, int64_t cols) {
  const int64_t bad = core::first_non_finite(DType::F32, W, static_cast<size_t>(rows * cols));
  if (bad >= 0)
    throw Error::invalid("weight [" + std::to_string(bad / cols) + ", " + std::to_string(bad % cols) + "] is not finite");
}

std::shared_ptr<const core::Encoding> rtn_int(const float* W, int64_t rows, int64_t cols, const CodecSpec& c) {
  const int64_t ng = IntN::num_groups(c.group, cols), gl = c.group == 0 ? cols : c.group;
  const int64_t rb = IntN::row_bytes(c.bits, cols);
  const int maxq = (1 << c.bits) - 1;
  auto codes = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U8, {rows, rb}));
  std::vector<float> scales(static_cast<size_t>(rows * ng));
  std::vector<uint8_t> zeros(c.symmetric ? 0 : static_cast<size_t>(rows * ng));
  std::vector<uint8_t> q(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = W + r * cols;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j0 = g * gl, j1 = std::min(cols, j0 + gl);
      const IntParams p = int_params(x + j0, j1 - j0, 1, c.bits, c.symmetric);
      scales[r * ng + g] = p.scale;
      if (!c.symmetric) zeros[r * ng + g] = static_cast<uint8_t>(p.zero);
      int_codes(x + j0, j1 - j0, p.scale, p.zero, maxq, q.data() + j0);
    }
    pack_bits(q.data(), cols, c.bits, codes->mutable_data() + r * rb);
  }
  auto st = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::F16, {rows, ng}));
  core::from_f32(DType::F16, scales.data(), st->mutable_data(), scales.size());
  std::shared_ptr<const core::Tensor> zt;
  if (!c.symmetric) {
    auto z = std::make_shared<core::Tensor>(core::Tensor::zeros(DType::U8, {rows, ng}));
    std::copy(zeros.begin(), zeros.end(), z->mutable_data());
    zt = z;
  }
  return std::make_shared<const IntN>(c.bits, c.group, c.symmetric, cols, codes, st, zt);
}

// Rows encoded as export --type encodes them (encode_row: scales, then the nearest codes).
std::shared_ptr<const core::Encoding> rtn_ggml(const float* W, int64_t rows, int64_t cols, GgmlType t) {
  const int64_t rb = static_cast<int64_t>(ggml_row_bytes(t, cols));
  core::Tensor bytes = core::Tensor::zeros(DType::U8, {rows, rb});
  for (int64_t r = 0; r < rows; ++r) encode_row(t, W + r * cols, cols, bytes.mutable_data() + r * rb);
  return std::make_shared<const GgufBlocks>(t, cols, std::move(bytes), /*stored=*/true);
}

double group_sse(const float* x, int64_t n, const uint8_t* t, const TernaryLevels& l) {
  const double level[3] = {0.0, l.lo, l.hi};  // indexed by the trit: no branches on random trits
  double e = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = x[j] - level[t[j]];
    e += d * d;
  }
  return e;
}

// Least-squares levels for fixed trits, unweighted (RTN refit): see codec.h.
TernaryLevels ls_levels(const float* x, int64_t n, const uint8_t* t, const TernaryLevels& cur, TernaryGrid grid,
                        bool symmetric) {
  double sum[3] = {0, 0, 0};
  int64_t count[3] = {0, 0, 0};
  for (int64_t j = 0; j < n; ++j) {
    sum[t[j]] += x[j];
    ++count[t[j]];
  }
  const double s1 = sum[1], s2 = sum[2];
  const int64_t n1 = count[1], n2 = count[2];
  if (symmetric) {
    if (n1 + n2 == 0) return cur;
    return ternary_fixed(0.0, (s2 - s1) / static_cast<double>(n1 + n2), grid, true);
  }
  return ternary_fixed(n1 ? s1 / static_cast<double>(n1) : cur.lo, n2 ? s2 / static_cast<double>(n2) : cur.hi, grid, false);
}

std::shared_ptr<const core::Encoding> rtn_ternary(const float* W, int64_t rows, int64_t cols, const CodecSpec& c) {
  const int64_t ng = Ternary::num_groups(c.group, cols), gl = c.group == 0 ? cols : c.group;
  std::vector<uint8_t> trits(static_cast<size_t>(rows * cols)), cand(static_cast<size_t>(gl));
  std::vector<float> lo(static_cast<size_t>(rows * ng)), hi(lo.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j0 = g * gl, n = std::min(cols, j0 + gl) - j0;
      const float* x = W + r * cols + j0;
      uint8_t* t = trits.data() + r * cols + j0;
      TernaryLevels l = ternary_levels(x, n, 1, c.grid, c.symmetric);
      ternary_codes(x, n, l, c.grid, c.threshold, t);
      if (c.refit_iters > 0) {
        double best = group_sse(x, n, t, l);
        TernaryLevels cur = l;
        uint8_t* ct = cand.data();
        std::copy(t, t + n, ct);
        for (int it = 0; it < c.refit_iters; ++it) {
          cur = ls_levels(x, n, ct, cur, c.grid, c.symmetric);
          ternary_codes(x, n, cur, c.grid, c.threshold, ct);
          const double e = group_sse(x, n, ct, cur);
          if (!(e < best)) break;
          best = e;
          l = cur;
          std::copy(ct, ct + n, t);
        }
      }
      lo[r * ng + g] = l.lo;
      hi[r * ng + g] = l.hi;
    }
  }
  return Ternary::pack(c.grid, c.group, c.symmetric, rows, cols, trits.data(), lo.data(), hi.data());
}

}  // namespace

std::shared_ptr<const core::Encoding> rtn(const float* W, int64_t rows, int64_t cols, const CodecSpec& c) {
  if (rows < 0 || cols < 0) throw Error::internal("rtn: negative shape");
  check_finite(W, rows, cols);
  if (c.kind == CodecSpec::Kind::Ggml) return rtn_ggml(W, rows, cols, c.ggml);
  if (c.kind == CodecSpec::Kind::Int) return rtn_int(W, rows, cols, c);
  return rtn_ternary(W, rows, cols, c);
}

}  // namespace moe::quant
