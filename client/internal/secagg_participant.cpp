#include "client/internal/secagg_participant.h"

#include <algorithm>
#include <cstring>

#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::client::internal {
namespace {

// Philox stream of the stochastic rounding, keyed by a fresh OS-random seed per update (the server cannot
// reproduce the rounding of any single device).
constexpr uint64_t kSecAggRoundingStream = 0x7365636167ULL;  // "secag"

absl::Status FromReject(v1::SecAggStage stage, const v1::Reject& r) {
  const std::string msg = StrCat("secure aggregation (", v1::SecAggStage_Name(stage),
                                 "): ", v1::RejectCode_Name(r.code()), ": ", r.message());
  switch (r.code()) {
    case v1::UNAUTHENTICATED:
      return absl::UnauthenticatedError(msg);
    case v1::STALE:
    case v1::ABORTED:
    case v1::INVALID_UPDATE:
      return absl::AbortedError(msg);  // out of the session: check in again later
    case v1::INTERNAL:
      return absl::UnavailableError(msg);
    default:
      return absl::FailedPreconditionError(msg);
  }
}

}  // namespace

absl::StatusOr<std::string> SecAggParticipant::Exchange(v1::SecAggStage stage, std::string message) {
  v1::Envelope request;
  v1::SecAggRequest* r = request.mutable_secagg();
  r->set_round_id(task_.round_id());
  r->set_task_id(task_.task_id());
  r->set_stage(stage);
  // A message longer than a piece: all pieces but the last first, each answered NotReady (or a Reject);
  // the last one goes through the loop below as a whole message would.
  const size_t piece = std::max<size_t>(1, io_.max_piece_bytes);
  size_t offset = 0;
  if (message.size() > piece) {
    r->set_message_size(message.size());
    for (; message.size() - offset > piece; offset += piece) {
      r->set_message_offset(offset);
      r->set_message(message.substr(offset, piece));
      SEEDLING_ASSIGN_OR_RETURN(v1::Envelope reply, io_.call(request));
      if (reply.has_reject()) return FromReject(stage, reply.reject());
      if (!reply.has_secagg_reply() || reply.secagg_reply().stage() != stage ||
          reply.secagg_reply().outcome_case() != v1::SecAggReply::kNotReady) {
        return absl::InternalError(
            StrCat("unexpected answer to a piece of SecAgg stage ", v1::SecAggStage_Name(stage)));
      }
    }
    r->set_message_offset(offset);
    message.erase(0, offset);
  }
  r->set_message(std::move(message));
  int64_t give_up_ms = -1;  // device clock; set by a NotReady announcing a new deadline
  uint64_t announced = 0;   // the deadline give_up_ms was computed from
  for (;;) {
    SEEDLING_ASSIGN_OR_RETURN(v1::Envelope reply, io_.call(request));
    if (reply.has_reject()) return FromReject(stage, reply.reject());
    if (!reply.has_secagg_reply() || reply.secagg_reply().stage() != stage) {
      return absl::InternalError(StrCat("unexpected answer to SecAgg stage ", v1::SecAggStage_Name(stage)));
    }
    const v1::SecAggReply& s = reply.secagg_reply();
    if (s.outcome_case() == v1::SecAggReply::kMessage) return s.message();
    if (s.outcome_case() != v1::SecAggReply::kNotReady) {
      return absl::InvalidArgumentError(StrCat("SecAgg reply for ", v1::SecAggStage_Name(stage), " has no outcome"));
    }
    const v1::SecAggReply::NotReady& wait = s.not_ready();
    // The stage's deadline on the server's clock (the round's while selection is open), turned into a local
    // deadline: the server closes the stage by then, so waiting longer is pointless.
    const uint64_t deadline = wait.stage_deadline_ms() > 0 ? wait.stage_deadline_ms() : task_.deadline_ms();
    const int64_t remaining =
        deadline > wait.server_time_ms() ? static_cast<int64_t>(deadline - wait.server_time_ms()) : 0;
    const int64_t now = NowMs();
    if (give_up_ms < 0 || deadline != announced) {
      announced = deadline;
      give_up_ms = now + remaining + io_.call_timeout_ms;
    }
    if (now > give_up_ms) break;
    const double delay_s = std::clamp<double>(wait.retry_after_ms(), 10.0, 10000.0) / 1000.0;
    if (!io_.sleep(delay_s)) return absl::CancelledError("cancelled");
    if (NowMs() > give_up_ms) break;
    request.mutable_secagg()->clear_message();  // the server holds the submission: just ask again
    request.mutable_secagg()->clear_message_offset();
    request.mutable_secagg()->clear_message_size();
  }
  return absl::DeadlineExceededError(
      StrCat("secure aggregation: stage ", v1::SecAggStage_Name(stage), " did not close by its deadline"));
}

