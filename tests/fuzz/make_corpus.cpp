// Writes the generated part of the fuzz seed corpora: small valid inputs made by the project's own
// writers (frames, codec payloads, safetensors, GGUF, tokenizer.json, config.json, SecAgg+ messages), plus
// a few broken variants of each. Run once after changing a format, then commit what changed:
//   build/tests/fuzz/seedling_fuzz_make_corpus tests/fuzz/corpus
// Hand-written seeds (TOML and JSON configs) live in the corpus directories next to these files.

#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "base/file.h"
#include "comms/codec.h"
#include "comms/framing.h"
#include "model/config.h"
#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "privacy/secagg.h"

namespace seedling {
namespace {

std::string g_root;

void Check(const absl::Status& status, const char* what) {
  if (!status.ok()) {
    std::fprintf(stderr, "make_corpus: %s: %s\n", what, std::string(status.message()).c_str());
    std::exit(1);
  }
}

template <typename T>
T Value(absl::StatusOr<T> result, const char* what) {
  Check(result.status(), what);
  return std::move(*result);
}

void Write(const std::string& target, const std::string& name, std::string_view bytes) {
  const std::string dir = JoinPath(g_root, target);
  Check(MakeDirs(dir), "mkdir");
  Check(WriteFileAtomic(JoinPath(dir, name), bytes), "write");
}

// A valid input, then the same truncated to half and with one byte in the middle flipped.
void WriteWithBroken(const std::string& target, const std::string& name, const std::string& bytes) {
  Write(target, name, bytes);
  Write(target, name + ".truncated", bytes.substr(0, bytes.size() / 2));
  std::string flipped = bytes;
  if (!flipped.empty()) flipped[flipped.size() / 2] ^= 0x5a;
  Write(target, name + ".flipped", flipped);
}

std::string Frame(const v1::Envelope& envelope) { return Value(comms::EncodeFrame(envelope, 1 << 20), "frame"); }

void Framing() {
  std::vector<v1::Envelope> envelopes(5);
  for (size_t i = 0; i < envelopes.size(); ++i) {
    envelopes[i].set_protocol_version(1);
    envelopes[i].set_request_id(i + 1);
  }
  envelopes[0].mutable_hello()->set_device_id("phone-a");
  envelopes[0].mutable_hello()->set_token("secret");
  envelopes[0].mutable_hello()->add_methods("lora-bp");
  envelopes[1].mutable_check_in()->set_memory_budget_bytes(1 << 30);
  envelopes[1].mutable_check_in()->mutable_conditions()->set_charging(true);
  v1::Task* task = envelopes[2].mutable_check_in_reply()->mutable_task();
  task->set_round_id(3);
  task->set_method("kseed");
  (*task->mutable_hyperparameters())["lr"] = 0.001;
  (*task->mutable_hyperparameters())["steps"] = 10;
  envelopes[3].mutable_upload_chunk()->set_idempotency_key("phone-a/3/t");
  envelopes[3].mutable_upload_chunk()->set_data(std::string(40, 'x'));
  envelopes[4].mutable_reject()->set_message("bad");
  const char* names[] = {"hello", "check_in", "task", "upload_chunk", "reject"};
  std::string stream;
  for (size_t i = 0; i < envelopes.size(); ++i) {
    const std::string frame = Frame(envelopes[i]);
    WriteWithBroken("framing", names[i], std::string(1, '\xff') + frame);
    stream += frame;
  }
  // The whole stream fed in pieces of 3 bytes; a zero length; a length over the limit.
  Write("framing", "stream_in_pieces", std::string(1, '\x02') + stream);
  Write("framing", "zero_length", std::string("\xff\0\0\0\0", 5));
  Write("framing", "huge_length", std::string("\xff\x7f\xff\xff\xff", 5) + "abc");
  v1::Envelope version2 = envelopes[0];
  version2.set_protocol_version(2);
  Write("framing", "version2", std::string(1, '\xff') + Frame(version2));
}

void Codec() {
  std::vector<float> update(37);
  for (size_t i = 0; i < update.size(); ++i) update[i] = 0.25f * static_cast<float>(i) - 3.0f;
  const std::pair<const char*, comms::CodecOptions> codecs[] = {{"fp32", {v1::CODEC_FP32, 64, 0.01f}},
                                                                {"fp16", {v1::CODEC_FP16, 64, 0.01f}},
                                                                {"int8", {v1::CODEC_INT8, 8, 0.01f}},
                                                                {"int4", {v1::CODEC_INT4, 8, 0.01f}},
                                                                {"topk", {v1::CODEC_TOPK, 64, 0.2f}}};
  for (const auto& [name, options] : codecs) {
    comms::ErrorFeedback feedback(update.size());
    WriteWithBroken("codec", name, Value(comms::EncodeDense(update, options, 7, &feedback), name));
    if (options.codec == v1::CODEC_TOPK) Write("codec", "error_feedback", feedback.Serialize());
  }
  const comms::SeedIndexScalar index_pairs[] = {{3, 0.5f}, {4095, -1.0f}, {3, 2.0f}};
  const comms::SeedValueScalar seed_pairs[] = {{1ull << 40, 0.5f}, {7, -0.125f}};
  WriteWithBroken("codec", "seed_index", comms::EncodeSeedIndexScalars(index_pairs));
  WriteWithBroken("codec", "seed_value", comms::EncodeSeedValueScalars(seed_pairs));
}

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("seedling_make_corpus_" + name)).string();
}

