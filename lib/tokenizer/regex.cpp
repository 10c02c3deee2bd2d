#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace moe::tokenizer {

using core::Error;

struct Regex::Code {
  std::string pattern;
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

namespace {

// Per-thread match state: one match-data block (we only read group 0) and a JIT stack large
// enough for long whitespace runs under patterns like `\s+(?!\S)`.
struct MatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  MatchState() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (context && jit_stack) pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchState() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchState(const MatchState&) = delete;
  MatchState& operator=(const MatchState&) = delete;
};

MatchState& match_state() {
  thread_local MatchState state;
  if (!state.data || !state.context) throw Error::internal("PCRE2: out of memory");
  return state;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  const int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? "error " + std::to_string(code) : std::string(reinterpret_cast<char*>(buf));
}

// PCRE2's \s (with UCP) also matches U+180E MONGOLIAN VOWEL SEPARATOR, which left Unicode's
// White_Space property in Unicode 6.3; Oniguruma, Rust's regex and Python's `regex` follow
// White_Space. So \s and \S are rewritten to \p{White_Space} / \P{White_Space} (both also work
// inside [...] classes). Other escapes, including \\ and \Q...\E literal runs, are copied as is.
std::string with_white_space_property(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  bool quoted = false;  // inside \Q ... \E, where only \E is special
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    const char e = i + 1 < pattern.size() ? pattern[i + 1] : '\0';
    if (quoted) {
      out.push_back(c);
      if (c == '\\' && e == 'E') {
        out.push_back(e);
        ++i;
        quoted = false;
      }
      continue;
    }
    if (c != '\\' || e == '\0') {
      out.push_back(c);
      continue;
    }
    ++i;
    if (e == 's') {
      out += "\\p{White_Space}";
    } else if (e == 'S') {
      out += "\\P{White_Space}";
    } else {
      quoted = e == 'Q';
      out.push_back('\\');
      out.push_back(e);
    }
  }
  return out;
}

std::shared_ptr<const Regex::Code> compile_code(std::string_view pattern, std::string_view source,
                                                uint32_t options) {
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  auto code = std::make_shared<Regex::Code>();
  code->pattern = std::string(source);
  if (!is_valid_utf8(pattern)) {
    throw Error::corruption("regex \"" + code->pattern + "\": pattern is not valid UTF-8");
  }
  code->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                             options, &err, &err_offset,
                             nullptr);
  if (!code->code) {
    throw Error::corruption("regex \"" + code->pattern + "\": " + pcre2_message(err) +
                            " at offset " + std::to_string(err_offset));
  }
  // JIT is an optimisation only: if unavailable (or it fails), pcre2_match interprets.
  (void)pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE);
  return code;
}

// One match attempt; returns false on no match, throws on matcher errors (e.g. resource limits).
bool match_once(const Regex::Code& code, std::string_view subject, size_t start, uint32_t options,
                Span& out) {
  MatchState& st = match_state();
  const int rc = pcre2_match(code.code, reinterpret_cast<PCRE2_SPTR>(subject.data()),
                             subject.size(), start, options | PCRE2_NO_UTF_CHECK, st.data,
                             st.context);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  // rc == 0 means "ovector too small" (we only asked for group 0): still a match.
  if (rc < 0) {
    throw Error::unsupported("regex \"" + code.pattern + "\": matching failed: " +
                             pcre2_message(rc));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
  out.begin = ov[0];
  out.end = ov[1];
  return true;
}

}  // namespace

Regex Regex::compile(std::string_view pattern) {
  return Regex(compile_code(with_white_space_property(pattern), pattern,
                            PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE));
}

Regex Regex::literal(std::string_view text) {
  // PCRE2_LITERAL admits only a few other options (UCP and MULTILINE are meaningless here).
  return Regex(compile_code(text, text, PCRE2_UTF | PCRE2_LITERAL));
}

const std::string& Regex::pattern() const { return code_->pattern; }

void Regex::find_all(std::string_view subject, std::vector<Span>& out) const {
  // PCRE2_NO_UTF_CHECK is passed on every call (otherwise each call re-validates the whole
  // subject, which is quadratic); validate once here instead.
  if (!is_valid_utf8(subject)) {
    throw Error::internal("regex \"" + code_->pattern + "\": subject is not valid UTF-8");
  }
  // Iterate as HF's SysRegex (onig) find_iter: search from the end of the previous match; an
  // empty match exactly at the previous match's end is skipped by moving one character on.
  size_t start = 0;
  bool have_previous = false;
  size_t previous_end = 0;
  while (start <= subject.size()) {
    Span m;
    if (!match_once(*code_, subject, start, 0, m)) break;
    if (m.begin == m.end && have_previous && m.end == previous_end) {
      if (start >= subject.size()) break;
      start += utf8_length_from_lead(static_cast<unsigned char>(subject[start]));
      continue;
    }
    out.push_back(m);
    start = m.end;
    have_previous = true;
    previous_end = m.end;
  }
}

bool Regex::matches_at(std::string_view subject, size_t offset) const {
  Span m;
  return offset <= subject.size() && match_once(*code_, subject, offset, PCRE2_ANCHORED, m);
}

}  // namespace moe::tokenizer
