// A decoder stored inside a wrapper model (llama4's Llama4ForConditionalGeneration, FamilyDesc::
// text_model_type): the text model's section of config.json read as the model's config, and an
// output's config written back into the wrapper.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "family/config.h"

namespace moe::model {

// The text model's config of the wrapper config.json `top`: text_config's keys (errors name them
// "text_config.<key>"; no top-level key shadows one) plus the top-level quantization_config (where
// transformers reads it for the whole model). Error::corruption (exit 2), naming config.json and
// the key, when text_config is missing or not an object or its model_type (when given) is not
// `text_model_type`; Error::unsupported for a quantization_config inside text_config.
Config wrapped_text_config(const Config& top, const std::string& text_model_type);

// The output config.json of a wrapper: `wrapper` as read with text_config replaced by `text`
// (Model::rewritten_config's result on the text config) less its quantization_config, which goes
// to the top level (removed there when `text` has none); a dtype / torch_dtype key that `text`
// changed is changed at the top level too when it has one. Every other key is kept as read.
nlohmann::json wrap_text_config(const nlohmann::json& wrapper, nlohmann::json text);

}  // namespace moe::model
