// Helpers for the runtime tests: open a checkpoint folder as a Model, read golden JSON.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "io/checkpoint.h"
#include "io/env.h"
#include "model/model.h"

namespace moe::test {

inline std::filesystem::path source_dir() { return MOE_SOURCE_DIR; }

struct LoadedModel {
  io::Checkpoint ckpt;
  model::Model model;
};

inline std::unique_ptr<LoadedModel> load_model(const std::filesystem::path& dir) {
  auto ck = io::Checkpoint::open(io::Env::posix(), dir);
  auto m = model::Model::load(ck);
  return std::unique_ptr<LoadedModel>(new LoadedModel{std::move(ck), std::move(m)});
}

// Reads a JSON file; a missing file is a test FAILURE (not a skip) naming it.
inline nlohmann::json read_json_or_fail(const std::filesystem::path& p) {
  std::ifstream f(p);
  if (!f) {
    ADD_FAILURE() << "missing golden file " << p.string();
    return nullptr;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  return nlohmann::json::parse(ss.str());
}

}  // namespace moe::test
