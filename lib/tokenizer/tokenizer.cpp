#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/added_vocabulary.h"
#include "tokenizer/bpe.h"
#include "tokenizer/decoder.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/post_processor.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using core::Error;
using core::with_context;
using namespace json_fields;

struct Tokenizer::Impl {
  AddedVocabulary added;
  Normalizer normalizer;
  PreTokenizer pre_tokenizer;
  std::unique_ptr<BpeModel> model;
  PostProcessor post;
  Decoder decoder;
  std::optional<int32_t> bos, eos;
  size_t vocab_size = 0;

  std::optional<int32_t> token_to_id(std::string_view t) const {
    if (const AddedToken* a = added.find(t)) return a->id;
    return model->token_to_id(t);
  }
  const std::string* id_to_token(int32_t id) const {
    if (const AddedToken* a = added.find(id)) return &a->content;
    return model->id_to_token(id);
  }
};

namespace {

Json parse_json(std::string_view text) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::exception& e) {
    throw Error::corruption(std::string("invalid JSON: ") + e.what());
  }
}

// bos_token / eos_token in tokenizer_config.json: "text", {"content": "text", ...} or null.
std::optional<std::string> config_token(const Json& cfg, std::string_view key) {
  const Json* v = member(cfg, key);
  if (!v) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) return require_string(*v, "content", std::string(key));
  fail(std::string(key), std::string("expected a string or {\"content\": ...}, got ") + type_name(*v));
}

std::optional<bool> config_flag(const Json& cfg, std::string_view key) {
  const Json* v = member(cfg, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) fail(std::string(key), std::string("expected true or false, got ") + type_name(*v));
  return v->get<bool>();
}

// Applies tokenizer_config.json on top of tokenizer.json (as transformers' fast tokenizers do with
// add_bos_token / add_eos_token: the config decides whether BOS / EOS are added).
void apply_config(const Json& cfg, Tokenizer::Impl& t) {
  expect_object(cfg, "");
  for (const char* key : {"bos_token", "eos_token"}) {
    if (auto tok = config_token(cfg, key)) {
      const auto id = t.token_to_id(*tok);
      if (!id) fail(key, "\"" + *tok + "\" is not in the vocabulary");
      (key[0] == 'b' ? t.bos : t.eos) = *id;
    }
  }
  if (auto add_bos = config_flag(cfg, "add_bos_token")) {
    auto& pre = t.post.prefix;
    if (*add_bos) {
      if (!t.bos) fail("add_bos_token", "true, but no bos_token is defined");
      if (std::find(pre.begin(), pre.end(), *t.bos) == pre.end()) pre.insert(pre.begin(), *t.bos);
    } else if (t.bos) {
      pre.erase(std::remove(pre.begin(), pre.end(), *t.bos), pre.end());
    }
  }
  if (auto add_eos = config_flag(cfg, "add_eos_token")) {
    auto& suf = t.post.suffix;
    if (*add_eos) {
      if (!t.eos) fail("add_eos_token", "true, but no eos_token is defined");
      if (std::find(suf.begin(), suf.end(), *t.eos) == suf.end()) suf.push_back(*t.eos);
    } else if (t.eos) {
      suf.erase(std::remove(suf.begin(), suf.end(), *t.eos), suf.end());
    }
  }
}

std::shared_ptr<Tokenizer::Impl> build(std::string_view tokenizer_json, std::string_view config_json,
                                       const std::string& source, const std::string& config_source) {
  auto t = std::make_shared<Tokenizer::Impl>();
  with_context(source, [&] {
    const Json j = parse_json(tokenizer_json);
    expect_object(j, "");
    t->model = BpeModel::parse(require(j, "model", ""), "model");
    t->added = AddedVocabulary::parse(j.value("added_tokens", Json()), "added_tokens");
    t->normalizer = Normalizer::parse(j.value("normalizer", Json()), "normalizer");
    t->pre_tokenizer = PreTokenizer::parse(j.value("pre_tokenizer", Json()), "pre_tokenizer");
    t->post = PostProcessor::parse(j.value("post_processor", Json()), "post_processor");
    t->decoder = Decoder::parse(j.value("decoder", Json()), "decoder");
    t->added.prepare(t->normalizer);
    // Ids the post-processor emits must exist.
    for (const auto* list : {&t->post.prefix, &t->post.suffix}) {
      for (const int32_t id : *list) {
        if (!t->id_to_token(id)) {
          fail("post_processor", "token id " + std::to_string(id) + " is not in the vocabulary");
        }
      }
    }
  });
  size_t limit = t->model->id_limit();
  for (const AddedToken& a : t->added.tokens()) limit = std::max(limit, static_cast<size_t>(a.id) + 1);
  t->vocab_size = limit;
  // Without a config, BOS / EOS are whatever the post-processor puts around the text.
  if (!t->post.prefix.empty()) t->bos = t->post.prefix.front();
  if (!t->post.suffix.empty()) t->eos = t->post.suffix.back();
  if (!config_json.empty()) {
    with_context(config_source, [&] { apply_config(parse_json(config_json), *t); });
  }
  return t;
}