std::string WrittenBytes(const std::string& path) {
  std::string bytes = Value(ReadFile(path), "read back");
  std::filesystem::remove(path);
  return bytes;
}

void Safetensors() {
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  const std::vector<uint16_t> b = {0x3c00, 0xbc00};
  const std::vector<model::TensorToWrite> tensors = {
      {"layers.0.q_proj.lora_A",
       model::DType::kF32,
       {2, 3},
       {reinterpret_cast<const uint8_t*>(a.data()), a.size() * 4}},
      {"bias", model::DType::kF16, {2}, {reinterpret_cast<const uint8_t*>(b.data()), b.size() * 2}}};
  const std::string path = TempPath("a.safetensors");
  Check(model::WriteSafetensors(path, tensors, {{"format", "pt"}}), "safetensors");
  WriteWithBroken("safetensors", "two_tensors", WrittenBytes(path));
  Check(model::WriteSafetensors(path, {}, {}), "empty safetensors");
  Write("safetensors", "empty", WrittenBytes(path));
}

void Gguf() {
  model::ModelConfig config = Value(model::PresetConfig("tiny"), "tiny preset");
  model::GgufLoraPair pair;
  pair.layer = 0;
  pair.projection = model::Projection::kQ;
  pair.a = torch::full({2, config.hidden_size}, 0.5f);
  pair.b = torch::full({config.q_dim(), 2}, -0.25f);
  const std::string path = TempPath("a.gguf");
  Check(model::WriteGgufLora(path, config, {pair}, 2.0), "gguf lora");
  WriteWithBroken("gguf", "lora_adapter", WrittenBytes(path));
}

void Tokenizer() {
  model::BpeTrainerOptions options;
  options.vocab_size = 300;
  const std::string json =
      Value(model::TrainByteLevelBpeTokenizerJson(
                "the quick brown fox jumps over the lazy dog; the dog sleeps. the fox runs, the fox hides.", options),
            "tokenizer");
  WriteWithBroken("tokenizer", "byte_level_bpe.json", json);
}

void ModelConfig() {
  for (const char* preset : {"tiny", "tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-gemma2", "tiny-gemma3",
                             "tiny-phi3", "tiny-gptneox", "tiny-gpt2", "tiny-opt", "tiny-phi", "smollm2-135m"}) {
    WriteWithBroken("model_config", std::string(preset) + ".json",
                    model::ModelConfigToJson(Value(model::PresetConfig(preset), preset)));
  }
}

void SecAgg() {
  privacy::SessionConfig config;
  config.params = {
      .num_clients = 5, .num_neighbors = 4, .threshold = 3, .max_dropout_fraction = 0.2, .vector_length = 9};
  config.round_index = 2;
  config.model_hash = "abc";
  config.cohort = {10, 11, 12, 13, 14};
  const privacy::SessionId session = Value(privacy::ComputeSessionId(config), "session id");
  privacy::PublicKey key{};
  key[0] = 9;

  WriteWithBroken("secagg", "setup", privacy::SetupMessage{config}.Serialize());
  WriteWithBroken("secagg", "advertise_keys", privacy::AdvertiseKeysMessage{session, 10, key, key}.Serialize());
  privacy::KeyDirectoryMessage directory{session, {{11, key, key}, {12, key, key}}};
  WriteWithBroken("secagg", "key_directory", directory.Serialize());
  const std::string ciphertext(privacy::kShareCiphertextBytes, '\x11');
  WriteWithBroken("secagg", "share_keys",
                  privacy::ShareKeysMessage{session, 10, {{11, ciphertext}, {12, ciphertext}}}.Serialize());
  WriteWithBroken("secagg", "share_relay", privacy::ShareRelayMessage{session, {{11, ciphertext}}}.Serialize());
  WriteWithBroken("secagg", "masked_input",
                  privacy::MaskedInputMessage{session, 10, {1, 2, 3, 4, 5, 6, 7, 8, 9}}.Serialize());
  WriteWithBroken("secagg", "unmask_request", privacy::UnmaskRequestMessage{session, {11}, {12}}.Serialize());
  privacy::UnmaskResponseMessage response{session, 10, {}};
  response.entries.push_back({11, privacy::ShareKind::kSelfMaskSeed, {1, 2, 3, 4, 5}});
  response.entries.push_back({12, privacy::ShareKind::kMaskKey, {6, 7, 8, 9, 10}});
  WriteWithBroken("secagg", "unmask_response", response.Serialize());
}

}  // namespace
}  // namespace seedling

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  seedling::g_root = argv[1];
  seedling::Framing();
  seedling::Codec();
  seedling::Safetensors();
  seedling::Gguf();
  seedling::Tokenizer();
  seedling::ModelConfig();
  seedling::SecAgg();
  std::printf("wrote the generated seeds under %s\n", argv[1]);
  return 0;
}
