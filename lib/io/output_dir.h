// Outputs built in a temporary sibling and renamed into place on commit(): a folder (OutputDir:
// checkpoints, plots) or a single file (OutputFile: statistics). The same rules for both:
// - an output may never be an input, inside an input folder, or contain an input;
// - an existing output needs `force` (an existing empty folder is reused without it);
// - the temporary is unique per process and call (NAME.moe-tool-tmp-PID-NONCE), removed when the
//   object dies without commit() and on SIGINT/SIGTERM/SIGHUP (io/temp_files.h); temporaries of
//   processes that are gone are removed when the next run writes to the same place;
// - commit() renames atomically and, without force, refuses to replace an output that appeared
//   meanwhile (another run): renameat2(RENAME_NOREPLACE).
#pragma once

#include <string>
#include <vector>

#include "io/env.h"

namespace moe::io {

enum class OutputKind { Folder, File };

// The checks of the constructors below without creating anything (what --dry-run runs).
// `force_name` is how the user spells the force option ("--force", "output.force").
void check_output(const fs::path& final_path, const std::vector<fs::path>& inputs, bool force, OutputKind kind,
                  const std::string& force_name = "--force");

class OutputDir {
 public:
  // `inputs`: folders/files that must not be overwritten. `force`: allow replacing a non-empty
  // existing output.
  OutputDir(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force,
            std::string force_name = "--force");
  OutputDir(const OutputDir&) = delete;
  OutputDir& operator=(const OutputDir&) = delete;
  ~OutputDir();

  // Where to write the files now.
  const fs::path& path() const { return tmp_; }
  const fs::path& final_path() const { return final_; }
  void commit();

 private:
  Env& env_;
  fs::path final_;
  fs::path tmp_;
  bool force_ = false;
  std::string force_name_;
  int slot_ = -1;
  bool committed_ = false;
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
  void commit();

 private:
  Env& env_;
  fs::path final_;
  fs::path tmp_;
  bool force_ = false;
  std::string force_name_;
  int slot_ = -1;
  bool committed_ = false;
};

}  // namespace moe::io
