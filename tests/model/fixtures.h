#pragma once

// Models and tokenizers shared by the model tests (the GGUF writer's and reader's tests build on the same ones).

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/tokenizer.h"

namespace seedling::model::testing {

// GGUF metadata value types (gguf_type), written from the specification (ggml docs/gguf.md) and not taken from
// model/internal/gguf_format.h, so the tests' own GGUF encoder and decoder stay independent of the code they test.
// `using enum testing::GgufSpecType;` brings the names in.
enum GgufSpecType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

inline constexpr int32_t kTokenizerVocab = 290;  // 256 bytes + 3 specials + 31 merges
inline constexpr int64_t kModelVocab = 320;      // the last 30 ids are padding

// A short English text, repeated so a byte-level BPE learns kTokenizerVocab ids from it.
inline std::string Corpus() {
  std::string s;
  for (int i = 0; i < 20; ++i) {
    s += "The phone learns a little every night, and the server averages what the phones learned. ";
    s += "Federated fine-tuning keeps the data on the device; only the updates travel. 12345 "
         "67890\n";
  }
  return s;
}

// A byte-level BPE tokenizer.json learned from Corpus().
inline std::string TokenizerJson() {
  BpeTrainerOptions options;
  options.vocab_size = kTokenizerVocab;
  auto doc = TrainByteLevelBpeTokenizerJson(Corpus(), options);
  INFO(doc.status().ToString());
  REQUIRE(doc.ok());
  return *doc;
}

inline std::unique_ptr<Tokenizer> ParseTokenizer(const std::string& doc) {
  auto t = ParseTokenizerJson(doc);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return std::move(*t);
}

// "tiny" (Llama, GQA 8/2 heads, head_dim 32, tied) with 2 layers and a kModelVocab-id vocabulary.
inline ModelConfig TinyLlama() {
  auto c = PresetConfig("tiny");
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = kModelVocab;
  REQUIRE(c->Validate().ok());
  return *c;
}

// "tiny-qwen2" (q/k/v biases, untied) with 2 layers, a kModelVocab-id vocabulary and no RoPE scaling
// (llama.cpp's qwen2 cannot express the preset's llama3 scaling).
inline ModelConfig TinyQwen2() {
  auto c = PresetConfig("tiny-qwen2");
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = kModelVocab;
  c->rope_scaling = RopeScaling{};
  REQUIRE(c->Validate().ok());
  return *c;
}

// "tiny-qwen3" (per-head q/k RMSNorm, head_dim 48 x 4 heads != hidden 128, no biases) with a
// kModelVocab-id vocabulary and the q/k norms' weights set apart from 1, so a file that lost them shows.
inline ModelConfig TinyQwen3() {
  auto c = PresetConfig("tiny-qwen3");
  REQUIRE(c.ok());
  c->vocab_size = kModelVocab;
  c->tie_word_embeddings = false;
  REQUIRE(c->Validate().ok());
  return *c;
}

// A tiny preset as it is, with a kModelVocab-id vocabulary.
inline ModelConfig TinyPreset(const char* name) {
  auto c = PresetConfig(name);
  REQUIRE(c.ok());
  c->vocab_size = kModelVocab;
  REQUIRE(c->Validate().ok());
  return *c;
}
inline ModelConfig TinyOlmo2() { return TinyPreset("tiny-olmo2"); }
inline ModelConfig TinyGemma2() { return TinyPreset("tiny-gemma2"); }
inline ModelConfig TinyGemma3() { return TinyPreset("tiny-gemma3"); }
inline ModelConfig TinyPhi3() { return TinyPreset("tiny-phi3"); }
inline ModelConfig TinyGptNeoX() { return TinyPreset("tiny-gptneox"); }
inline ModelConfig TinyGpt2() { return TinyPreset("tiny-gpt2"); }
inline ModelConfig TinyPhi() { return TinyPreset("tiny-phi"); }

// A SentencePiece-style tokenizer.json as Hugging Face converts Llama 2 / TinyLlama tokenizers: "▁" (U+2581)
// is prepended and replaces spaces, byte fallback, <s> added by the post-processor. Ids: <unk> <s> </s> are
// 0-2, the byte tokens <0x00>..<0xFF> 3-258, then `pieces` in order, then the result of each merge ("a" + "b")
// that is not a piece already; `merges` rank in the order given. doc["model"]["vocab"] maps tokens to ids.
inline nlohmann::json SentencePieceStyleTokenizerJson(const std::vector<std::string>& pieces,
                                                      const std::vector<std::pair<std::string, std::string>>& merges) {
  using nlohmann::json;
  const std::string meta = "\xE2\x96\x81";
  json vocab = json::object();
  int next = 0;
  for (const std::string t : {"<unk>", "<s>", "</s>"}) vocab[t] = next++;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = next++;
  }
  for (const std::string& p : pieces) vocab[p] = next++;
  json merge_list = json::array();
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = next++;
    merge_list.push_back(a + " " + b);
  }
  auto added = [](int id, const std::string& content) {
    return json{{"id", id}, {"content", content}, {"special", true}, {"normalized", false}};
  };
  return json{{"added_tokens", {added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")}},
              {"normalizer",
               {{"type", "Sequence"},
                {"normalizers",
                 {{{"type", "Prepend"}, {"prepend", meta}},
                  {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", meta}}}}}},
              {"pre_tokenizer", nullptr},
              {"post_processor",
               {{"type", "TemplateProcessing"},
                {"single",
                 {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                {"pair", json::array()},
                {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
              {"decoder",
               {{"type", "Sequence"},
                {"decoders",
                 {{{"type", "Replace"}, {"pattern", {{"String", meta}}}, {"content", " "}},
                  {{"type", "ByteFallback"}},
                  {{"type", "Fuse"}},
                  {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
              {"model",
               {{"type", "BPE"},
                {"unk_token", "<unk>"},
                {"byte_fallback", true},
                {"fuse_unk", true},
                {"vocab", vocab},
                {"merges", merge_list}}}};
}

}  // namespace seedling::model::testing
