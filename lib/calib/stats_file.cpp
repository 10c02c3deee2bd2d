#include "calib/stats_file.h"

#include "core/error.h"

namespace moe::calib {

using core::DType;
using core::Error;

namespace {

std::string lname(int l, const std::string& field) { return "layers." + std::to_string(l) + "." + field; }
std::string ename(int l, int64_t e, const std::string& field) {
  return "layers." + std::to_string(l) + ".experts." + std::to_string(e) + "." + field;
}

}  // namespace

std::vector<io::TensorSpec> stats_tensor_plan(const std::vector<LayerLayout>& layout) {
  std::vector<io::TensorSpec> plan;
  for (const auto& L : layout) {
    const int l = L.layer;
    const int64_t E = L.experts, H = L.hidden;
    if (L.moe) {
      plan.push_back({lname(l, "tokens"), DType::I64, {}});
      for (const char* f : {"count", "prob_sum", "weight_sum", "reap"}) plan.push_back({lname(l, f), DType::F64, {E}});
      plan.push_back({lname(l, "out_absmax"), DType::F32, {E}});
      if (L.all_token_stats) plan.push_back({lname(l, "out_mean"), DType::F32, {E, H}});
      plan.push_back({lname(l, "logit_sim"), DType::F32, {E, E}});
      if (L.all_token_stats) plan.push_back({lname(l, "out_cos"), DType::F32, {E, E}});
      plan.push_back({lname(l, "coact"), DType::F64, {E, E}});
    }
    if (L.gram) {
      if (L.moe) {
        if (static_cast<int64_t>(L.expert_widths.size()) != E)
          throw Error::internal("stats layout: layer " + std::to_string(l) + " expert widths");
        for (int64_t e = 0; e < E; ++e) {
          plan.push_back({ename(l, e, "gram_in"), DType::F64, {H, H}});
          plan.push_back({ename(l, e, "gram_mid"), DType::F64, {L.expert_widths[e], L.expert_widths[e]}});
        }
      } else {
        plan.push_back({lname(l, "mlp.gram_in"), DType::F64, {H, H}});
        plan.push_back({lname(l, "mlp.gram_mid"), DType::F64, {L.mlp_width, L.mlp_width}});
      }
      plan.push_back({lname(l, "attn.gram_qkv"), DType::F64, {H, H}});
      plan.push_back({lname(l, "attn.gram_o"), DType::F64, {L.attn_o_width, L.attn_o_width}});
    }
  }
  return plan;
}

uint64_t gram_bytes(const LayerLayout& L) {
  if (!L.gram) return 0;
  auto sq = [](int64_t n) { return static_cast<uint64_t>(n) * static_cast<uint64_t>(n) * 8u; };
  uint64_t b = sq(L.hidden) + sq(L.attn_o_width);
  if (L.moe) {
    for (int64_t w : L.expert_widths) b += sq(L.hidden) + sq(w);
  } else {
    b += sq(L.hidden) + sq(L.mlp_width);
  }
  return b;
}

std::vector<LayerLayout> layout_of(const Stats& s) {
  std::map<int, LayerLayout> by_layer;
  const bool gram = !s.grams.empty();
  for (const auto& [l, st] : s.layers) {
    LayerLayout& L = by_layer[l];
    L.layer = l;
    L.moe = true;
    L.experts = st.num_experts();
    L.hidden = st.out_mean.size() ? st.out_mean.cols() : (st.gram_in.empty() ? 0 : st.gram_in[0].rows());
    L.all_token_stats = st.out_mean.size() != 0;
    if (!st.gram_in.empty()) {
      for (const auto& g : st.gram_mid) L.expert_widths.push_back(g.rows());
      L.hidden = st.gram_in[0].rows();
    }
  }
  for (const auto& [l, g] : s.grams) {
    LayerLayout& L = by_layer[l];
    L.layer = l;
    L.gram = true;
    L.hidden = g.attn_qkv.rows();
    L.attn_o_width = g.attn_o.rows();
    L.mlp_width = g.mlp_mid.rows();
  }
  std::vector<LayerLayout> out;
  for (auto& [l, L] : by_layer) {
    if (gram && !L.gram) throw Error::internal("stats: layer " + std::to_string(l) + " lacks its Gram matrices");
    if (L.moe && !L.gram && !s.layers.at(l).gram_in.empty())
      throw Error::internal("stats: layer " + std::to_string(l) + " has expert Gram matrices but no attention ones");
    if (L.moe && L.gram && static_cast<int64_t>(s.layers.at(l).gram_in.size()) != L.experts)
      throw Error::internal("stats: layer " + std::to_string(l) + " has Gram matrices for some experts only");
    out.push_back(L);
  }
  return out;
}

StatsWriter::StatsWriter(io::Env& env, std::filesystem::path path, std::vector<LayerLayout> layout,
                         std::map<std::string, std::string> metadata, const std::vector<std::filesystem::path>& inputs,
                         bool force, const std::string& force_name)
    : env_(env), path_(std::move(path)), layout_(std::move(layout)) {
  const auto plan = stats_tensor_plan(layout_);
  std::vector<io::TensorInfo> infos;
  uint64_t off = 0;
  for (const auto& p : plan) {
    infos.push_back(io::TensorInfo{p.name, p.dtype, p.shape, off, off + p.nbytes()});
    off += p.nbytes();
  }
  metadata.emplace("format", "pt");
  const std::string header = io::serialize_safetensors_header(infos, metadata);
  if (header.size() - 8 > io::kMaxSafetensorsHeader)
    throw Error::invalid("stats header larger than the safetensors limit (100 MB)");
  for (const auto& i : infos) slots_[i.name] = Slot{header.size() + i.begin, i.nbytes(), false};
  file_bytes_ = header.size() + off;
  out_ = std::make_unique<io::OutputFile>(env_, path_, inputs, force, force_name);
  tmp_ = out_->path();
  file_ = env_.create_file(tmp_);
  core::with_context(tmp_.string(), [&] { file_->write_at(0, header.data(), header.size()); });
}

StatsWriter::~StatsWriter() {
  if (finished_) return;
  try {
    if (file_) file_->close();
  } catch (...) {
  }
  // out_ removes the temporary file.
}

void StatsWriter::put(const std::string& name, const void* data, uint64_t n) {
  auto it = slots_.find(name);
  if (it == slots_.end()) throw Error::internal("stats writer: tensor " + name + " not in the layout");
  if (it->second.nbytes != n)
    throw Error::internal("stats writer: tensor " + name + " has " + std::to_string(n) + " bytes, planned " +
                          std::to_string(it->second.nbytes));
  if (n) core::with_context(tmp_.string(), [&] { file_->write_at(it->second.offset, data, n); });
  it->second.written = true;
}

void StatsWriter::write_layer(int l, const LayerStats* s, const LayerGrams* g) {
  const LayerLayout* L = nullptr;
  for (const auto& x : layout_)
    if (x.layer == l) L = &x;
  if (!L) throw Error::internal("stats writer: layer " + std::to_string(l) + " not in the layout");
  auto vec = [&](const std::string& f, const auto& v) {
    put(lname(l, f), v.data(), v.size() * sizeof(v[0]));
  };
  auto mat = [&](const std::string& name, const auto& m) {
    put(name, m.data(), static_cast<uint64_t>(m.size()) * sizeof(*m.data()));
  };
  if (L->moe) {
    if (!s) throw Error::internal("stats writer: MoE layer " + std::to_string(l) + " without stats");
    const int64_t tokens = s->tokens;
    put(lname(l, "tokens"), &tokens, sizeof tokens);
    vec("count", s->count);
    vec("prob_sum", s->prob_sum);
    vec("weight_sum", s->weight_sum);
    vec("reap", s->reap);
    vec("out_absmax", s->out_absmax);
    if (L->all_token_stats) mat(lname(l, "out_mean"), s->out_mean);
    mat(lname(l, "logit_sim"), s->logit_sim);
    if (L->all_token_stats) mat(lname(l, "out_cos"), s->out_cos);
    mat(lname(l, "coact"), s->coact);
    if (L->gram) {
      if (static_cast<int64_t>(s->gram_in.size()) != L->experts || s->gram_mid.size() != s->gram_in.size())
        throw Error::internal("stats writer: layer " + std::to_string(l) + " Gram matrices missing");
      for (int64_t e = 0; e < L->experts; ++e) {
        mat(ename(l, e, "gram_in"), s->gram_in[e]);
        mat(ename(l, e, "gram_mid"), s->gram_mid[e]);
      }
    }
  }
  if (L->gram) {
    if (!g) throw Error::internal("stats writer: layer " + std::to_string(l) + " without its Gram matrices");
    if (!L->moe) {
      mat(lname(l, "mlp.gram_in"), g->mlp_in);
      mat(lname(l, "mlp.gram_mid"), g->mlp_mid);
    }
    mat(lname(l, "attn.gram_qkv"), g->attn_qkv);
    mat(lname(l, "attn.gram_o"), g->attn_o);
  }
}

void StatsWriter::finish() {
  if (finished_) return;
  for (const auto& [name, slot] : slots_)
    if (!slot.written) throw Error::internal("stats writer: tensor " + name + " was never written");
  core::with_context(tmp_.string(), [&] { file_->close(); });
  out_->commit();
  finished_ = true;
}

}  // namespace moe::calib
