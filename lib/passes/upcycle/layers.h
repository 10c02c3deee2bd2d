// Dense -> MoE layer mapping: which tensors of the target family's layout each dense layer (and
// the globals) becomes. Attention, norms and embeddings are carried over (from the first source,
// or averaged over the sources); the MLP becomes the router [E, H] and E experts (gate/up [W, H],
// down [H, W]) made by the method (passes/upcycle/experts.h), plus the qwen2_moe shared expert.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint_writer.h"
#include "passes/upcycle/plan.h"

namespace moe::passes::upcycling {

// One output tensor: its name in the target layout, its output dtype and the tensor (a view of a
// source, or computed).
struct Out {
  std::string name;
  core::DType dtype;
  core::Tensor t;
};

class Builder {
 public:
  explicit Builder(const Plan& p) : p_(p) {}

  // The output dtype of a tensor stored as t (opts.dtype, else t's).
  core::DType dtype_of(const core::Tensor& t) const;
  // Globals: the embedding (head true, written first) or the rest (after the layers).
  std::vector<Out> globals(bool head) const;
  // A tensor taken from the first source or averaged over all (attention, norms, embeddings);
  // layer -1: a global.
  core::Tensor attention_like(const std::string& role, int layer) const;
  // The tensors of layer l, computed now (one layer's experts in memory).
  std::vector<Out> layer(int l) const;
  // Shapes of layer l's outputs without computing them, in layer()'s order; with_experts false
  // leaves out the routed experts (expert_specs lists them).
  std::vector<io::TensorSpec> layer_specs(int l, bool with_experts = true) const;
  // Shapes of routed expert e of layer l: gate [width, H], up [width, H], down [H, width].
  std::vector<io::TensorSpec> expert_specs(int l, int64_t e) const;
  // Shapes of globals(head)'s outputs without computing them.
  std::vector<io::TensorSpec> global_specs(bool head) const;
  // Every output tensor's shape, in the order written: head globals, layers 0..L-1, the rest.
  std::vector<io::TensorSpec> output_specs() const;
  // The sum of output_specs()'s bytes without listing them: every routed expert of a layer has
  // expert_specs(l, 0)'s shapes, counted once and multiplied by the expert count (a million
  // experts plan in microseconds, not a list of millions of names). Long double: may pass 2^64.
  long double output_bytes() const;

 private:
  const Plan& p_;
};

// Hands the mapped pages of every source's layer l back to the OS.
void release_layer(const Plan& p, int l);

}  // namespace moe::passes::upcycling
