#include "io/output_dir.h"

#include <sys/statvfs.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "core/progress.h"
#include "io/safetensors.h"
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

// The nearest folder of `p` (resolved) that exists: where missing parents would be created.
fs::path nearest_existing(const fs::path& p) {
  std::error_code ec;
  fs::path a = p;
  while (!fs::exists(a, ec) && a.has_relative_path()) a = a.parent_path();
  return a;
}

// What a run reads, to compare with the output: each input resolved, and the targets of the
// symbolic links inside an input folder (a checkpoint whose shards live in a cache elsewhere).
std::vector<std::pair<fs::path, std::string>> input_places(const std::vector<fs::path>& inputs) {
  std::vector<std::pair<fs::path, std::string>> v;
  for (const auto& in : inputs) {
    if (in.empty()) continue;
    v.emplace_back(resolved(in), in.string());
    std::error_code ec;
    if (!fs::is_directory(in, ec)) continue;
    for (fs::directory_iterator it(in, ec), end; !ec && it != end; it.increment(ec))
      if (it->is_symlink(ec))
        v.emplace_back(resolved(it->path()), in.string() + " (its link " + it->path().filename().string() + " points to " +
                                                 resolved(it->path()).string() + ")");
  }
  return v;
}

// Throws unless the existing output `f` may be replaced with force; messages name it `shown`.
void check_replaceable(const fs::path& f, const fs::path& shown, OutputKind kind, const std::string& force_name) {
  std::error_code ec;
  const std::string tail = force_name + " replaces only an earlier output of moe-tool; remove it yourself or choose "
                                        "another output";
  if (kind == OutputKind::File) {
    if (!is_tool_output(f, kind))
      throw Error::invalid(shown.string() + ": output file exists and is neither a statistics file written by moe-tool "
                           "(model_fingerprint in its safetensors metadata) nor a GGUF file: " + tail);
    return;
  }
  if (fs::is_empty(f, ec)) return;
  if (!is_tool_output(f, kind))
    throw Error::invalid(shown.string() + ": output folder exists and was not written by moe-tool (no " + kListingName +
                         " in it): " + tail);
  std::set<std::string> ours;
  try {
    const auto j = nlohmann::json::parse(Env::posix().read_text(f / kListingName));
    for (const auto& n : j.at("files")) ours.insert(n.get<std::string>());
  } catch (const std::exception&) {
    throw Error::invalid(shown.string() + ": " + kListingName + " is not the listing moe-tool writes: " + tail);
  }
  for (fs::directory_iterator it(f, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    if (n != kListingName && !ours.count(n))
      throw Error::invalid(shown.string() + ": output folder holds " + n + ", which moe-tool did not write there: " + force_name +
                           " would delete it; move it out of the folder first");
  }
}

// Removes temporaries left by runs that died (kill -9) next to this output, and says so.
void clean_stale(const fs::path& dir, const std::string& name) {
  for (const auto& p : remove_stale_temps(dir, temp_prefix(name)))
    if (!core::Progress::global_quiet())
      std::fprintf(stderr, "moe-tool: removed %s, left by an interrupted run\n", p.string().c_str());
}

// Creates the missing parent folders of `target`; returns the first one created (empty: none).
fs::path create_parents(Env& env, const fs::path& target) {
  const fs::path parent = target.parent_path();
  const fs::path have = nearest_existing(parent);
  if (have == parent) return {};
  fs::path first = have;
  auto rel = parent.lexically_relative(have);
  first /= *rel.begin();
  env.create_dirs(parent);
  return first;
}

// Removes the empty folders from `from` up to and including `top` (those create_parents made).
void remove_created(const fs::path& from, const fs::path& top) {
  if (top.empty()) return;
  std::error_code ec;
  for (fs::path p = from; is_within(p, top); p = p.parent_path()) {
    if (!fs::remove(p, ec)) return;  // not empty (or gone): leave it and everything above
    if (p == top) return;
  }
}

void write_listing(Env& env, const fs::path& dir) {
  nlohmann::json files = nlohmann::json::array();
  std::set<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) names.insert(it->path().filename().string());
  for (const auto& n : names) files.push_back(n);
  env.write_text(dir / kListingName, nlohmann::json{{"tool", "moe-tool"}, {"files", files}}.dump(1) + "\n");
}

}  // namespace

