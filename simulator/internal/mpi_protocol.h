#pragma once

// The simulator's MPI protocol (simulator/mpi.h carries the bytes): the messages between rank 0, which runs
// the coordinator and the event loop, and the ranks that run forwarded devices' clients; their encodings;
// agreeing on a work directory; and the device rank's side. Internal to the simulator.

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "nlohmann/json.hpp"
#include "simulator/internal/world.h"
#include "simulator/mpi.h"

namespace seedling::simulator::internal {

// How long a rank waits for the next message of a device on another rank (its training, or the gate).
inline constexpr std::chrono::milliseconds kRankTimeout{3'600'000};

// Messages between rank 0 and the rank of a forwarded device. The first byte is the kind; statuses and
// small records are JSON, envelopes their protobuf bytes.
enum MsgKind : char {
  kStart = 'S',        // rank 0 → owner (control mailbox): run device {method, device, token, conditions}
  kQuit = 'Q',         // rank 0 → all (control mailbox): the simulation is over
  kWorkDir = 'W',      // rank 0 → all (control mailbox): {work_dir, token} of its work directory
  kSeesWorkDir = 'w',  // rank r → rank 0 (control mailbox): {rank, sees}: whether it found the token
  kConnect = 'c',      // owner → rank 0: open a connection; payload: timeout ms
  kConnected = 'C',    // rank 0 → owner: status
  kCall = 'q',         // owner → rank 0: 8-byte timeout ms, 8-byte seconds the device slept since its
                       // last call (a double), then the request envelope
  kReply = 'R',        // rank 0 → owner: 'T' (take a compute slot: training starts) or '-', the
                       // device's clock after the reply (8-byte double), then '1' + reply envelope, or
                       // '0' + status
  kClose = 'x',        // owner → rank 0: close the connection
  kDone = 'd',         // owner → rank 0: the RunOnce result
};

nlohmann::json StatusJson(const absl::Status& st);
// Internal if `j` is not a status StatusJson wrote.
absl::Status StatusFromJson(const nlohmann::json& j);

// A kDone message with a RunOnce result, and its body (after the kind byte) decoded.
std::string EncodeResult(const absl::StatusOr<client::RunResult>& r);
absl::StatusOr<client::RunResult> DecodeResult(std::string_view body);

// A double as its 8 IEEE-754 bytes, little-endian.
void PutDouble(std::string& out, double v);
double GetDouble(std::string_view in);

// With several ranks: rank 0 announces its work directory and a token written there; every rank reports
// whether it sees the token. If all do, they share rank 0's directory (dynamic placement); otherwise each
// rank r > 0 works in <work_dir>/rank-<r> (static placement). Every rank calls this.
absl::StatusOr<WorkDir> AgreeWorkDir(const SimulationOptions& options, MpiRanks& ranks);

// A rank other than 0: runs the clients of its devices when rank 0 starts them, until rank 0 says quit.
absl::Status RunDeviceRank(const World& world);

}  // namespace seedling::simulator::internal
