#pragma once

// The device's side of a SecAgg+ round (privacy/secagg.h over the SecAggRequest / SecAggReply messages of
// comms/proto/seedling.proto): Join runs SETUP, ADVERTISE_KEYS and SHARE_KEYS before local training;
// Submit runs MASKED_INPUT and UNMASK after it. Only the masked vector leaves the device.
//
// Waiting: a stage whose inputs the server is still collecting is answered NotReady; the participant asks
// again after the server's retry hint. It gives up (DeadlineExceeded) when the stage's deadline, as the
// server last announced it relative to its own clock, has passed on the device's clock by more than one
// call timeout: every wait is bounded by the server's deadlines plus the transport's call timeout.
//
// Honest-client checks: the device binds the session to the SHA-256 of the adapter it downloaded and
// verified, not to the server's word; if the session id it computes differs from the one the server's
// setup gives (another model hash, round or parameters), it aborts (FailedPrecondition) before sending any
// key. Any later error aborts the participant for good (privacy::SecAggClient), which the server counts as
// a dropout. Not thread-safe; lives within one Client::RunOnce.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "base/clock.h"
#include "comms/proto/seedling.pb.h"
#include "privacy/secagg.h"

namespace seedling::client::internal {

struct SecAggIo {
  // Sends one request and returns the server's reply (reconnecting as the client's Call does).
  std::function<absl::StatusOr<v1::Envelope>(v1::Envelope)> call;
  // Sleeps; false if the run was cancelled meanwhile.
  std::function<bool(double seconds)> sleep;
  // The device's clock (any epoch; base/clock.h): bounds the waits. Null: the host's SteadyClock;
  // otherwise it must outlive the participant.
  const Clock* clock = nullptr;
  // Simulation only (client::SimulationHooks): seeds Encode's stochastic rounding instead of the CSPRNG.
  std::optional<uint64_t> rounding_seed;
  int64_t call_timeout_ms = 30000;
  // A message longer than this goes in pieces of this size (the client's upload chunk size, ≤ 1 MiB).
  size_t max_piece_bytes = 1 << 20;
};

class SecAggParticipant {
 public:
  // `verified_model_hash`: raw SHA-256 of the global adapter bytes the device synced and checked.
  // Errors: FailedPrecondition (session mismatch: the device refuses to take part), Aborted (the server
  // dropped the device or the round), DeadlineExceeded, InvalidArgument (a malformed server message), and
  // the transport's errors.
  static absl::StatusOr<std::unique_ptr<SecAggParticipant>> Join(const v1::Task& task, std::string verified_model_hash,
                                                                 SecAggIo io);

  const privacy::SecAggParams& params() const { return config_.params; }

  // Quantizes `update` (clipped to ±c, w = min(weight, W)) with unbiased stochastic rounding from the OS
  // CSPRNG (or from io.rounding_seed and the round); the result is what Submit masks. InvalidArgument for a
  // wrong length or non-finite values.
  absl::StatusOr<std::vector<uint32_t>> Encode(std::span<const float> update, uint64_t weight);

  // Masks `input` (from Encode), sends it, and answers the unmask request. OK once the server holds the
  // device's unmasking shares (the round's outcome is the server's).
  absl::Status Submit(std::span<const uint32_t> input);

 private:
  SecAggParticipant(const v1::Task& task, SecAggIo io) : task_(task), io_(std::move(io)) {}
  // Sends `message` for `stage`, then asks again while the server is not ready; returns the reply's message.
  absl::StatusOr<std::string> Exchange(v1::SecAggStage stage, std::string message);
  int64_t NowMs() const { return (io_.clock != nullptr ? *io_.clock : steady_).NowMs(); }

  v1::Task task_;
  SecAggIo io_;
  const SteadyClock steady_;        // the clock when io_.clock is null
  privacy::OsRandomSource random_;  // must outlive client_ (declared before it)
  privacy::SessionConfig config_;
  std::optional<privacy::SecAggClient> client_;
  privacy::ShareRelayMessage relay_;
};

}  // namespace seedling::client::internal
