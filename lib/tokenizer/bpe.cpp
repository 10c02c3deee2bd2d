#include "tokenizer/bpe.h"

#include <algorithm>
#include <cstdio>
#include <queue>

#include "core/error.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using core::Error;
using namespace json_fields;

namespace {

// Largest id we accept in a vocabulary (the id -> token table is dense).
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;

std::string in_quotes(std::string_view s) { return "\"" + std::string(s) + "\""; }

}  // namespace

std::unique_ptr<BpeModel> BpeModel::parse(const nlohmann::json& j, const std::string& path) {
  expect_object(j, path);
  // Old files may omit "type"; HF then tries the models in turn, and a "merges" field means BPE.
  const auto type = optional_string(j, "type", path);
  if (type ? *type != "BPE" : !member(j, "merges")) {
    throw Error::unsupported(child(path, "type") + ": model type " +
                             (type ? in_quotes(*type) : std::string("(missing)")) +
                             " is not supported (only BPE)");
  }
  std::unique_ptr<BpeModel> m(new BpeModel());

  // vocab: {"token": id, ...}
  const std::string vp = child(path, "vocab");
  const Json& vocab = require(j, "vocab", path);
  if (!vocab.is_object()) fail(vp, std::string("expected an object, got ") + type_name(vocab));
  m->vocab_.reserve(vocab.size());
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) {
      fail(child(vp, in_quotes(it.key())), std::string("expected an integer id, got ") +
                                            type_name(it.value()));
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > kMaxTokenId) {
      fail(child(vp, in_quotes(it.key())), "id " + std::to_string(id) + " out of range");
    }
    m->vocab_.emplace(it.key(), static_cast<int32_t>(id));
    max_id = std::max(max_id, id);
  }
  m->by_id_.assign(static_cast<size_t>(max_id + 1), nullptr);
  for (const auto& [tok, id] : m->vocab_) {
    if (m->by_id_[id]) {
      fail(vp, "id " + std::to_string(id) + " used by both " + in_quotes(*m->by_id_[id]) + " and " +
                   in_quotes(tok));
    }
    m->by_id_[id] = &tok;
  }

  m->unk_token_ = optional_string(j, "unk_token", path);
  if (m->unk_token_) {
    if (auto id = m->token_to_id(*m->unk_token_)) {
      m->unk_id_ = *id;
    } else {
      fail(child(path, "unk_token"), in_quotes(*m->unk_token_) + " is not in the vocabulary");
    }
  }
  m->continuing_subword_prefix_ = optional_string(j, "continuing_subword_prefix", path).value_or("");
  m->end_of_word_suffix_ = optional_string(j, "end_of_word_suffix", path).value_or("");
  m->fuse_unk_ = optional_bool(j, "fuse_unk", false, path);
  m->byte_fallback_ = optional_bool(j, "byte_fallback", false, path);
  m->ignore_merges_ = optional_bool(j, "ignore_merges", false, path);
  // "dropout" only randomises training-time segmentation; encoding here is deterministic (as HF
  // with dropout unset), so a dropout value is accepted and not applied.
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    m->byte_ids_[b] = m->token_to_id(name).value_or(-1);
  }

  // merges: ["a b", ...] (older files) or [["a", "b"], ...] (newer). Rank = position; a later
  // duplicate of the same pair overrides the earlier one (HF collects them into a map).
  const std::string mp = child(path, "merges");
  const Json* merges = member(j, "merges");
  if (merges && !merges->is_array()) {
    fail(mp, std::string("expected an array, got ") + type_name(*merges));
  }
  const size_t prefix_len = m->continuing_subword_prefix_.size();
  if (merges) {
    m->merges_.reserve(merges->size() * 2);
    for (size_t i = 0; i < merges->size(); ++i) {
      const Json& e = (*merges)[i];
      std::string a, b;
      if (e.is_string()) {
        const std::string& s = e.get_ref<const std::string&>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || sp == 0 || sp + 1 == s.size()) {
          fail(child(mp, i), "expected \"a b\" string or [a,b] pair");
        }
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      } else {
        fail(child(mp, i), "expected \"a b\" string or [a,b] pair");
      }
      const auto a_id = m->token_to_id(a);
      if (!a_id) fail(child(mp, i), "token " + in_quotes(a) + " is not in the vocabulary");
      const auto b_id = m->token_to_id(b);
      if (!b_id) fail(child(mp, i), "token " + in_quotes(b) + " is not in the vocabulary");
      if (b.size() < prefix_len) {
        fail(child(mp, i), "token " + in_quotes(b) + " is shorter than continuing_subword_prefix");
      }
      const std::string merged = a + b.substr(prefix_len);
      const auto new_id = m->token_to_id(merged);
      if (!new_id) {
        fail(child(mp, i), "merged token " + in_quotes(merged) + " is not in the vocabulary");
      }
      m->merges_[pair_key(*a_id, *b_id)] = Merge{static_cast<int32_t>(i), *new_id};
    }
  }
  // Splitting long words before each "▁" changes nothing when "▁" is itself a token (so a run of
  // unknown characters never spans one) and no token has "▁" after its first character (so no
  // merge result can straddle one). True for SentencePiece vocabularies.
  m->split_at_metaspace_ = m->continuing_subword_prefix_.empty() &&
                           m->end_of_word_suffix_.empty() && m->token_to_id(kMetaspace);
  for (const auto& entry : m->vocab_) {
    if (!m->split_at_metaspace_) break;
    if (entry.first.find(kMetaspace, 1) != std::string::npos) m->split_at_metaspace_ = false;
  }
  return m;
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= by_id_.size()) return nullptr;
  return by_id_[id];
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto id = token_to_id(word)) {
      out.push_back(*id);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes && split_at_metaspace_) {
    // A SentencePiece-style text that reaches the model as one long word (Metaspace split=false,
    // or the legacy Prepend/Replace normalizer with no pre-tokenizer): no merge can join across
    // a "▁" (see split_at_metaspace_), so each "▁word" is merged separately, through the cache.
    size_t start = 0;
    for (size_t pos = word.find(kMetaspace, 1); pos != std::string_view::npos;
         pos = word.find(kMetaspace, pos + kMetaspace.size())) {
      encode_part(word.substr(start, pos - start), out);
      start = pos;
    }
    encode_part(word.substr(start), out);
    return;
  }
  encode_part(word, out);
}

