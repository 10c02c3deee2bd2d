#!/usr/bin/python3
"""Builds data/llama4-mm-tiny: the multimodal Llama-4 layout (Llama4ForConditionalGeneration, config
model_type "llama4") around the SAME text weights as data/llama4-tiny (llama4_reference.py's
make_weights, same seed), so its text forward is the one of data/golden/llama4.json.

Names as transformers' modeling_llama4.py Llama4ForConditionalGeneration holds them (its
submodules vision_model, multi_modal_projector and language_model = Llama4ForCausalLM, no
conversion mapping): the text model's tensors under "language_model." (language_model.model.
layers.{l}.…, language_model.model.embed_tokens.weight, language_model.model.norm.weight,
language_model.lm_head.weight), a made-up vision tower under "vision_model." and the projector
"multi_modal_projector.linear_1.weight". The vision tensors carry the real names
(Llama4VisionModel: patch_embedding.linear, class_embedding, positional_embedding_vlm,
layernorm_pre / layernorm_post, model.layers.{l}.…, vision_adapter.mlp.fc1 / fc2) with tiny
made-up shapes: they are never run here, only passed through.

config.json: the released checkpoints' shape (architectures, model_type llama4, boi/eoi/image token
indices, tie_word_embeddings, torch_dtype, text_config with model_type llama4_text, vision_config
with model_type llama4_vision_model), sizes shrunk.

Usage: /usr/bin/python3 data/scripts/llama4_mm_fixture.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import drawers, store, write_fixture  # noqa: E402
import llama4_reference  # noqa: E402

NAME = "llama4-mm-tiny"
TEXT_PREFIX = "language_model."


def vision_config():
    return {
        "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 16, "image_size": 4,
        "initializer_range": 0.02, "intermediate_size": 32, "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False, "norm_eps": 1e-5, "num_attention_heads": 2,
        "num_channels": 3, "num_hidden_layers": 1, "patch_size": 2, "pixel_shuffle_ratio": 0.5,
        "projector_dropout": 0.0, "projector_input_dim": 16, "projector_output_dim": 16,
        "rope_theta": 10000, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "vision_output_dim": 16,
    }


def config(text):
    t = {k: v for k, v in text.items() if k != "architectures"}
    return {
        "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 4092,
        "eoi_token_index": 4093, "image_token_index": 4094, "model_type": "llama4",
        "text_config": t, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0.dev0", "vision_config": vision_config(),
    }


def vision_weights(v, text_hidden):
    rng = np.random.default_rng(4406)
    W = {}
    mat, norm = drawers(rng, W)
    vh, vi = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    p = "vision_model."
    mat(p + "patch_embedding.linear.weight", (vh, v["num_channels"] * v["patch_size"] ** 2), 0.3)
    mat(p + "class_embedding", (vh,), 0.3)
    mat(p + "positional_embedding_vlm", (patches, vh), 0.3)
    for ln in ("layernorm_pre", "layernorm_post"):
        norm(p + ln + ".weight", vh)
        mat(p + ln + ".bias", (vh,), 0.1)
    for l in range(v["num_hidden_layers"]):
        q = p + f"model.layers.{l}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mat(q + f"self_attn.{name}.weight", (vh, vh), 0.3)
            mat(q + f"self_attn.{name}.bias", (vh,), 0.1)
        for ln in ("input_layernorm", "post_attention_layernorm"):
            norm(q + ln + ".weight", vh)
            mat(q + ln + ".bias", (vh,), 0.1)
        mat(q + "mlp.fc1.weight", (vi, vh), 0.3)
        mat(q + "mlp.fc1.bias", (vi,), 0.1)
        mat(q + "mlp.fc2.weight", (vh, vi), 0.3)
        mat(q + "mlp.fc2.bias", (vh,), 0.1)
    shuffled = int(vh / v["pixel_shuffle_ratio"] ** 2)
    mat(p + "vision_adapter.mlp.fc1.weight", (v["projector_input_dim"], shuffled), 0.3)
    mat(p + "vision_adapter.mlp.fc2.weight", (v["projector_output_dim"], v["projector_input_dim"]), 0.3)
    mat("multi_modal_projector.linear_1.weight", (text_hidden, v["vision_output_dim"]), 0.3)
    return store(W)[0]


def main():
    text = llama4_reference.config()
    stored_text, _ = llama4_reference.make_weights(text)
    c = config(text)
    stored = {TEXT_PREFIX + n: a for n, a in stored_text.items()}
    stored.update(vision_weights(c["vision_config"], text["hidden_size"]))
    out = write_fixture(NAME, c, stored)
    print(f"{NAME}: {os.path.getsize(os.path.join(out, 'model.safetensors'))} bytes")


if __name__ == "__main__":
    main()
