// Outputs built in a temporary sibling and renamed into place on commit(): a folder (OutputDir:
// checkpoints, plots) or a single file (OutputFile: statistics). The same rules for both
// (docs/outputs.md):
// - an output may never be an input, inside an input folder, or contain an input; the inputs are
//   compared after following symbolic links, and a link inside an input folder (a shard kept in a
//   cache elsewhere) makes its target an input too;
// - the output is written THROUGH symbolic links: an output path that is a link (or has a link in
//   its parent path) is written at the link's target and the link stays; a link whose target does
//   not exist is refused;
// - an existing output needs `force` (an existing empty folder is reused without it), and `force`
//   replaces only an earlier output of the tool: a folder holding the listing commit() writes
//   (kListingName) and nothing it does not list, a statistics file (safetensors whose metadata has
//   model_fingerprint) or a GGUF file (`export`; by its magic, as GGUF has no writer mark); anything
//   else is refused, naming why;
// - "." / ".." / the root, or a folder that holds the current folder, are never outputs;
// - missing parent folders are created when the writing starts (and removed again when the run
//   fails, if still empty); the nearest existing one must be a writable folder;
// - the temporary is unique per process and call (NAME.moe-tool-tmp-PID-NONCE), removed when the
//   object dies without commit() and on SIGINT/SIGTERM/SIGHUP (io/temp_files.h); temporaries of
//   processes that are gone are removed when the next run writes to the same place;
// - commit() renames atomically and, without force, refuses to replace an output that appeared
//   meanwhile (another run): renameat2(RENAME_NOREPLACE).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/env.h"

namespace moe::io {

enum class OutputKind { Folder, File };

// The listing OutputDir::commit() leaves in every output folder: the names it put there. `force`
// replaces a folder only when it holds this listing and nothing besides the names in it.
inline constexpr const char* kListingName = ".moe-tool-output.json";

// The checks of the constructors below without creating anything (what --dry-run runs).
// `force_name` is how the user spells the force option ("--force", "output.force").
// Throws Error::invalid (output is/in/around an input, exists without force, not an earlier output,
// names the current folder, a dangling link), Error::not_found / Error::io (no writable folder to
// create it in).
void check_output(const fs::path& final_path, const std::vector<fs::path>& inputs, bool force, OutputKind kind,
                  const std::string& force_name = "--force");

// Whether `path` is an earlier output of the tool of this kind (the marker `force` needs).
bool is_tool_output(const fs::path& path, OutputKind kind);

// Refuses (Error::io) an output of about `bytes` bytes that does not fit in the free space of the
// file system it goes to (the nearest existing folder of `final_path`, links followed). `what`
// names the output in the message ("OUT", "output.path").
void check_free_space(const fs::path& final_path, uint64_t bytes, const std::string& what);

// Bytes available to an unprivileged user on the file system of `final_path` (as check_free_space).
uint64_t free_space(const fs::path& final_path);

class OutputDir {
 public:
  // `inputs`: folders/files that must not be overwritten. `force`: allow replacing a non-empty
  // existing output that the tool wrote.
  OutputDir(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force,
            std::string force_name = "--force");
  OutputDir(const OutputDir&) = delete;
  OutputDir& operator=(const OutputDir&) = delete;
  ~OutputDir();

  // Where to write the files now.
  const fs::path& path() const { return tmp_; }
  // The path as given, and where it resolves to (symbolic links followed): what commit() replaces.
  const fs::path& final_path() const { return final_; }
  const fs::path& target() const { return target_; }
  void commit();

 private:
  Env& env_;
  fs::path final_, target_;
  fs::path tmp_;
  fs::path created_;  // the first parent folder this object created (removed on failure if empty)
  bool force_ = false;
  std::string force_name_;
  int slot_ = -1;
  bool committed_ = false;
};

// A temporary folder beside an output, `temp_name(dir, name)`, created now and registered for
// removal on SIGINT/SIGTERM/SIGHUP (io/temp_files.h); removed by remove() or when the object dies.
// The export formats stage the native checkpoint they convert in one (pipeline/sink.h).
class StagingFolder {
 public:
  StagingFolder(Env& env, const fs::path& dir, const std::string& name);
  StagingFolder(const StagingFolder&) = delete;
  StagingFolder& operator=(const StagingFolder&) = delete;
  ~StagingFolder() { remove(); }

  const fs::path& path() const { return path_; }
  // Removes the folder and everything in it (errors ignored); idempotent.
  void remove() noexcept;

 private:
  Env& env_;
  fs::path path_;
  int slot_ = -1;
};

class OutputFile {
 public:
  OutputFile(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force,
             std::string force_name = "--force");
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  ~OutputFile();

  // Where to write the file now (a sibling of the final path).
  const fs::path& path() const { return tmp_; }
  const fs::path& final_path() const { return final_; }
  const fs::path& target() const { return target_; }
  void commit();

 private:
  Env& env_;
  fs::path final_, target_;
  fs::path tmp_;
  fs::path created_;
  bool force_ = false;
  std::string force_name_;
  int slot_ = -1;
  bool committed_ = false;
};

}  // namespace moe::io