void BpeModel::encode_part(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() > kMaxCachedWordBytes) {
    merge_word(word, out);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t mark = out.size();
  merge_word(word, out);
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_.size() >= kMaxCacheEntries) cache_.clear();
  cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + mark, out.end()));
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // Word::symbols: a doubly linked list over a vector; `len` 0 marks a symbol merged away.
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  const auto add = [&](int32_t id) {
    const int32_t n = static_cast<int32_t>(sym.size());
    sym.push_back({id, n - 1, n + 1, true});
  };

  // Characters -> initial symbols.
  int32_t pending_unk = -1;  // unk waiting to be emitted (fuse_unk accumulates here)
  std::string buf;
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    const size_t len = std::min(utf8_length_from_lead(static_cast<unsigned char>(word[pos])),
                                word.size() - pos);
    pos += len;
    std::string_view ch = word.substr(start, len);
    std::optional<int32_t> id;
    if (continuing_subword_prefix_.empty() && end_of_word_suffix_.empty()) {
      id = token_to_id(ch);
    } else {
      buf.clear();
      if (start > 0) buf += continuing_subword_prefix_;
      buf += ch;
      if (pos == word.size()) buf += end_of_word_suffix_;
      id = token_to_id(buf);
      ch = buf;
    }
    if (id) {
      if (pending_unk >= 0) {
        add(pending_unk);
        pending_unk = -1;
      }
      add(*id);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (const char c : ch) all &= byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        // As HF: byte tokens are added without flushing a pending unk first.
        for (const char c : ch) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
      pending_unk = *unk_id_;
    }
    // No unk token: the character is dropped (HF behaviour).
  }
  if (pending_unk >= 0) add(pending_unk);
  if (sym.empty()) return;
  sym.back().next = -1;

  // merge_all: min-heap on (rank, position).
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto lookup = [&](int32_t a, int32_t b) -> const Merge* {
    const auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i) {
    if (const Merge* mg = lookup(sym[i].id, sym[i + 1].id)) {
      queue.push({mg->rank, static_cast<int32_t>(i), mg->new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& cur = sym[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const int32_t next_pos = cur.next;
    // Skip stale entries: the pair here must still map to the merge this entry was made for.
    const Merge* mg = lookup(cur.id, sym[next_pos].id);
    if (!mg || mg->new_id != top.new_id) continue;
    cur.id = top.new_id;
    cur.next = sym[next_pos].next;
    sym[next_pos].alive = false;
    if (cur.next >= 0) sym[cur.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const Merge* m2 = lookup(sym[cur.prev].id, cur.id)) {
        queue.push({m2->rank, cur.prev, m2->new_id});
      }
    }
    if (cur.next >= 0) {
      if (const Merge* m2 = lookup(cur.id, sym[cur.next].id)) {
        queue.push({m2->rank, top.pos, m2->new_id});
      }
    }
  }
  for (int32_t i = 0; i >= 0 && i < static_cast<int32_t>(sym.size()); i = sym[i].next) {
    out.push_back(sym[i].id);
  }
}

}  // namespace moe::tokenizer
