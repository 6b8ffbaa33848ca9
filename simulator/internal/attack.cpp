// The simulator's attack model (simulator/internal/attack.h).

#include "simulator/internal/attack.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>

#include "base/file.h"
#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "simulator/internal/world.h"

namespace seedling::simulator::internal {
namespace {

// Salts that keep the attack's draws apart from the simulation's other streams of the same seed.
constexpr uint64_t kAttackerChoiceSalt = 0xA77AC4E5C401CEULL;
constexpr uint64_t kAttackNoiseSalt = 0xA77AC4E5A015EULL;

// One value of the update, transformed. `noise` is this value's N(0, 1) draw (kind noise only).
float Transform(const AttackOptions& attack, float x, float noise) {
  const double s = attack.EffectiveScale();
  if (attack.kind == "scale") return static_cast<float>(s * x);
  if (attack.kind == "sign-flip") return static_cast<float>(-s * x);
  return static_cast<float>(s * noise);  // noise: the update is replaced
}

// values[i] ← Transform(values[i]) with the noise stream of `seed`.
void TransformAll(const AttackOptions& attack, std::span<float> values, uint64_t seed) {
  std::vector<float> noise(values.size(), 0.0f);
  if (attack.kind == "noise") FillNormal({seed ^ kAttackNoiseSalt, rng_stream::kPerturbation}, 0, noise);
  for (size_t i = 0; i < values.size(); ++i) values[i] = Transform(attack, values[i], noise[i]);
}

// The stash file: the original's 32-byte SHA-256, then the hostile payload.
struct Stash {
  std::string original_sha256;
  std::string hostile;
};

std::optional<Stash> ReadStash(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFile(path);
  if (!bytes.ok() || bytes->size() < 32) return std::nullopt;
  return Stash{bytes->substr(0, 32), bytes->substr(32)};
}

// A hostile device's connection: uploads whose original is stashed go out as the hostile bytes.
class AttackChannel final : public comms::Channel {
 public:
  AttackChannel(std::unique_ptr<comms::Channel> inner, const std::string& stash_path)
      : inner_(std::move(inner)), stash_path_(stash_path) {}

  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, comms::Duration timeout) override {
    if (request.has_upload_begin()) {
      // A new upload, or the same one resumed: look the stash up again.
      stash_ = ReadStash(stash_path_);
      if (!stash_.has_value() || stash_->original_sha256 != request.upload_begin().sha256() ||
          stash_->hostile.size() != request.upload_begin().total_bytes()) {
        stash_.reset();
        return inner_->Call(request, timeout);
      }
      key_ = request.upload_begin().idempotency_key();
      v1::Envelope hostile = request;
      hostile.mutable_upload_begin()->set_sha256(Sha256(stash_->hostile));
      return inner_->Call(hostile, timeout);
    }
    if (request.has_upload_chunk() && stash_.has_value() && request.upload_chunk().idempotency_key() == key_) {
      const v1::UploadChunk& chunk = request.upload_chunk();
      if (chunk.offset() <= stash_->hostile.size() && chunk.data().size() <= stash_->hostile.size() - chunk.offset()) {
        v1::Envelope hostile = request;
        hostile.mutable_upload_chunk()->set_data(stash_->hostile.substr(chunk.offset(), chunk.data().size()));
        return inner_->Call(hostile, timeout);
      }
    }
    return inner_->Call(request, timeout);
  }
  void Close() override { inner_->Close(); }

 private:
  const std::unique_ptr<comms::Channel> inner_;
  const std::string stash_path_;
  // The device thread only.
  std::optional<Stash> stash_;  // of the upload this connection is sending
  std::string key_;             // its idempotency key
};

}  // namespace

std::vector<bool> ChooseAttackers(const AttackOptions& attack, int64_t devices, uint64_t seed) {
  std::vector<bool> hostile(static_cast<size_t>(std::max<int64_t>(devices, 0)), false);
  if (!attack.enabled() || devices <= 0) return hostile;
  const auto count = std::min<int64_t>(devices, std::llround(attack.fraction * static_cast<double>(devices)));
  // Partial Fisher-Yates: the first `count` places of a seeded permutation.
  std::vector<int64_t> order(static_cast<size_t>(devices));
  std::iota(order.begin(), order.end(), int64_t{0});
  Rng rng(seed ^ kAttackerChoiceSalt, rng_stream::kData);
  for (int64_t i = 0; i < count; ++i) {
    const auto j = i + static_cast<int64_t>(rng.UniformInt(static_cast<uint64_t>(devices - i)));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
    hostile[static_cast<size_t>(order[static_cast<size_t>(i)])] = true;
  }
  return hostile;
}

