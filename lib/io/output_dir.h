// An output folder built in a temporary sibling and renamed into place on commit(). If the
// process fails before commit(), the temporary folder is removed and any existing output is left
// untouched. Refuses outputs that are the input, inside it, or contain it.
#pragma once

#include <string>
#include <vector>

#include "io/env.h"

namespace moe::io {

class OutputDir {
 public:
  // `inputs`: folders/files that must not be overwritten. `force`: allow replacing a non-empty
  // existing output.
  OutputDir(Env& env, fs::path final_path, const std::vector<fs::path>& inputs, bool force);
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
  bool committed_ = false;
};

}  // namespace moe::io
