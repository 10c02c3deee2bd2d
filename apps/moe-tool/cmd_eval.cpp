// moe-tool eval MODEL --text FILE: perplexity over non-overlapping windows (docs/methods.md), or
// with --against REF the same windows through both models: KL(ref || model), top-1 agreement.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "eval/eval.h"
#include "eval/task_subsets.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/forward.h"

namespace moe::app {

void setup_eval(CLI::App& sub, Handler& handler, const GlobalFlags& flags) {
  struct Opts {
    std::string model, text, against, task;
    eval::EvalOptions e;
    bool ctx_given = false, json = false, strict_utf8 = false;
    CLI::Option* max_windows = nullptr;
  };
  auto o = std::make_shared<Opts>();
  sub.add_option("MODEL", o->model, "Checkpoint folder (config.json + safetensors + tokenizer)")->required();
  sub.add_option("--text", o->text, "UTF-8 text file to score")->required();
  sub.add_option("--ctx", o->e.ctx, "Window length in tokens (default 512)");
  o->max_windows = sub.add_option("--max-windows", o->e.max_windows, "Score at most N windows (default: all)");
  sub.add_option("--batch-windows", o->e.batch_windows, "Windows per forward batch (default: automatic)");
  sub.add_flag("--json", o->json, "Print JSON");
  sub.add_flag("--llama-cpp-compatible", o->e.llama_cpp,
               "llama-perplexity convention: BOS first, score the second half of each window");
  sub.add_flag("--parse-special", o->e.parse_special,
               "Read special-token strings in the text (e.g. <|endoftext|>) as their special ids; by default they "
               "are plain text (never with --llama-cpp-compatible, as llama-perplexity)");
  sub.add_flag("--strict-utf8", o->strict_utf8, "Refuse a text that is not valid UTF-8 (default: warn, read U+FFFD)");
  sub.add_option("--against", o->against, "Reference model (owns the tokenizer): KL(ref||model), top-1 agreement, routing agreement");
  sub.add_flag("--force", o->e.force, "Allow --ctx beyond max_position_embeddings (with a warning)");
  sub.add_option("--task", o->task,
                 "A checkpoint of prune --tasks: route over this task's experts only (the other experts' router logits "
                 "masked before the softmax and top-k; docs/tasks.md)");
  sub.callback([o, &handler, &flags] {
    handler = [o, &flags] {
      o->e.quiet = flags.quiet;
      if (o->max_windows->count() > 0 && o->e.max_windows < 1)
        throw core::Error::invalid("--max-windows: expected an integer >= 1, found " + std::to_string(o->e.max_windows) +
                                   " (leave it out to score every window)");
      const std::string text = eval::read_text(o->text, o->strict_utf8);
      auto ckpt = io::Checkpoint::open(io::Env::posix(), o->model);
      auto model = model::Model::load(ckpt);
      if (!o->task.empty())
        o->e.active = eval::task_mask(eval::require_task_subsets(ckpt.dir(), "--task " + o->task), model, o->task, "--task");
      std::optional<io::Checkpoint> ref_ckpt;
      std::optional<model::Model> ref;
      if (!o->against.empty()) {
        ref_ckpt = io::Checkpoint::open(io::Env::posix(), o->against);
        ref = model::Model::load(*ref_ckpt);
      }
      runtime::ForwardSpec::from_model(model);  // unsupported families fail before tokenizing
      if (ref) runtime::ForwardSpec::from_model(*ref);
      eval::check_context(model, o->e.ctx, o->e.force);
      if (ref) eval::check_context(*ref, o->e.ctx, o->e.force);
      const auto tok = eval::load_tokenizer(ref ? o->against : o->model);
      const eval::Windows w = core::with_context(o->text, [&] { return eval::make_windows(tok, text, o->e); });

      nlohmann::json j;
      auto put = [](nlohmann::json& d, const eval::PerplexityResult& r) {
        d["perplexity"] = r.perplexity();
        d["nll_sum"] = r.nll_sum;
        d["tokens_scored"] = r.tokens_scored;
        d["windows"] = r.windows;
        d["ctx"] = r.ctx;
        d["convention"] = r.convention;
        d["tokens_per_second"] = r.tokens_per_second;
      };
      if (!ref) {
        const auto r = eval::perplexity(model, w, o->e);
        if (o->json) {
          put(j, r);
          if (!o->task.empty()) j["task"] = o->task;
          std::cout << j.dump(2) << "\n";
        } else {
          std::printf("model: %s (%s)\n", o->model.c_str(), model.family().model_type.c_str());
          if (!o->task.empty()) std::printf("task: %s (routing over its experts only)\n", o->task.c_str());
          std::printf("text: %s: %lld tokens, %lld windows of %lld tokens\n", o->text.c_str(),
                      (long long)w.text_tokens, (long long)w.windows, (long long)w.ctx);
          std::printf("convention: %s\n", r.convention.c_str());
          std::printf("tokens scored: %lld\n", (long long)r.tokens_scored);
          std::printf("perplexity: %.6f\n", r.perplexity());
          std::printf("tokens/s: %.1f (tokens forwarded per second, %.2f s)\n", r.tokens_per_second, r.seconds);
        }
        return 0;
      }
      // The model's own report (and its input's, along a chain of runs) says which of the
      // reference's experts each of its experts holds (prune/merge outputs); without one, experts
      // are compared by index.
      const eval::ReportedOrigin reported = eval::origin_against(ckpt.dir(), ref_ckpt->fingerprint());
      const std::optional<eval::ExpertOrigin>& origin = reported.origin;
      auto c = eval::compare(*ref, model, w, o->e, origin ? &*origin : nullptr);
      if (!reported.broken.empty()) {
        c.routing.available = false;
        c.routing.unavailable = reported.broken;
      }
      if (o->json) {
        put(j, c.model);
        if (!o->task.empty()) j["task"] = o->task;
        nlohmann::json rj;
        put(rj, c.reference);
        j["reference"] = rj;
        j["kl_mean"] = c.mean_kl();
        j["top1_agreement"] = c.top1_agreement();
        j["routing_agreement"] = c.routing.to_json(reported.label());
        std::cout << j.dump(2) << "\n";
      } else {
        std::printf("model: %s (%s)\n", o->model.c_str(), model.family().model_type.c_str());
        if (!o->task.empty()) std::printf("task: %s (routing over its experts only)\n", o->task.c_str());
        std::printf("reference: %s (%s)\n", o->against.c_str(), ref->family().model_type.c_str());
        std::printf("text: %s: %lld tokens, %lld windows of %lld tokens\n", o->text.c_str(),
                    (long long)w.text_tokens, (long long)w.windows, (long long)w.ctx);
        std::printf("convention: %s\n", c.model.convention.c_str());
        std::printf("tokens scored: %lld\n", (long long)c.tokens);
        std::printf("perplexity: %.6f (reference %.6f)\n", c.model.perplexity(), c.reference.perplexity());
        std::printf("mean KL(ref||model): %.6g nats/token\n", c.mean_kl());
        std::printf("top-1 agreement: %.6f\n", c.top1_agreement());
        if (c.routing.available)
          std::printf("routing agreement: %.6f (top-k expert sets unchanged, %lld token x MoE-layer pairs; mean overlap "
                      "%.6f; experts matched %s)\n",
                      c.routing.agreement(), (long long)c.routing.pairs, c.routing.overlap(), reported.how.c_str());
        else
          std::printf("routing agreement: n/a (%s)\n", c.routing.unavailable.c_str());
        std::printf("tokens/s: %.1f (reference %.1f; tokens forwarded per second)\n", c.model.tokens_per_second,
                    c.reference.tokens_per_second);
      }
      return 0;
    };
  });
}

}  // namespace moe::app
