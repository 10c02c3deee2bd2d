#include "model/wrapped_config.h"

#include "core/error.h"

namespace moe::model {

using core::Error;

Config wrapped_text_config(const Config& top, const std::string& text_model_type) {
  const nlohmann::json& j = top.json();
  const std::string type = j.value("model_type", std::string());
  if (!j.contains("text_config") || j.at("text_config").is_null())
    throw Error::corruption(top.source() + ": text_config: missing (model_type " + type +
                            " keeps the text model's hyper-parameters there)");
  const nlohmann::json& t = j.at("text_config");
  if (!t.is_object())
    throw Error::corruption(top.source() + ": text_config: expected an object, found " + std::string(t.type_name()));
  if (t.contains("model_type") && t.at("model_type") != text_model_type)
    throw Error::corruption(top.source() + ": text_config.model_type: expected \"" + text_model_type + "\" (model_type " +
                            type + "), found " + t.at("model_type").dump());
  if (t.contains("quantization_config"))
    throw Error::unsupported(top.source() + ": text_config.quantization_config: not read (transformers reads the "
                             "top-level quantization_config of a " + type + " checkpoint)");
  nlohmann::json text = t;
  if (j.contains("quantization_config")) text["quantization_config"] = j.at("quantization_config");
  return Config(std::move(text), top.source(), "text_config.");
}

nlohmann::json wrap_text_config(const nlohmann::json& wrapper, nlohmann::json text) {
  nlohmann::json out = wrapper;
  if (text.contains("quantization_config")) {
    out["quantization_config"] = text.at("quantization_config");
    text.erase("quantization_config");
  } else {
    out.erase("quantization_config");
  }
  // A dtype the output changed (under either spelling in text_config) is the wrapper's too, under
  // whichever spellings it has (v5 writes `dtype`, v4 `torch_dtype`).
  const nlohmann::json& before = wrapper.at("text_config");
  nlohmann::json changed;
  for (const char* key : {"dtype", "torch_dtype"})
    if (text.contains(key) && (!before.contains(key) || before.at(key) != text.at(key))) changed = text.at(key);
  if (!changed.is_null())
    for (const char* key : {"dtype", "torch_dtype"})
      if (out.contains(key)) out[key] = changed;
  out["text_config"] = std::move(text);
  return out;
}

}  // namespace moe::model
