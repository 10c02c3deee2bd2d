#include "io/output_dir.h"

#include <unistd.h>

#include <cstdio>

#include "core/error.h"
#include "core/progress.h"
#include "io/temp_files.h"

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

// The folder the temporary goes to, and the output's own name.
std::pair<fs::path, std::string> place(const fs::path& final_path) {
  const fs::path out = resolved(final_path);
  return {out.parent_path(), out.filename().string()};
}

// Removes temporaries left by runs that died (kill -9) next to this output, and says so.
void clean_stale(const fs::path& dir, const std::string& name) {
  for (const auto& p : remove_stale_temps(dir, temp_prefix(name)))
    if (!core::Progress::global_quiet())
      std::fprintf(stderr, "moe-tool: removed %s, left by an interrupted run\n", p.string().c_str());
}

}  // namespace

void check_output(const fs::path& final_path, const std::vector<fs::path>& inputs, bool force, OutputKind kind,
                  const std::string& force_name) {
  const fs::path& f = final_path;
  if (f.empty()) throw Error::invalid("output path is empty");
  const fs::path out = resolved(f);
  for (const auto& in : inputs) {
    if (in.empty()) continue;
    const fs::path r = resolved(in);
    if (out == r) throw Error::invalid(f.string() + ": output is the input");
    if (is_within(out, r)) throw Error::invalid(f.string() + ": output is inside the input " + in.string());
    if (is_within(r, out)) throw Error::invalid(f.string() + ": output contains the input " + in.string());
  }
  std::error_code ec;
  if (fs::exists(f, ec)) {
    if (kind == OutputKind::Folder) {
      if (!fs::is_directory(f, ec)) throw Error::invalid(f.string() + ": output exists and is not a folder");
      if (!fs::is_empty(f, ec) && !force)
        throw Error::invalid(f.string() + ": output folder exists and is not empty (use " + force_name +
                             " to replace it)");
    } else {
      if (fs::is_directory(f, ec)) throw Error::invalid(f.string() + ": output is a folder, expected a file");
      if (!force) throw Error::invalid(f.string() + ": output file exists (use " + force_name + " to replace it)");
    }
  }
  const fs::path parent = out.parent_path();
  if (!fs::is_directory(parent, ec))
    throw Error::not_found(f.string() + ": parent folder " + parent.string() + " does not exist");
  if (access(parent.c_str(), W_OK) != 0)
    throw Error::io(f.string() + ": parent folder " + parent.string() + " is not writable");
}

OutputDir::OutputDir(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force,
                     std::string force_name)
    : env_(env), final_(std::move(final_path)), force_(force), force_name_(std::move(force_name)) {
  check_output(final_, inputs, force, OutputKind::Folder, force_name_);
  const auto [dir, name] = place(final_);
  clean_stale(dir, name);
  tmp_ = temp_name(dir, name);
  slot_ = register_temp(tmp_);
  try {
    env_.create_dirs(tmp_);
  } catch (...) {
    unregister_temp(slot_);
    throw;
  }
}

OutputDir::~OutputDir() {
  if (!committed_) {
    try {
      env_.remove_all(tmp_);
    } catch (...) {
    }
  }
  unregister_temp(slot_);
}

void OutputDir::commit() {
  std::error_code ec;
  if (force_ && fs::exists(final_, ec)) {
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
    committed_ = true;
    env_.remove_all(old);
    return;
  }
  if (!env_.rename_noreplace(tmp_, final_)) {
    // An empty folder that was there at the start may be replaced without force.
    if (fs::is_directory(final_, ec) && fs::is_empty(final_, ec) && fs::remove(final_, ec) &&
        env_.rename_noreplace(tmp_, final_)) {
      committed_ = true;
      return;
    }
    throw Error::invalid(final_.string() + ": output appeared while this run was writing (another run?); nothing "
                         "replaced (use " + force_name_ + " to replace it)");
  }
  committed_ = true;
}

OutputFile::OutputFile(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force,
                       std::string force_name)
    : env_(env), final_(std::move(final_path)), force_(force), force_name_(std::move(force_name)) {
  check_output(final_, inputs, force, OutputKind::File, force_name_);
  const auto [dir, name] = place(final_);
  clean_stale(dir, name);
  tmp_ = temp_name(dir, name);
  slot_ = register_temp(tmp_);
}

OutputFile::~OutputFile() {
  if (!committed_) {
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
  unregister_temp(slot_);
}

void OutputFile::commit() {
  if (force_) {
    std::error_code ec;
    if (fs::is_directory(final_, ec)) throw Error::invalid(final_.string() + ": output is a folder, expected a file");
    env_.rename(tmp_, final_);  // atomic replace
  } else if (!env_.rename_noreplace(tmp_, final_)) {
    throw Error::invalid(final_.string() + ": output appeared while this run was writing (another run?); nothing "
                         "replaced (use " + force_name_ + " to replace it)");
  }
  committed_ = true;
}

}  // namespace moe::io