std::string read_file(const std::filesystem::path& p) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(p, ec)) {
    throw Error::not_found(p.string() + ": no such file");
  }
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (!in.good() && !in.eof()) throw Error::io(p.string() + ": read failed");
  return ss.str();
}

}  // namespace

Tokenizer Tokenizer::load(const std::filesystem::path& dir) {
  const auto tj_path = dir / "tokenizer.json";
  const auto cfg_path = dir / "tokenizer_config.json";
  const std::string tj = read_file(tj_path);
  std::string cfg;
  std::error_code ec;
  if (std::filesystem::exists(cfg_path, ec)) cfg = read_file(cfg_path);
  return Tokenizer(build(tj, cfg, tj_path.string(), cfg_path.string()));
}

Tokenizer Tokenizer::from_json_text(std::string_view tokenizer_json, std::string_view config_json,
                                    const std::string& source, const std::string& config_source) {
  return Tokenizer(build(tokenizer_json, config_json, source, config_source));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
  const Impl& t = *impl_;
  std::vector<Piece> pieces(1);
  // PCRE2 (and every later stage) needs valid UTF-8: invalid sequences become U+FFFD.
  if (is_valid_utf8(text)) pieces[0].text.assign(text);
  else pieces[0].text = repair_utf8(text);
  pieces[0].at_origin = true;

  t.added.split(pieces, /*normalized_pass=*/false, parse_special);
  if (!t.normalizer.empty()) {
    for (Piece& p : pieces) {
      if (p.id < 0) t.normalizer.apply(p);
    }
  }
  t.added.split(pieces, /*normalized_pass=*/true, parse_special);
  t.pre_tokenizer.apply(pieces);

  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  if (add_special) ids.insert(ids.end(), t.post.prefix.begin(), t.post.prefix.end());
  for (const Piece& p : pieces) {
    if (p.id >= 0) ids.push_back(p.id);
    else t.model->encode_word(p.text, ids);
  }
  if (add_special) ids.insert(ids.end(), t.post.suffix.begin(), t.post.suffix.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& t = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    if (skip_special) {
      if (const AddedToken* a = t.added.find(id); a && a->special) continue;
    }
    const std::string* tok = t.id_to_token(id);
    if (!tok) throw Error::invalid("token id " + std::to_string(id) + " is not in the vocabulary");
    tokens.push_back(*tok);
  }
  return t.decoder.decode(std::move(tokens));
}

size_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }

bool Tokenizer::adds_bos() const {
  const auto& pre = impl_->post.prefix;
  return impl_->bos && !pre.empty() && pre.front() == *impl_->bos;
}

bool Tokenizer::adds_eos() const {
  const auto& suf = impl_->post.suffix;
  return impl_->eos && !suf.empty() && suf.back() == *impl_->eos;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  return impl_->token_to_id(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* tok = impl_->id_to_token(id);
  if (!tok) throw Error::invalid("token id " + std::to_string(id) + " is not in the vocabulary");
  return *tok;
}

bool Tokenizer::is_special(int32_t id) const {
  const AddedToken* a = impl_->added.find(id);
  return a && a->special;
}

std::vector<std::string> Tokenizer::special_tokens() const {
  std::vector<std::string> v;
  for (const AddedToken& a : impl_->added.tokens())
    if (a.special && !a.content.empty()) v.push_back(a.content);
  return v;
}

}  // namespace moe::tokenizer
