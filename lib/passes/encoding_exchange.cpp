#include "passes/encoding_exchange.h"

#include <cstring>
#include <map>
#include <string>

#include "core/error.h"
#include "core/tensor.h"
#include "quant/registry.h"
#include "runtime/mpi.h"

namespace moe::passes {

using core::Error;
using nlohmann::json;

std::vector<uint8_t> pack_encodings(const std::vector<EncodedSlot>& slots) {
  json header = json::array();
  std::vector<const core::Tensor*> payload;
  for (const EncodedSlot& s : slots) {
    if (!s.encoding) {  // the matrix stays as it was: its report entry only
      header.push_back({{"slot", s.slot}, {"report", s.report}, {"entry", nullptr}, {"parts", json::array()}});
      continue;
    }
    json entry = s.encoding->params();
    entry["encoding"] = s.encoding->name();
    json parts = json::array();
    for (const core::EncodedPart& p : s.encoding->parts()) {
      if (p.shared)
        throw Error::unsupported("mpi: the " + s.encoding->name() + " encoding of slot " + std::to_string(s.slot) +
                                 " has a part shared by several weights (" + p.role + "), which ranks cannot exchange");
      parts.push_back({{"role", p.role}, {"dtype", core::dtype_name(p.tensor->dtype())}, {"shape", p.tensor->shape()}});
      payload.push_back(p.tensor.get());
    }
    header.push_back({{"slot", s.slot}, {"report", s.report}, {"entry", entry}, {"parts", parts}});
  }
  const std::vector<uint8_t> h = json::to_cbor(header);
  size_t total = 8 + h.size();
  for (const core::Tensor* t : payload) total += t->nbytes();
  std::vector<uint8_t> out(total);
  const uint64_t hn = h.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(hn >> (8 * i));
  std::memcpy(out.data() + 8, h.data(), h.size());
  size_t off = 8 + h.size();
  for (const core::Tensor* t : payload) {
    if (t->nbytes()) std::memcpy(out.data() + off, t->data(), t->nbytes());
    off += t->nbytes();
  }
  return out;
}

std::vector<EncodedSlot> unpack_encodings(const std::vector<uint8_t>& bytes) {
  auto bad = [](const std::string& what) { return Error::corruption("mpi: exchanged encodings: " + what); };
  if (bytes.size() < 8) throw bad("shorter than its 8-byte header length");
  uint64_t hn = 0;
  for (int i = 0; i < 8; ++i) hn |= static_cast<uint64_t>(bytes[static_cast<size_t>(i)]) << (8 * i);
  if (hn > bytes.size() - 8) throw bad("header length " + std::to_string(hn) + " past the end");
  json header;
  try {
    header = json::from_cbor(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(hn));
  } catch (const json::exception& e) {
    throw bad(std::string("header: ") + e.what());
  }
  size_t off = 8 + hn;
  std::vector<EncodedSlot> out;
  try {
    for (const json& h : header) {
      std::map<std::string, quant::StoredPart> parts;
      for (const json& p : h.at("parts")) {
        const std::string dname = p.at("dtype").get<std::string>();
        const auto dtype = core::parse_dtype(dname);
        if (!dtype) throw bad("unknown dtype " + dname);
        core::Tensor t = core::Tensor::zeros(*dtype, p.at("shape").get<core::Shape>());
        if (t.nbytes() > bytes.size() - off) throw bad("part " + p.at("role").get<std::string>() + " past the end");
        if (t.nbytes()) std::memcpy(t.mutable_data(), bytes.data() + off, t.nbytes());
        off += t.nbytes();
        parts[p.at("role").get<std::string>()] = {std::make_shared<const core::Tensor>(std::move(t)), false};
      }
      const json& entry = h.at("entry");
      out.push_back({h.at("slot").get<size_t>(), entry.is_null() ? nullptr : quant::decode(entry, parts), h.at("report")});
    }
  } catch (const json::exception& e) {
    throw bad(e.what());
  }
  if (off != bytes.size()) throw bad(std::to_string(bytes.size() - off) + " bytes after the last part");
  return out;
}

std::vector<EncodedSlot> exchange_encodings(const std::vector<EncodedSlot>& mine, json& mpi_report) {
  runtime::mpi::World& world = runtime::mpi::World::get();
  const runtime::mpi::Traffic before = world.traffic();
  const std::vector<std::vector<uint8_t>> all = world.allgather(pack_encodings(mine));
  const runtime::mpi::Traffic& after = world.traffic();
  std::vector<EncodedSlot> out;
  for (const auto& buf : all)
    for (auto& s : unpack_encodings(buf)) out.push_back(std::move(s));
  mpi_report = {{"ranks", world.size()},
                {"slots_encoded_here", mine.size()},
                {"bytes_sent", after.bytes_sent - before.bytes_sent},
                {"bytes_gathered", after.bytes_gathered - before.bytes_gathered},
                {"seconds", after.seconds - before.seconds}};
  return out;
}

}  // namespace moe::passes
