#include "io/output_dir.h"

#include <unistd.h>

#include "core/error.h"

namespace moe::io {

using core::Error;

namespace {

// Absolute, normalised path that resolves symlinks of the existing prefix.
fs::path resolved(const fs::path& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p, ec), ec);
  if (ec) r = fs::absolute(p).lexically_normal();
  return r.has_filename() || !r.has_relative_path() ? r : r.parent_path();  // "out/" is the folder out
}

bool is_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

}  // namespace

OutputDir::OutputDir(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force)
    : env_(env), final_(std::move(final_path)) {
  if (final_.empty()) throw Error::invalid("output path is empty");
  const fs::path out = resolved(final_);
  for (const auto& in : inputs) {
    const fs::path r = resolved(in);
    if (out == r) throw Error::invalid(final_.string() + ": output is the input");
    if (is_within(out, r)) throw Error::invalid(final_.string() + ": output is inside the input " + in.string());
    if (is_within(r, out)) throw Error::invalid(final_.string() + ": output contains the input " + in.string());
  }
  std::error_code ec;
  if (fs::exists(final_, ec)) {
    if (!fs::is_directory(final_, ec)) throw Error::invalid(final_.string() + ": output exists and is not a folder");
    if (!fs::is_empty(final_, ec) && !force)
      throw Error::invalid(final_.string() + ": output folder exists and is not empty (use --force to replace it)");
  }
  const fs::path parent = out.parent_path();
  if (!fs::is_directory(parent, ec))
    throw Error::not_found(final_.string() + ": parent folder " + parent.string() + " does not exist");
  if (access(parent.c_str(), W_OK) != 0)
    throw Error::io(final_.string() + ": parent folder " + parent.string() + " is not writable");
  tmp_ = parent / ("." + out.filename().string() + ".moe-tool-tmp-" + std::to_string(getpid()));
  if (fs::exists(tmp_, ec)) env_.remove_all(tmp_);
  env_.create_dirs(tmp_);
}

OutputDir::~OutputDir() {
  if (!committed_) {
    try {
      env_.remove_all(tmp_);
    } catch (...) {
    }
  }
}

void OutputDir::commit() {
  std::error_code ec;
  if (fs::exists(final_, ec)) {
    // Replace: move the old folder aside, move the new one in, then delete the old one.
    fs::path old = tmp_;
    old += ".old";
    env_.rename(final_, old);
    try {
      env_.rename(tmp_, final_);
    } catch (...) {
      env_.rename(old, final_);
      throw;
    }
    env_.remove_all(old);
  } else {
    env_.rename(tmp_, final_);
  }
  committed_ = true;
}

}  // namespace moe::io