absl::StatusOr<std::string> AttackPayload(const AttackOptions& attack, std::string_view payload, uint64_t seed) {
  SEEDLING_ASSIGN_OR_RETURN(const comms::PayloadInfo info, comms::InspectPayload(payload));
  switch (info.codec) {
    case v1::CODEC_FP32:
    case v1::CODEC_FP16:
    case v1::CODEC_INT8:
    case v1::CODEC_INT4: {
      SEEDLING_ASSIGN_OR_RETURN(std::vector<float> update, comms::DecodeDense(payload));
      TransformAll(attack, update, seed);
      comms::CodecOptions options{.codec = info.codec, .block_size = info.block_size};
      return comms::EncodeDense(update, options, seed);
    }
    case v1::CODEC_SEED_SCALARS: {
      if (info.seed_kind == comms::SeedScalarKind::kIndex) {
        SEEDLING_ASSIGN_OR_RETURN(std::vector<comms::SeedIndexScalar> pairs,
                                  comms::DecodeSeedIndexScalars(payload, std::numeric_limits<uint32_t>::max()));
        std::vector<float> values(pairs.size());
        for (size_t i = 0; i < pairs.size(); ++i) values[i] = pairs[i].value;
        TransformAll(attack, values, seed);
        for (size_t i = 0; i < pairs.size(); ++i) pairs[i].value = values[i];
        return comms::EncodeSeedIndexScalars(pairs);
      }
      SEEDLING_ASSIGN_OR_RETURN(std::vector<comms::SeedValueScalar> pairs, comms::DecodeSeedValueScalars(payload));
      std::vector<float> values(pairs.size());
      for (size_t i = 0; i < pairs.size(); ++i) values[i] = pairs[i].value;
      TransformAll(attack, values, seed);
      for (size_t i = 0; i < pairs.size(); ++i) pairs[i].value = values[i];
      return comms::EncodeSeedValueScalars(pairs);
    }
    default:
      return absl::InvalidArgumentError(StrCat("[attack] cannot rewrite a ", comms::CodecName(info.codec),
                                               " update (top-k's error-feedback residual stays on the device)"));
  }
}

std::string AttackStashPath(const std::string& method_dir, int64_t device) {
  return JoinPath(JoinPath(method_dir, "attack"), DeviceId(device) + ".bin");
}

void ArmAttacker(client::Client& client, const AttackOptions& attack, std::string stash_path) {
  client.SetUploadObserver([attack, stash_path = std::move(stash_path)](const v1::Task& task,
                                                                        const std::string& payload, uint64_t weight) {
    (void)weight;
    if (task.has_secagg()) return;  // a masked input: refused by the simulation's options
    absl::StatusOr<std::string> hostile = AttackPayload(attack, payload, task.seed());
    absl::Status written = hostile.status();
    if (hostile.ok()) {
      std::error_code ec;
      std::filesystem::create_directories(std::filesystem::path(stash_path).parent_path(), ec);
      written = WriteFileAtomic(stash_path, Sha256(payload) + *hostile);
    }
    if (!written.ok()) {
      spdlog::error("attack: the update of round {} stays honest: {}", task.round_id(), std::string(written.message()));
    }
  });
}

RunAttackers::RunAttackers(const SimulationOptions& options, const std::string& label, int64_t devices,
                           std::string method_dir)
    : attack_(options.RunAttack(label)),
      hostile_(ChooseAttackers(attack_, devices, options.seed)),
      method_dir_(std::move(method_dir)) {}

bool RunAttackers::hostile(int64_t device) const {
  return device >= 0 && static_cast<size_t>(device) < hostile_.size() && hostile_[static_cast<size_t>(device)];
}

std::unique_ptr<comms::Transport> RunAttackers::Wrap(int64_t device,
                                                     std::unique_ptr<comms::Transport> transport) const {
  if (!hostile(device)) return transport;
  return std::make_unique<AttackTransport>(std::move(transport), AttackStashPath(method_dir_, device));
}

void RunAttackers::Arm(int64_t device, client::Client& client) const {
  if (hostile(device)) ArmAttacker(client, attack_, AttackStashPath(method_dir_, device));
}

absl::StatusOr<std::unique_ptr<comms::Channel>> AttackTransport::Connect(comms::Duration timeout) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<comms::Channel> inner, inner_->Connect(timeout));
  return std::unique_ptr<comms::Channel>(new AttackChannel(std::move(inner), stash_path_));
}

}  // namespace seedling::simulator::internal
