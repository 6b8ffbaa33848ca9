#pragma once

// The simulator's attack model (simulator/simulation.h, AttackOptions): which devices attack, what their upload
// becomes, and the transport that puts it on the wire. Internal to the simulator.
//
// How an upload is rewritten. A hostile device runs the real client, which trains honestly and encodes its
// update. The client's upload observer (client::Client::SetUploadObserver, called before the update is staged)
// hands the encoded update to ArmAttacker's observer, which computes the hostile version (AttackPayload: decoded,
// transformed, re-encoded with the same codec and parameters, so the size is the same) and writes it to a stash
// file beside the device's state (<method dir>/attack/<device>.bin: the original's SHA-256, then the hostile
// bytes). The device's transport (AttackTransport, wrapping its simulated transport) rewrites the upload: an
// UploadBegin whose SHA-256 is the stashed original's gets the hostile bytes' SHA-256, and its chunks carry the
// hostile bytes at the same offsets. The stash is a file so that an upload resumed in a later activation, on any
// MPI rank that sees the work directory, is rewritten the same way. The client SDK holds no attack code.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "comms/transport.h"
#include "simulator/simulation.h"

namespace seedling::simulator::internal {

// hostile[d] for each of the population's `devices`: round(fraction · devices) of them, chosen by a partial
// shuffle seeded by `seed` (the simulation's), so every rank and every run of one simulation agree.
std::vector<bool> ChooseAttackers(const AttackOptions& attack, int64_t devices, uint64_t seed);

// The hostile version of an encoded update (comms/codec.h), with the same codec, parameters and size:
// dense (fp32, fp16, int8, int4) decoded, transformed and re-encoded; seed scalars with each scalar transformed.
// `seed` seeds the noise (kind noise) and int8/int4 stochastic rounding. InvalidArgument for top-k (its
// error-feedback residual lives on the device), a payload that does not decode, or a transformed value the
// codec cannot hold (fp16 beyond ±65504).
absl::StatusOr<std::string> AttackPayload(const AttackOptions& attack, std::string_view payload, uint64_t seed);

// Where hostile device `device` of the run whose state is in `method_dir` stashes its rewritten upload.
std::string AttackStashPath(const std::string& method_dir, int64_t device);

// Makes `client` (a hostile device's) stash the hostile version of each plaintext update it encodes, at
// `stash_path`. A failure to transform or write is logged and leaves the upload honest (the run's client errors
// do not count it); SecAgg inputs are left alone (the simulation refuses [attack] with [secagg]).
void ArmAttacker(client::Client& client, const AttackOptions& attack, std::string stash_path);

// One run's attackers on one rank: who they are, and how a device's client is made hostile.
class RunAttackers {
 public:
  // The attack of run `label` (SimulationOptions::RunAttack) over the population, stashing under `method_dir`.
  RunAttackers(const SimulationOptions& options, const std::string& label, int64_t devices, std::string method_dir);
  bool hostile(int64_t device) const;
  // `transport` itself for an honest device; wrapped in AttackTransport for a hostile one.
  std::unique_ptr<comms::Transport> Wrap(int64_t device, std::unique_ptr<comms::Transport> transport) const;
  // ArmAttacker for a hostile device; nothing for an honest one.
  void Arm(int64_t device, client::Client& client) const;

 private:
  const AttackOptions attack_;
  const std::vector<bool> hostile_;
  const std::string method_dir_;
};

// A hostile device's transport: `inner`'s channels, with uploads rewritten from the stash (see above).
class AttackTransport final : public comms::Transport {
 public:
  AttackTransport(std::unique_ptr<comms::Transport> inner, std::string stash_path)
      : inner_(std::move(inner)), stash_path_(std::move(stash_path)) {}
  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect(comms::Duration timeout) override;

 private:
  const std::unique_ptr<comms::Transport> inner_;
  const std::string stash_path_;
};

}  // namespace seedling::simulator::internal