bool is_tool_output(const fs::path& path, OutputKind kind) {
  std::error_code ec;
  if (kind == OutputKind::Folder) return fs::is_regular_file(path / kListingName, ec);
  {  // a GGUF file (`export`): its magic
    char magic[4] = {};
    std::FILE* f = std::fopen(path.c_str(), "rb");
    const bool gguf = f && std::fread(magic, 1, 4, f) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
    if (f) std::fclose(f);
    if (gguf) return true;
  }
  try {
    const auto f = SafetensorsFile::open(Env::posix(), path);
    return f->header().metadata.count("model_fingerprint") > 0;
  } catch (const Error&) {
    return false;
  }
}

void check_output(const fs::path& final_path, const std::vector<fs::path>& inputs, bool force, OutputKind kind,
                  const std::string& force_name) {
  const fs::path& f = final_path;
  if (f.empty()) throw Error::invalid("output path is empty");
  const fs::path out = resolved(f);
  std::error_code ec;
  // A link (the output itself or a folder above it) whose target does not exist: the resolved
  // path stops at it.
  for (fs::path p = out; p.has_relative_path(); p = p.parent_path()) {
    if (fs::exists(p, ec)) break;
    if (fs::is_symlink(fs::symlink_status(p, ec)))
      throw Error::invalid(f.string() + ": " + p.string() + " is a symbolic link to " + fs::read_symlink(p, ec).string() +
                           ", which does not exist (the output is written through links, not over them)");
  }
  for (const auto& [r, name] : input_places(inputs)) {
    if (out == r) throw Error::invalid(f.string() + ": output is the input " + name);
    if (is_within(out, r)) throw Error::invalid(f.string() + ": output is inside the input " + name);
    if (is_within(r, out)) throw Error::invalid(f.string() + ": output contains the input " + name);
  }
  const fs::path cwd = resolved(fs::current_path(ec));
  if (!ec && is_within(cwd, out))
    throw Error::invalid(f.string() + ": output " + (cwd == out ? "is the current folder" : "contains the current folder") +
                         " (" + cwd.string() + "); name a folder to write, e.g. out/");
  if (fs::exists(out, ec)) {
    if (kind == OutputKind::Folder) {
      if (!fs::is_directory(out, ec)) throw Error::invalid(f.string() + ": output exists and is not a folder");
      if (!fs::is_empty(out, ec) && !force)
        throw Error::invalid(f.string() + ": output folder exists and is not empty (use " + force_name +
                             " to replace it)");
    } else {
      if (fs::is_directory(out, ec)) throw Error::invalid(f.string() + ": output is a folder, expected a file");
      if (!force) throw Error::invalid(f.string() + ": output file exists (use " + force_name + " to replace it)");
    }
    if (force) check_replaceable(out, f, kind, force_name);
  }
  const fs::path parent = out.parent_path();
  const fs::path have = nearest_existing(parent);
  if (!fs::is_directory(have, ec))
    throw Error::not_found(f.string() + ": parent folder " + parent.string() + " cannot be made: " + have.string() +
                           " is not a folder");
  if (access(have.c_str(), W_OK) != 0)
    throw Error::io(f.string() + ": " + (have == parent ? "parent folder " : "folder ") + have.string() + " is not writable");
}

uint64_t free_space(const fs::path& final_path) {
  const fs::path have = nearest_existing(resolved(final_path).parent_path());
  struct statvfs st {};
  if (statvfs(have.c_str(), &st) != 0) return UINT64_MAX;  // unknown: not ours to refuse
  return static_cast<uint64_t>(st.f_bavail) * static_cast<uint64_t>(st.f_frsize);
}