absl::StatusOr<std::unique_ptr<SecAggParticipant>> SecAggParticipant::Join(const v1::Task& task,
                                                                           std::string verified_model_hash,
                                                                           SecAggIo io) {
  std::unique_ptr<SecAggParticipant> p(new SecAggParticipant(task, std::move(io)));
  SEEDLING_ASSIGN_OR_RETURN(std::string setup_bytes, p->Exchange(v1::SECAGG_SETUP, ""));
  SEEDLING_ASSIGN_OR_RETURN(privacy::SetupMessage setup, privacy::SetupMessage::Parse(setup_bytes));
  // The device's own view of the session: the server's cohort and parameters, bound to the model the
  // device verified. Any difference in the session id means the server told devices different things.
  privacy::SessionConfig mine = setup.config;
  mine.model_hash = std::move(verified_model_hash);
  SEEDLING_ASSIGN_OR_RETURN(const privacy::SessionId theirs, privacy::ComputeSessionId(setup.config));
  SEEDLING_ASSIGN_OR_RETURN(const privacy::SessionId ours, privacy::ComputeSessionId(mine));
  if (theirs != ours || mine.round_index != task.round_id()) {
    return absl::FailedPreconditionError(
        StrCat("secure aggregation: the server's session (round ", setup.config.round_index, ", model ",
               HexOf(setup.config.model_hash).substr(0, 16), ") is not the one this device verified (round ",
               task.round_id(), ", model ", HexOf(mine.model_hash).substr(0, 16), "); not taking part"));
  }
  if (mine.params.vector_length != task.num_parameters() + 1) {
    return absl::FailedPreconditionError(StrCat("secure aggregation: the session masks ", mine.params.vector_length,
                                                " entries, the task's adapter has ", task.num_parameters(), " + 1"));
  }
  p->config_ = mine;
  SEEDLING_ASSIGN_OR_RETURN(privacy::SecAggClient client,
                            privacy::SecAggClient::Create(p->config_, task.secagg().participant_id(), p->random_));
  p->client_.emplace(std::move(client));
  SEEDLING_ASSIGN_OR_RETURN(privacy::AdvertiseKeysMessage keys, p->client_->AdvertiseKeys());
  SEEDLING_ASSIGN_OR_RETURN(std::string directory_bytes, p->Exchange(v1::SECAGG_ADVERTISE_KEYS, keys.Serialize()));
  SEEDLING_ASSIGN_OR_RETURN(privacy::KeyDirectoryMessage directory,
                            privacy::KeyDirectoryMessage::Parse(directory_bytes));
  SEEDLING_ASSIGN_OR_RETURN(privacy::ShareKeysMessage shares, p->client_->ShareKeys(directory));
  SEEDLING_ASSIGN_OR_RETURN(std::string relay_bytes, p->Exchange(v1::SECAGG_SHARE_KEYS, shares.Serialize()));
  SEEDLING_ASSIGN_OR_RETURN(p->relay_, privacy::ShareRelayMessage::Parse(relay_bytes));
  return p;
}

absl::StatusOr<std::vector<uint32_t>> SecAggParticipant::Encode(std::span<const float> update, uint64_t weight) {
  const uint32_t w = static_cast<uint32_t>(std::clamp<uint64_t>(weight, 1, config_.params.max_weight));
  uint64_t seed = 0;
  if (io_.rounding_seed.has_value()) {
    // Simulation only: one seed per device and round, from the device's seed (base/philox.h streams).
    seed = Rng(*io_.rounding_seed, kSecAggRoundingStream + task_.round_id()).NextU64();
  } else {
    uint8_t seed_bytes[8];
    SEEDLING_RETURN_IF_ERROR(random_.Fill(seed_bytes));
    std::memcpy(&seed, seed_bytes, sizeof(seed));
  }
  return privacy::EncodeInput(update, w, config_.params, privacy::Rounding::kStochastic,
                              RngKey{seed, kSecAggRoundingStream});
}

absl::Status SecAggParticipant::Submit(std::span<const uint32_t> input) {
  if (!client_.has_value()) return absl::FailedPreconditionError("secure aggregation: Join first");
  SEEDLING_ASSIGN_OR_RETURN(privacy::MaskedInputMessage masked, client_->MaskInput(relay_, input));
  SEEDLING_ASSIGN_OR_RETURN(std::string request_bytes, Exchange(v1::SECAGG_MASKED_INPUT, masked.Serialize()));
  SEEDLING_ASSIGN_OR_RETURN(privacy::UnmaskRequestMessage request, privacy::UnmaskRequestMessage::Parse(request_bytes));
  SEEDLING_ASSIGN_OR_RETURN(privacy::UnmaskResponseMessage response, client_->Unmask(request));
  SEEDLING_ASSIGN_OR_RETURN(std::string done, Exchange(v1::SECAGG_UNMASK, response.Serialize()));
  (void)done;
  return absl::OkStatus();
}

}  // namespace seedling::client::internal
