// The multi-token-prediction layer (runtime/mtp.h) against the independent NumPy reference
// data/scripts/glm4_moe_reference.py mtp() (written from vLLM's glm4_moe_mtp.py and its proposer)
// on data/glm4-moe-tiny's MTP layer (model.layers.3): the MTP logits of the golden's window within
// 1e-4 of the largest |logit|, the same argmax, the same experts per position with the same weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/error.h"
#include "reference_golden.h"
#include "runtime/forward.h"
#include "runtime/mtp.h"
#include "runtime_test_util.h"
#include "support/ckpt_util.h"

namespace moe::test {
namespace {

namespace fs = std::filesystem;

TEST(Mtp, MatchesReference) {
  const nlohmann::json g = read_json_or_fail(source_dir() / "data/golden/glm4_moe-mtp.json");
  ASSERT_FALSE(g.is_null());
  auto lm = load_model(source_dir() / g.at("model").get<std::string>());
  runtime::Forward fwd(lm->model);
  runtime::MtpForward mtp(fwd);
  EXPECT_EQ(mtp.layer(), 3);
  const int64_t T = g.at("T").get<int64_t>(), S = g.at("mtp_positions").get<int64_t>();
  ASSERT_EQ(S, T - 1);
  const auto tokens = g.at("tokens").get<std::vector<int32_t>>();
  RoutingRecorder rec;
  runtime::Observer* obs[] = {&rec};
  runtime::MatrixRM X = fwd.embed(tokens);
  fwd.run_layers(X, T);
  const runtime::MatrixRM logits = mtp.run(tokens, X, T, obs);
  ASSERT_EQ(logits.rows(), S);
  ASSERT_EQ(logits.cols(), 4096);
  const double abs_max = g.at("logits_abs_max").get<double>();
  const double diff = golden_logit_diff("glm4_moe-mtp", g, logits, S);
  EXPECT_LE(diff, 1e-4 * abs_max) << "max |MTP logit diff| vs the reference";
  std::printf("[ glm4_moe-mtp ] max |logit diff| = %.3g (|logit| max %.3g)\n", diff, abs_max);

  const auto& L = g.at("moe_layers").at(0);
  ASSERT_EQ(L.at("layer").get<int>(), 3);
  ASSERT_EQ(rec.routing.size(), 1u);
  ASSERT_TRUE(rec.routing.count(3));
  expect_routing_equal("glm4_moe-mtp", L, rec.routing.at(3), S);
}

// A model without an MTP layer, and chained MTP layers: refused with one line.
TEST(Mtp, Refusals) {
  TempDir dir;
  copy_with_config(source_dir() / "data/glm4-moe-tiny", dir.path(), {{"num_nextn_predict_layers", 2}});
  try {
    auto lm = load_model(dir.path());
    runtime::Forward fwd(lm->model);
    runtime::MtpForward mtp(fwd);
    ADD_FAILURE() << "chained MTP layers accepted";
  } catch (const core::Error& e) {
    EXPECT_NE(e.message().find("num_nextn_predict_layers"), std::string::npos) << e.what();
  }
  auto lm = load_model(source_dir() / "data/deepseek-v3-tiny");
  runtime::Forward fwd(lm->model);
  try {
    runtime::MtpForward mtp(fwd);
    ADD_FAILURE() << "no MTP layer accepted";
  } catch (const core::Error& e) {
    EXPECT_EQ(e.kind(), core::ErrorKind::NotSupported) << e.what();
    EXPECT_NE(e.message().find("no multi-token-prediction layer"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moe::test
