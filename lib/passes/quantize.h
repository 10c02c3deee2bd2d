// Quantization of expert (and, on request, shared-expert, dense-MLP, attention, router, embedding
// and lm_head) weights into integer-group or ternary codes (docs/methods.md), written in the native
// checkpoint format (docs/FORMAT.md) and dequantized one layer at a time by every reader. The
// codecs and the GPTQ/RTN math are quant/codec.h and quant/gptq.h; the mixed-precision integer
// program is quant/mixed_precision.h.
//
// Methods:
//   rtn    round to nearest with the codec's grid (no calibration needed)
//   gptq   GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
//          Pre-trained Transformers"; reference: IST-DASLab/gptq gptq.py fasterquant): each matrix
//          quantized column by column with the error compensated through the inverse Hessian of
//          its inputs. Hessians H = Σ x xᵀ come from the calibration windows at each layer's
//          input, pushed through the layers already quantized (layer-sequential, as GPTQ); an
//          expert's from the tokens routed to it. Ternary codecs under GPTQ are QMoE's setting
//          (Frantar & Alistarh 2023, "QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter
//          Models"): damping 0.1 unless `damp` is given.
//
// Options (besides "pass", "method"):
//   "codec": "int4"          the default codec of the quantized classes (quant/codec.h grammar:
//                            NAME[:gN|:row][:sym|:asym][:refit], NAME one of int8, int4, int3,
//                            int2, ternary, ternary-absmean, ternary-minmax, ternary-tq)
//   "group": 128             group size of integer codecs that do not name one (0 = whole row);
//                            a group that does not divide the row leaves a shorter last group
//   "sym": false             integer codecs that do not say: symmetric (absmax) instead of min-max
//                            with a zero point
//   per tensor class, a codec or "keep": "experts" (default: codec), "shared" (codec), "dense"
//                            (codec: dense-layer MLPs), "attention" (keep), "router" (keep),
//                            "embeddings" (keep), "lm_head" (keep); norms and biases are never
//                            quantized
//   "tensor_type": ["REGEX=CODEC", ...]  overrides by on-disk tensor name (std::regex search,
//                            ECMAScript), the first matching pattern wins; CODEC may be "keep"
//   "damp": 0.01             gptq: H += damp · mean(diag H) · I (0.1 for ternary codecs when absent)
//   "act_order": "auto"      gptq: columns in order of decreasing H_ii. "auto" or absent: on for the
//                            K-quants (q2_k ... q6_k), off for every other codec. Within a block
//                            type's grid it changes no stored layout (blocks are contiguous
//                            columns either way); on the fixtures defaults are chosen on it lowered
//                            the KL to the source in every K-quant cell, and was mixed for the
//                            blocks of 32 (docs/gguf.md, "GPTQ within the ggml block grids").
//   "block": 128             gptq: columns per lazy-update block
//   "min_tokens": 0          gptq: an expert whose routed tokens n are fewer than this gets its
//                            Hessian topped up with (min_tokens − n) tokens' worth of the layer's
//                            all-token Hessian (an expert no token reaches: all-token Hessian);
//                            0 = the matrix's input width (below it Σ x xᵀ cannot be full rank)
//   "avg_bits": B            mixed precision per expert (MC-MoE, Huang et al. 2024, "Mixture
//                            Compressor for Mixture-of-Experts LLMs Gains More"): each MoE layer's
//                            routed experts get widths from "widths" so that their stored bits per
//                            parameter average at most B, chosen by an integer program (GLPK)
//                            minimising Σ_j φ_j^α w_j^β L_j(b): φ = routed-token share, w = routing
//                            weight share, L_j(b) = relative output error of expert j at width b on
//                            its routed tokens (all the layer's tokens when none is routed)
//   "widths": "ternary,int2,int3,int4,int8"  avg_bits: the candidate codecs
//   "alpha": 1, "beta": 1.5  avg_bits: importance exponents
//   "sub1bit": false         QMoE sub-1-bit: the ternary weights are dictionary-coded with one
//                            Tunstall dictionary (passes/sub1bit.h, quant/ternary_dict.h); needs
//                            ternary-minmax row codecs (the threshold spelling ternary:tX walks
//                            bits against quality)
//   "dict_scope": "model"    sub1bit: one dictionary for the checkpoint, coded after the last layer
//                            (pipeline/model_dictionary.h), or "layer": one per layer
//   "threshold_scale": "none"  "importance": routed expert e's ternary threshold becomes
//                            τ_e = min(1, τ·clamp((mean_f / f_e)^γ, 1/2, 2)), f = routed
//                            calibration tokens (statistics "count"); reported per expert
//   "threshold_gamma": 0.5   γ of threshold_scale importance
//   "smooth": false          expert-aware smoothing (passes/smooth.h: SmoothQuant scales aggregated
//                            over each MoE layer's experts, shared expert and router as EAQuant
//                            does, powers of two) folded into the post-attention norm and the
//                            readers' columns before anything is quantized; needs calibration text
//   "smooth_alpha": 0.5      smooth: migration strength α in [0, 1]
//   "align_router": false    after each MoE layer is quantized, its router (kept, in its dtype)
//                            re-fitted by ridge least squares to the input model's logits on the
//                            calibration tokens (passes/smooth.h fit_router), kept only when top-k
//                            agreement with the input model rises; reported per layer. Needs
//                            calibration text and calibration.propagate
// Embeddings and lm_head are quantized by RTN under either method (no Hessian is collected for
// them; said in the report). Every quantized matrix is reported: codec, bits per parameter, and
// for gptq the Hessian used (routed tokens, top-up, all-token), the damping, and the proxy loss
// tr((W−Q) H (W−Q)ᵀ) against RTN's.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "passes/pass.h"

namespace moe::passes {

std::unique_ptr<pipeline::Pass> make_quantize(const nlohmann::json& spec, const std::string& method,
                                              const std::string& path);

}  // namespace moe::passes
