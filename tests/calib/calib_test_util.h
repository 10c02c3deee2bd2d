// Helpers shared by the calibration tests: fixture paths, loading a model with its tokenized
// calibration text, scratch folders.
#pragma once

#include <gtest/gtest.h>

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
#include "support/synth.h"
#include "tokenizer/tokenizer.h"

namespace moe::calib::test {

namespace fs = std::filesystem;

inline fs::path source_dir() { return fs::path(MOE_SOURCE_DIR); }
inline fs::path calib_text() { return source_dir() / "data/text/calib.txt"; }

// Scratch folders and whole-file reads: the shared test helpers.
using moe::test::read_file;
using moe::test::TempDir;

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