void check_free_space(const fs::path& final_path, uint64_t bytes, const std::string& what) {
  const uint64_t avail = free_space(final_path);
  if (bytes > avail)
    throw Error::io(what + " " + final_path.string() + ": the output needs about " +
                    core::format_bytes(static_cast<double>(bytes)) + ", the file system of " +
                    nearest_existing(resolved(final_path).parent_path()).string() + " has " +
                    core::format_bytes(static_cast<double>(avail)) + " free; nothing written");
}

OutputDir::OutputDir(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force,
                     std::string force_name)
    : env_(env), final_(std::move(final_path)), force_(force), force_name_(std::move(force_name)) {
  check_output(final_, inputs, force, OutputKind::Folder, force_name_);
  target_ = resolved(final_);
  created_ = create_parents(env_, target_);
  clean_stale(target_.parent_path(), target_.filename().string());
  tmp_ = temp_name(target_.parent_path(), target_.filename().string());
  slot_ = register_temp(tmp_);
  try {
    // Errors show the user's path, not the temporary sibling it is written as.
    core::with_path_shown(tmp_.string(), final_.string(), [&] { env_.create_dirs(tmp_); });
  } catch (...) {
    unregister_temp(slot_);
    remove_created(target_.parent_path(), created_);
    throw;
  }
}

OutputDir::~OutputDir() {
  if (!committed_) {
    try {
      env_.remove_all(tmp_);
    } catch (...) {
    }
    remove_created(target_.parent_path(), created_);
  }
  unregister_temp(slot_);
}

void OutputDir::commit() {
  write_listing(env_, tmp_);
  std::error_code ec;
  if (force_ && fs::exists(target_, ec)) {
    check_replaceable(target_, final_, OutputKind::Folder, force_name_);  // again: it may have changed while the run wrote
    // Replace: move the old folder aside, move the new one in, then delete the old one.
    fs::path old = tmp_;
    old += ".old";
    env_.rename(target_, old);
    try {
      env_.rename(tmp_, target_);
    } catch (...) {
      env_.rename(old, target_);
      throw;
    }
    committed_ = true;
    env_.remove_all(old);
    return;
  }
  if (!env_.rename_noreplace(tmp_, target_)) {
    // An empty folder that was there at the start may be replaced without force.
    if (fs::is_directory(target_, ec) && fs::is_empty(target_, ec) && fs::remove(target_, ec) &&
        env_.rename_noreplace(tmp_, target_)) {
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
  target_ = resolved(final_);
  created_ = create_parents(env_, target_);
  clean_stale(target_.parent_path(), target_.filename().string());
  tmp_ = temp_name(target_.parent_path(), target_.filename().string());
  slot_ = register_temp(tmp_);
}

StagingFolder::StagingFolder(Env& env, const fs::path& dir, const std::string& name)
    : env_(env), path_(temp_name(dir, name)) {
  env.create_dirs(path_);
  slot_ = register_temp(path_);
}

void StagingFolder::remove() noexcept {
  if (slot_ < 0) return;
  try {
    env_.remove_all(path_);
  } catch (...) {
  }
  unregister_temp(slot_);
  slot_ = -1;
}

OutputFile::~OutputFile() {
  if (!committed_) {
    std::error_code ec;
    fs::remove(tmp_, ec);
    remove_created(target_.parent_path(), created_);
  }
  unregister_temp(slot_);
}

void OutputFile::commit() {
  if (force_) {
    std::error_code ec;
    if (fs::is_directory(target_, ec)) throw Error::invalid(final_.string() + ": output is a folder, expected a file");
    if (fs::exists(target_, ec)) check_replaceable(target_, final_, OutputKind::File, force_name_);
    env_.rename(tmp_, target_);  // atomic replace
  } else if (!env_.rename_noreplace(tmp_, target_)) {
    throw Error::invalid(final_.string() + ": output appeared while this run was writing (another run?); nothing "
                         "replaced (use " + force_name_ + " to replace it)");
  }
  committed_ = true;
}

}  // namespace moe::io
