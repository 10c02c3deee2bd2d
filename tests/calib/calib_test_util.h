// Helpers shared by the calibration tests: fixture paths, loading a model with its tokenized
// calibration text, scratch folders.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "calib/calibrate.h"
#include "calib/sha256.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace moe::calib::test {

namespace fs = std::filesystem;

inline fs::path source_dir() { return fs::path(MOE_SOURCE_DIR); }
inline fs::path calib_text() { return source_dir() / "data/text/calib.txt"; }

inline std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("moe-calib-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

// A checkpoint, its Model view and the calibration text tokenized with its tokenizer.
struct Fixture {
  fs::path dir;
  io::Checkpoint ckpt;
  model::Model model;
  std::vector<int32_t> tokens;
  std::string text_sha;
  Fixture(const fs::path& d, const std::string& text)
      : dir(d),
        ckpt(io::Checkpoint::open(io::Env::posix(), d)),
        model(model::Model::load(ckpt)),
        tokens(tokenizer::Tokenizer::load(d).encode(text, false)),
        text_sha(sha256_hex(text)) {}
};

inline std::unique_ptr<Fixture> load_fixture(const fs::path& dir) {
  return std::make_unique<Fixture>(dir, read_file(calib_text()));
}

}  // namespace moe::calib::test
