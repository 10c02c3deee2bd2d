// The upcycle plan: the dense sources opened and checked, and everything decided before the first
// tensor is made (target family, dimensions, expert width, routers from prompts, co-activation
// features). Internal to passes/upcycle/; the public interface is passes/upcycle.h.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/env.h"
#include "family/family.h"
#include "model/model.h"
#include "passes/hungarian.h"  // MatrixXdRM
#include "passes/upcycle.h"

namespace moe::passes::upcycling {

// The methods, in the order passes/passes.def lists them (their one spelling).
const std::vector<std::string>& methods();

struct Source {
  std::filesystem::path dir;
  std::unique_ptr<io::Checkpoint> ckpt;
  std::unique_ptr<model::Model> model;
};

// Everything decided before the first byte is written.
struct Plan {
  UpcycleOptions o;
  std::vector<Source> src;
  const model::FamilyDesc* target = nullptr;
  int64_t L = 0, H = 0, I = 0, width = 0;  // width: expert width
  bool zero_qkv_bias = false;               // llama/mistral into qwen2_moe
  std::vector<std::vector<float>> routers;  // hidden/ridge: [L][E*H]
  std::vector<std::vector<MatrixXdRM>> coact;  // split coact: [source][layer] [I, tokens]
  nlohmann::json router_info;
};

inline const model::Model& first(const Plan& p) { return *p.src.front().model; }

bool has_role(const model::Model& m, const std::string& role);

// Opens the sources and runs every check that needs only their configs and shapes: the options'
// values, the target family against the source's attention, the numbers (E, k, G, widths), the
// sources against each other. Error::invalid naming the flag / file.
Plan make_plan(io::Env& env, const std::filesystem::path& model_dir, const UpcycleOptions& opts);

}  // namespace moe::passes::upcycling
