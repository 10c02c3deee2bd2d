// Routing statistics (docs/methods.md), computed once by `moe-tool calibrate`, saved as a
// safetensors file and reused by every pass. Tensor names in the file:
//   layers.{l}.tokens      I64 []      tokens seen
//   layers.{l}.count       F64 [E]     tokens whose top-k includes e
//   layers.{l}.prob_sum    F64 [E]     sum over tokens of softmax(logits)[e] (before top-k)
//   layers.{l}.weight_sum  F64 [E]     sum of the routing weight applied to e
//   layers.{l}.reap        F64 [E]     mean over tokens routed to e of weight_e(x) * ||expert_e(x)||_2
//   layers.{l}.out_absmax  F32 [E]     max |down_proj output| over routed tokens
//   layers.{l}.out_mean    F32 [E,H]   mean of expert_e(x) over all tokens: (sum over tokens routed to e
//                                      + S * sum over sampled tokens not routed to e) / tokens, where
//                                      stream token n is sampled when n % S == 0, S = out_stride;
//                                      exact for S = 1, an estimate for S > 1
//   layers.{l}.logit_sim   F32 [E,E]   (cos+1)/2 of router-logit columns over tokens
//   layers.{l}.out_cos     F32 [E,E]   mean over the first out_cos_tokens sampled tokens (every S-th
//                                      token of the stream) of cos(expert_i(x), expert_j(x))
//   layers.{l}.coact       F64 [E,E]   tokens whose top-k contains both i and j
//   layers.{l}.experts.{e}.gram_in   F64 [H,H]  (--gram) sum x x^T over inputs routed to e
//   layers.{l}.experts.{e}.gram_mid  F64 [I,I]  (--gram) same for the input of e's down projection
//   layers.{l}.mlp.gram_in / gram_mid, layers.{l}.attn.gram_qkv [H,H] / gram_o [nH*d, nH*d] (--gram)
// __metadata__: model_fingerprint, text_sha256 (or hash), ctx, windows, tokens, seed, sample,
// tool_version, family, num_layers.
// Also recorded: format ("pt"), batch_windows, out_cos_tokens (the sampled tokens out_cos used),
// out_stride (S above; files without the key were made with S = 1), gram ("true"/"false"),
// routed_only ("true": out_mean/out_cos were skipped), prob_sum ("softmax_all_logits": for every
// router, sigmoid and top-k-softmax ones too, prob_sum is the softmax over all E logits),
// windows_available, window_ids (random sample only: the chosen window indices, ascending).
// Layers without stats of their own (dense layers) appear only through their --gram tensors.
// The file is written layer by layer as calibration proceeds (calib/stats_file.h).
#pragma once

#include <Eigen/Core>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "io/checkpoint.h"

namespace moe::calib {

using MatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct LayerStats {
  int layer = 0;
  int64_t tokens = 0;
  std::vector<double> count, prob_sum, weight_sum, reap;  // [E]
  std::vector<float> out_absmax;                          // [E]
  MatrixF out_mean;   // [E,H]
  MatrixF logit_sim;  // [E,E]
  MatrixF out_cos;    // [E,E]
  MatrixD coact;      // [E,E]
  std::vector<MatrixD> gram_in, gram_mid;  // [E] x [H,H] / [I,I]; empty without --gram
  std::vector<bool> super_expert;          // [E], derived from out_absmax over all layers
  int64_t num_experts() const { return static_cast<int64_t>(count.size()); }
};

// --gram matrices of the non-expert parts of a layer (every layer: attention; dense layers:
// their MLP). Empty (0x0) when absent.
struct LayerGrams {
  int layer = 0;
  MatrixD attn_qkv;  // [H,H]        sum x x^T over the input of q/k/v (input_layernorm output)
  MatrixD attn_o;    // [nH*d,nH*d]  sum over the input of o_proj
  MatrixD mlp_in;    // [H,H]        dense layers: input of gate/up
  MatrixD mlp_mid;   // [I,I]        dense layers: input of down
};

// __metadata__.model_content: kContentDigestVersion, then per tensor of the model (in name order)
// its io::Checkpoint::content_digests() value as 8 lowercase hex digits. The version names the
// sampling; a file with another version is refused.
inline constexpr const char* kContentDigestVersion = "fnv1a32-16k-4x1k:";
std::string content_digest_text(const std::vector<io::Checkpoint::TensorDigest>& digests);

struct Stats {
  std::map<std::string, std::string> metadata;
  std::map<int, LayerStats> layers;  // MoE layers only, by layer index
  std::map<int, LayerGrams> grams;   // --gram: every layer, by layer index (empty without --gram)
  std::filesystem::path source;      // the file load() read (for messages)

  static Stats load(const std::filesystem::path& path);
  // with_gram = false skips the (large) Gram matrices: `stats show/plot` need none of them.
  static Stats load(const std::filesystem::path& path, bool with_gram);
  void save(const std::filesystem::path& path) const;

  // Throws Error::invalid when the stats were computed on another model (fingerprint differs),
  // naming both fingerprints and the command that produces matching stats.
  void check_model(const std::string& model_fingerprint, const std::filesystem::path& stats_path) const;
  // The fingerprint check above, then the sampled tensor contents (io::Checkpoint::content_digests,
  // recorded as model_content): Error::invalid naming the first tensor whose sampled bytes differ
  // and how many differ. A file made before model_content was recorded is accepted after one
  // warning line on stderr (its values cannot be checked).
  void check_model(const io::Checkpoint& ckpt, const std::filesystem::path& stats_path) const;
  // Throws Error::invalid when layer l lacks `field` ("out_mean", "gram_in", ...), saying how to
  // produce it (e.g. "run moe-tool calibrate ... --gram").
  const LayerStats& layer(int l, const std::string& field) const;
  // The --gram matrices of layer l ("attn_qkv", "attn_o", "mlp_in", "mlp_mid"); throws like layer().
  const LayerGrams& layer_grams(int l, const std::string& field) const;

  // Flags super experts (docs/methods.md): out_absmax above the 99.5th percentile of all (layer,
  // expert) values and above a tenth of the global max, only in layers < 0.75 * num_layers.
  void flag_super_experts(int num_layers);
  // The two thresholds of that rule over the current out_absmax values.
  struct SuperThresholds {
    double p99_5 = 0, tenth_of_max = 0;
  };
  SuperThresholds super_thresholds() const;
  // The rule applied to one layer's out_absmax with given thresholds (a pass after another pass
  // recomputes a layer's statistics and judges them by the input model's thresholds).
  static std::vector<bool> super_flags(const SuperThresholds& th, const LayerStats& s, int layer, int num_layers);

  // Metadata helpers: the value or `fallback` when absent.
  std::string meta(const std::string& key, const std::string& fallback = "") const;
  bool has_gram() const { return meta("gram") == "true"; }
};

}  // namespace moe::calib
