// Encoded inputs through every command (docs/encodings.md): every encoding the tool writes
// (intN, ternary, ternary-dict, lowrank; delta-ternary on the experts) on every tensor class it
// can write it on (routed experts, shared expert, shared-expert gate, dense MLP, attention,
// router, embeddings, lm_head), read by every pass and command. Each pass either handles the
// encoding — exit 0, a loadable output in which every weight the pass does not change keeps its
// encoding, and a warning line when it dequantizes one — or refuses it before any work; none
// crashes.
//
// The model is a synthetic qwen2_moe (layer 0 dense, layers 1-2 MoE with a shared expert and its
// gate, untied lm_head; hidden 32, 4 experts): each encoded input is written once per test binary.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "support/paths.h"
#include "support/cli_expect.h"
#include "support/run.h"
#include "support/synth.h"

namespace moe::test {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;


TempDir& dir() {
  static TempDir tmp{"moe-encodings-matrix"};
  return tmp;
}

const fs::path& base_model() {
  static const fs::path p = [] {
    const fs::path d = dir() / "base";
    write_synth(make_synth("qwen2_moe"), d, {.tokenizer = true});
    return d;
  }();
  return p;
}

// A tensor class: a weight that stands for it, the quantize flags that encode it (CODEC replaced),
// and the factorize target that factorizes it ("" when factorize cannot).
struct Class {
  const char* name;
  const char* weight;
  std::vector<std::string> quantize_flags;
  const char* target;
};

const std::vector<Class>& classes() {
  static const std::vector<Class> c = {
      {"experts", "model.layers.1.mlp.experts.0.gate_proj.weight", {"--experts", "CODEC"}, "experts"},
      {"shared", "model.layers.1.mlp.shared_expert.up_proj.weight", {"--shared", "CODEC"}, "shared"},
      {"shared_gate", "model.layers.1.mlp.shared_expert_gate.weight", {"--tensor-type", "shared_expert_gate=CODEC"}, ""},
      {"dense", "model.layers.0.mlp.down_proj.weight", {"--dense", "CODEC"}, "dense"},
      {"attention", "model.layers.2.self_attn.q_proj.weight", {"--attention", "CODEC"}, "attention"},
      {"router", "model.layers.1.mlp.gate.weight", {"--router", "CODEC"}, ""},
      {"embeddings", "model.embed_tokens.weight", {"--embeddings", "CODEC"}, ""},
      {"lm_head", "lm_head.weight", {"--lm-head", "CODEC"}, ""},
  };
  return c;
}

// An encoding the tool writes and how: the codec given to quantize, or factorize.
struct Encoding {
  const char* name;      // as config.json names it
  const char* codec;     // quantize codec; "" = factorize svd
  bool sub1bit = false;  // quantize --sub1bit
  bool delta = false;    // quantize --method delta-ternary (routed experts only)
};

const std::vector<Encoding>& encodings() {
  static const std::vector<Encoding> e = {
      {"intN", "int4"}, {"ternary", "ternary-absmean"}, {"ternary-dict", "ternary", true}, {"lowrank", ""},
      {"delta-ternary", "delta-ternary", false, true}};
  return e;
}

json weights_of(const fs::path& model) {
  const json c = read_json(model / "config.json");
  if (!c.contains("quantization_config")) return json::object();
  return c["quantization_config"].value("weights", json::object());
}

std::string encoding_of(const fs::path& model, const std::string& weight) {
  const json w = weights_of(model);
  return w.contains(weight) ? w[weight].at("encoding").get<std::string>() : "dense";
}

// The input with `cls` (only) encoded as `enc`, written once.
const fs::path& encoded_input(const Encoding& enc, const Class& cls) {
  static std::map<std::string, fs::path> made;
  const std::string key = std::string(enc.name) + "-" + cls.name;
  if (auto it = made.find(key); it != made.end()) return it->second;
  const fs::path out = dir() / key;
  std::vector<std::string> args;
  if (enc.delta) {
    args = {"-q", "quantize", base_model().string(), out.string(), "--method", "delta-ternary", "--density", "0.25"};
  } else if (!*enc.codec) {
    args = {"-q", "factorize", base_model().string(), out.string(), "--method", "svd", "--ratio", "0.5", "--targets",
            cls.target};
  } else {
    args = {"-q", "quantize", base_model().string(), out.string(), "--method", "rtn", "--codec", enc.codec};
    for (const char* keep : {"--experts", "--shared", "--dense"})  // only the class asked is encoded
      if (cls.quantize_flags[0] != keep) args.insert(args.end(), {keep, "keep"});
    for (std::string f : cls.quantize_flags) {
      if (auto p = f.find("CODEC"); p != std::string::npos) f.replace(p, 5, enc.codec);
      args.push_back(f);
    }
    if (enc.sub1bit) args.push_back("--sub1bit");
  }
  const RunResult r = run_tool(args);
  EXPECT_EQ(r.exit_code, 0) << key << ": " << r.describe();
  return made[key] = out;
}

// A command of the table: its arguments after the input (and output, when it writes one), the
// classes whose weights it changes (the others must keep their encoding), and the classes it
// dequantizes when they are encoded (a warning line must say so).
struct Command {
  const char* name;
  bool writes;  // takes an output folder
  std::vector<std::string> args;
  std::vector<std::string> changes;
  std::vector<std::string> warns;
};

const std::vector<std::string> kCal = {"--text", (fs::path(MOE_SOURCE_DIR) / "data/text/calib.txt").string(), "--ctx", "16", "--windows", "2"};  // not from kCalib: support/paths.h

std::vector<std::string> with_cal(std::vector<std::string> a) {
  a.insert(a.end(), kCal.begin(), kCal.end());
  return a;
}

const std::vector<Command>& commands() {
  static const std::vector<Command> c = {
      {"prune", true, {"--method", "random", "--keep", "2"}, {}, {}},
      {"prune", true, with_cal({"--method", "reap", "--keep-ratio", "0.5", "--no-uniform"}), {}, {}},
      {"prune", true, with_cal({"--method", "soft", "--keep", "2", "--novices"}), {"experts"}, {}},
      {"merge", true, with_cal({"--method", "hcsmoe", "--experts", "2"}), {"experts", "router"}, {"experts", "router"}},
      {"merge", true, with_cal({"--method", "dern", "--experts", "3"}), {"experts", "router"}, {"experts", "router"}},
      {"factorize", true, {"--method", "svd", "--ratio", "0.5"}, {"experts"}, {"experts"}},
      {"quantize", true, {"--method", "rtn", "--codec", "int8"}, {"experts", "shared", "dense"},
       {"experts", "shared", "dense"}},
      {"convert", true, {}, {}, {}},
      {"convert", true, {"--materialize"}, {"*"}, {}},
      {"eval", false, {"--text", kCalib, "--ctx", "16", "--max-windows", "2"}, {}, {}},
      {"calibrate", false, with_cal({"-o", "STATS"}), {}, {}},
      {"inspect", false, {}, {}, {}},
  };
  return c;
}

bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// The warning class names of the summary (model::OutTensor classes).
std::string out_class(const std::string& cls) {
  if (cls == "shared") return "shared_experts";
  if (cls == "shared_gate") return "shared_expert_gate";
  if (cls == "dense") return "dense_mlp";
  return cls;
}

struct Cell {
  size_t enc, cls;
};

std::vector<Cell> cells() {
  std::vector<Cell> out;
  for (size_t e = 0; e < encodings().size(); ++e)
    for (size_t c = 0; c < classes().size(); ++c)
      // factorize writes no router, gate, embeddings or lm_head; --sub1bit codes layers only
      // (embeddings and lm_head stay ternary, docs/encodings.md).
      if ((*encodings()[e].codec || *classes()[c].target) &&
          (!encodings()[e].delta || std::string(classes()[c].name) == "experts") &&
          !(encodings()[e].sub1bit && (std::string(classes()[c].name) == "embeddings" ||
                                       std::string(classes()[c].name) == "lm_head")))
        // Under the sanitizers (about ten times slower) every decoder still runs: each encoding
        // on the experts, and each class with the first encoding (intN); the Release stage runs
        // the whole matrix.
        if (!under_sanitizers() || e == 0 || std::string(classes()[c].name) == "experts") out.push_back({e, c});
  return out;
}

class EncodedInput : public ::testing::TestWithParam<Cell> {};

TEST_P(EncodedInput, EveryCommandHandlesIt) {
  const Encoding& enc = encodings()[GetParam().enc];
  const Class& cls = classes()[GetParam().cls];
  const fs::path& in = encoded_input(enc, cls);
  ASSERT_EQ(encoding_of(in, cls.weight), enc.name) << "the input does not have " << cls.weight << " as " << enc.name;
  int n = 0;
  for (const Command& c : commands()) {
    const std::string tag = std::string(c.name) + " #" + std::to_string(n++);
    SCOPED_TRACE(std::string(enc.name) + " " + cls.name + ": " + tag);
    const fs::path out = in.parent_path() / (in.filename().string() + "-out-" + std::to_string(n));
    std::vector<std::string> args = {"-q", c.name, in.string()};
    if (c.writes) args.push_back(out.string());
    for (std::string a : c.args) args.push_back(a == "STATS" ? (out.string() + ".safetensors") : a);
    const RunResult r = run_tool(args);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
    EXPECT_EQ(r.err, "") << r.describe();
    // A dequantizing pass says so, naming the class; the others do not warn about it.
    const bool warned = r.out.find("warning  ") != std::string::npos &&
                        r.out.find(out_class(cls.name) + " stored as " + enc.name) != std::string::npos;
    const bool router_warned = r.out.find("the router stored as " + std::string(enc.name)) != std::string::npos;
    EXPECT_EQ(warned || router_warned, has(c.warns, cls.name)) << r.out;
    if (!c.writes) continue;
    // Every weight the command does not change keeps its encoding.
    if (has(c.changes, "*")) {
      EXPECT_EQ(encoding_of(out, cls.weight), "dense");
    } else if (!has(c.changes, cls.name)) {
      EXPECT_EQ(encoding_of(out, cls.weight), enc.name) << r.out;
    }
    // An output the command re-encoded loads and runs.
    if (c.changes.empty()) continue;
    const RunResult ev = run_tool({"-q", "eval", out.string(), "--text", kCalib, "--ctx", "16", "--max-windows", "1"});
    EXPECT_EQ(ev.exit_code, 0) << ev.describe();
  }
}

std::string cell_name(const ::testing::TestParamInfo<Cell>& i) {
  std::string s = std::string(encodings()[i.param.enc].name) + "_" + classes()[i.param.cls].name;
  for (char& ch : s)
    if (ch == '-') ch = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(Matrix, EncodedInput, ::testing::ValuesIn(cells()), cell_name);

}  // namespace
}  // namespace moe::test
