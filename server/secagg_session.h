#pragma once

// One round's SecAgg+ session on the server (docs/architecture.md, "Privacy"; the messages in docs/protocol.md,
// "SecAgg+ stages"): the stage machine between the coordinator and privacy::SecAggServer.
//
//   SETUP → ADVERTISE_KEYS → SHARE_KEYS → MASKED_INPUT → UNMASK → the unmasked sum
//
// The cohort is fixed when the session starts (the devices holding a task when selection closes). Each stage
// collects one message per device still in the session; it closes when every such device answered, at its
// deadline, or (masked input only) once the round's target of inputs is in and the devices still missing fit
// in the dropout budget. Closing a stage hands each device that answered its reply for the next stage; a
// device that missed a stage is a dropout from then on. Closing the unmask stage yields Σ w·x and Σ w.
//
// The session knows nothing of rounds, tasks, the store or the strategy: the coordinator checks that a
// request belongs to the active round and task, maps the device to its participant id, turns answers into
// envelopes, and decides what a closed session means for the round. It lives in memory only: a server crash
// aborts the round, as any unfinished round. Not thread-safe (the coordinator holds its lock).

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comms/proto/seedling.pb.h"
#include "privacy/secagg.h"
#include "server/config.h"

namespace seedling::server {

// "setup", "advertise_keys", ...; "unspecified" for anything else (metrics labels, messages).
const char* SecAggStageName(v1::SecAggStage stage);

// Where a session is (tests, tools): the stage being collected (UNSPECIFIED when no session runs), the
// cohort size, and how many of the devices still in the session answered it.
struct SecAggProgress {
  v1::SecAggStage stage = v1::SECAGG_STAGE_UNSPECIFIED;
  int64_t cohort = 0;
  int64_t expected = 0;  // devices that may answer this stage (answered the previous one)
  int64_t answered = 0;
};

// The session's answer to one request.
struct SecAggAnswer {
  enum class Kind {
    kReply,     // `message` is the reply (possibly empty: the device's part is over)
    kNotReady,  // poll again; `deadline_ms` is the open stage's deadline (0: the session has not started)
    kReject,    // `code`, `message`, `reason` (the metrics label)
    kAccepted,  // the device's message for the open stage was added (`bytes` long)
  };
  Kind kind = Kind::kNotReady;
  std::string message;
  int64_t deadline_ms = 0;
  v1::RejectCode code = v1::REJECT_UNSPECIFIED;
  const char* reason = "";
  std::string invalid;  // kReject of a message the library refused: why (the device is now a dropout)
  uint64_t bytes = 0;

  static SecAggAnswer Reply(std::string message);
  static SecAggAnswer NotReady(int64_t deadline_ms);
  static SecAggAnswer Reject(v1::RejectCode code, std::string message, const char* reason);
};

// The unmasked result of a session.
struct SecAggSum {
  privacy::DecodedAggregate aggregate;  // Σ w·x per entry and Σ w
  int64_t clients = 0;                  // the survivors whose inputs the sum holds
};

class SecAggSession {
 public:
  // Starts a session for `cohort` (participant ids) over vectors of `vector_length` entries (the adapter
  // plus the weight slot). The advertise-keys stage is open until now + stage_timeout_ms; the masked-input
  // stage will end at `round_deadline_ms`. InvalidArgument when the parameters do not fit the cohort.
  static absl::StatusOr<std::unique_ptr<SecAggSession>> Start(const SecAggConfig& config, uint64_t round_id,
                                                              std::vector<uint32_t> cohort, uint32_t vector_length,
                                                              std::string model_hash, int64_t now,
                                                              int64_t round_deadline_ms);

  // Handles participant `id`'s request (the caller checked it holds a task in this round). kAccepted when
  // its message for the open stage was added: then close the stage if ReadyToClose, and answer with
  // AnswerAfterSubmit.
  SecAggAnswer Handle(uint32_t id, const v1::SecAggRequest& request);
  // The answer to a device whose `submitted` message was accepted, after any close that followed.
  SecAggAnswer AnswerAfterSubmit(uint32_t id, v1::SecAggStage submitted) const;

  // Every device still in the session answered the open stage.
  bool AllAnswered() const { return answered_.size() >= expected_.size(); }
  // AllAnswered, or the masked-input stage holds `target` inputs and the missing devices fit in the
  // dropout budget (as a plaintext round finishes at its target, a SecAgg round need not wait for the
  // deadline because one device vanished; the missing devices become the session's dropouts).
  bool ReadyToClose(int64_t target) const;

  // Closes the open stage: nullopt when the next stage opened, the unmasked sum after the unmask stage.
  // An error means the session failed at stage() and releases nothing.
  absl::StatusOr<std::optional<SecAggSum>> CloseStage(int64_t now);

  v1::SecAggStage stage() const { return stage_; }
  int64_t stage_deadline_ms() const { return stage_deadline_ms_; }
  size_t cohort_size() const { return config_.cohort.size(); }
  SecAggProgress progress() const;

 private:
  SecAggSession(const SecAggConfig& config, privacy::SessionConfig session, privacy::SecAggServer server, int64_t now,
                int64_t round_deadline_ms);

  SecAggAnswer Dropped() const;
  SecAggAnswer Poll(uint32_t id, const v1::SecAggRequest& request);
  // Holds a message arriving in pieces; the whole message once its last piece is in (comms/proto "Size").
  std::optional<std::string> Assemble(uint32_t id, const v1::SecAggRequest& request, SecAggAnswer* answer);
  SecAggAnswer Add(uint32_t id, v1::SecAggStage stage, const std::string& message);
  absl::StatusOr<std::map<uint32_t, std::string>> CloseKeyStage();
  void OpenNextStage(std::map<uint32_t, std::string> replies, int64_t now);

  // Constant after construction.
  const int64_t stage_timeout_ms_;
  const int64_t round_deadline_ms_;
  const privacy::SessionConfig config_;
  const std::string setup_;  // privacy::SetupMessage, serialized: the SETUP reply

  privacy::SecAggServer server_;
  v1::SecAggStage stage_ = v1::SECAGG_ADVERTISE_KEYS;  // the stage being collected
  int64_t stage_deadline_ms_ = 0;
  std::set<uint32_t> expected_;                // may answer stage_: got the previous stage's reply
  std::set<uint32_t> answered_;                // ⊆ expected_
  std::map<uint32_t, std::string> submitted_;  // SHA-256 of each answer to stage_
  std::map<uint32_t, std::string> replies_;    // the closed previous stage's reply to each device, serialized
  std::map<uint32_t, std::string> pieces_;     // stage_ messages arriving in pieces, so far
};

}  // namespace seedling::server
