// Helpers for the runtime tests: open a checkpoint folder as a Model, read golden JSON.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "io/checkpoint.h"
#include "io/env.h"
#include "core/error.h"
#include "model/model.h"
#include "runtime/forward.h"

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

// A matrix of normal(0, scale) values drawn from g.
inline runtime::MatrixRM random_matrix(int64_t r, int64_t c, std::mt19937& g, float scale = 0.2f) {
  std::normal_distribution<float> d(0.0f, scale);
  runtime::MatrixRM m(r, c);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = d(g);
  return m;
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

// The message of the Error::unsupported that building a Forward on the checkpoint in `dir` throws
// (a test failure, and "", when it builds or throws another kind).
inline std::string forward_refusal(const std::filesystem::path& dir) {
  auto lm = load_model(dir);
  try {
    runtime::Forward fwd(lm->model);
  } catch (const core::Error& e) {
    EXPECT_EQ(e.kind(), core::ErrorKind::NotSupported) << e.message();
    return e.message();
  }
  ADD_FAILURE() << dir.string() << ": expected Error::unsupported building the forward";
  return "";
}

}  // namespace moe::test
