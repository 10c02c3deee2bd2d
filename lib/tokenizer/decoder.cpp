#include "tokenizer/decoder.h"

#include <optional>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/replace.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using core::Error;
using namespace json_fields;

struct Decoder::Step {
  enum class Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string content;           // Strip, Metaspace (the char)
  ReplaceRule replace;           // Replace
  size_t start = 0, stop = 0;    // Strip
  bool drop_in_first = true;     // Metaspace: prepend_scheme != never
};

namespace {

using Tokens = std::vector<std::string>;

void parse_into(const Json& j, const std::string& path,
                std::vector<std::shared_ptr<const Decoder::Step>>& steps) {
  if (j.is_null()) return;
  expect_object(j, path);
  const std::string type = require_string(j, "type", path);
  using Kind = Decoder::Step::Kind;
  auto st = std::make_shared<Decoder::Step>();
  if (type == "Sequence") {
    const Json& list = require(j, "decoders", path);
    const std::string lp = child(path, "decoders");
    if (!list.is_array()) fail(lp, "expected an array");
    for (size_t i = 0; i < list.size(); ++i) parse_into(list[i], child(lp, i), steps);
    return;
  } else if (type == "ByteLevel") {
    st->kind = Kind::ByteLevel;
  } else if (type == "Replace") {
    st->kind = Kind::Replace;
    st->replace = ReplaceRule::parse(j, path);
  } else if (type == "ByteFallback") {
    st->kind = Kind::ByteFallback;
  } else if (type == "Fuse") {
    st->kind = Kind::Fuse;
  } else if (type == "Strip") {
    st->kind = Kind::Strip;
    st->content = require_string(j, "content", path);
    size_t pos = 0;
    if (st->content.empty() || !is_valid_utf8(st->content) ||
        (next_code_point(st->content, pos), pos != st->content.size())) {
      fail(child(path, "content"), "expected a single character");
    }
    const int64_t start = require_int(j, "start", path), stop = require_int(j, "stop", path);
    if (start < 0 || stop < 0) fail(path, "start and stop must be >= 0");
    st->start = static_cast<size_t>(start);
    st->stop = static_cast<size_t>(stop);
  } else if (type == "Metaspace") {
    st->kind = Kind::Metaspace;
    st->content = require_string(j, "replacement", path);
    std::string scheme = optional_string(j, "prepend_scheme", path).value_or("always");
    if (!optional_bool(j, "add_prefix_space", true, path)) scheme = "never";
    st->drop_in_first = scheme != "never";
  } else {
    throw Error::unsupported(child(path, "type") + ": decoder \"" + type +
                             "\" is not supported (supported: Sequence, ByteLevel, Replace, "
                             "ByteFallback, Fuse, Strip, Metaspace)");
  }
  steps.push_back(std::move(st));
}

// "<0xNN>" -> NN.
std::optional<uint8_t> parse_byte_token(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return std::nullopt;
  const auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<uint8_t>(hi * 16 + lo);
}

Tokens run_step(const Decoder::Step& st, Tokens tokens) {
  using Kind = Decoder::Step::Kind;
  switch (st.kind) {
    case Kind::ByteLevel: {
      // Every token is mapped back to bytes (a token with a character outside the mapping keeps
      // its own UTF-8 bytes); the whole byte string is decoded lossily into one piece.
      std::string bytes;
      for (const std::string& t : tokens) {
        if (!byte_level_decode_token(t, bytes)) bytes += t;
      }
      return Tokens{repair_utf8(bytes)};
    }
    case Kind::Replace:
      for (std::string& t : tokens) t = st.replace.apply(t);
      return tokens;
    case Kind::ByteFallback: {
      Tokens out;
      out.reserve(tokens.size());
      std::string pending;
      const auto flush = [&] {
        if (pending.empty()) return;
        if (is_valid_utf8(pending)) {
          out.push_back(pending);
        } else {
          for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
        }
        pending.clear();
      };
      for (std::string& t : tokens) {
        if (const auto b = parse_byte_token(t)) {
          pending.push_back(static_cast<char>(*b));
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      return out;
    }
    case Kind::Fuse: {
      std::string all;
      for (const std::string& t : tokens) all += t;
      return Tokens{std::move(all)};
    }
    case Kind::Strip:
      for (std::string& t : tokens) {
        // Count characters equal to `content` at each end, up to start / stop of them.
        size_t b = 0, cut = 0;
        while (cut < st.start && t.compare(b, st.content.size(), st.content) == 0) {
          b += st.content.size();
          ++cut;
        }
        size_t e = t.size();
        cut = 0;
        while (cut < st.stop && e >= b + st.content.size() &&
               t.compare(e - st.content.size(), st.content.size(), st.content) == 0) {
          e -= st.content.size();
          ++cut;
        }
        t = t.substr(b, e - b);
      }
      return tokens;
    case Kind::Metaspace:
      for (size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = replace_all(tokens[i], st.content,
                                (i == 0 && st.drop_in_first) ? std::string() : std::string(" "));
      }
      return tokens;
  }
  return tokens;
}

}  // namespace

Decoder Decoder::parse(const nlohmann::json& j, const std::string& path) {
  Decoder d;
  d.present_ = !j.is_null();
  parse_into(j, path, d.steps_);
  return d;
}

std::string Decoder::decode(std::vector<std::string> tokens) const {
  if (!present_) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i) out += ' ';
      out += tokens[i];
    }
    return out;
  }
  for (const auto& st : steps_) tokens = run_step(*st, std::move(tokens));
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

}  // namespace moe::tokenizer
