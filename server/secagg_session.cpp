#include "server/secagg_session.h"

#include <algorithm>
#include <utility>

#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/transport.h"
#include "spdlog/spdlog.h"

namespace seedling::server {

const char* SecAggStageName(v1::SecAggStage stage) {
  switch (stage) {
    case v1::SECAGG_SETUP:
      return "setup";
    case v1::SECAGG_ADVERTISE_KEYS:
      return "advertise_keys";
    case v1::SECAGG_SHARE_KEYS:
      return "share_keys";
    case v1::SECAGG_MASKED_INPUT:
      return "masked_input";
    case v1::SECAGG_UNMASK:
      return "unmask";
    default:
      return "unspecified";
  }
}

SecAggAnswer SecAggAnswer::Reply(std::string message) {
  SecAggAnswer a;
  a.kind = Kind::kReply;
  a.message = std::move(message);
  return a;
}

SecAggAnswer SecAggAnswer::NotReady(int64_t deadline_ms) {
  SecAggAnswer a;
  a.kind = Kind::kNotReady;
  a.deadline_ms = deadline_ms;
  return a;
}

SecAggAnswer SecAggAnswer::Reject(v1::RejectCode code, std::string message, const char* reason) {
  SecAggAnswer a;
  a.kind = Kind::kReject;
  a.code = code;
  a.message = std::move(message);
  a.reason = reason;
  return a;
}

// ---- start ------------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<SecAggSession>> SecAggSession::Start(const SecAggConfig& config, uint64_t round_id,
                                                                    std::vector<uint32_t> cohort,
                                                                    uint32_t vector_length, std::string model_hash,
                                                                    int64_t now, int64_t round_deadline_ms) {
  privacy::SessionConfig session;
  session.cohort = std::move(cohort);
  SEEDLING_ASSIGN_OR_RETURN(session.params,
                            SecAggParamsFor(config, static_cast<uint32_t>(session.cohort.size()), vector_length));
  session.round_index = round_id;
  session.model_hash = std::move(model_hash);  // of the adapter at the round's base version (what tasks carry)
  SEEDLING_ASSIGN_OR_RETURN(privacy::SecAggServer server, privacy::SecAggServer::Create(session));
  const privacy::SecAggParams& p = session.params;
  spdlog::info("round {}: secure aggregation session of {} devices (k = {}, t = {}, at most {} dropouts)", round_id,
               p.num_clients, p.num_neighbors, p.threshold, p.num_clients - privacy::MinSurvivors(p));
  return std::unique_ptr<SecAggSession>(
      new SecAggSession(config, std::move(session), std::move(server), now, round_deadline_ms));
}

SecAggSession::SecAggSession(const SecAggConfig& config, privacy::SessionConfig session, privacy::SecAggServer server,
                             int64_t now, int64_t round_deadline_ms)
    : stage_timeout_ms_(config.stage_timeout_ms),
      round_deadline_ms_(round_deadline_ms),
      config_(std::move(session)),
      setup_(privacy::SetupMessage{config_}.Serialize()),
      server_(std::move(server)),
      stage_deadline_ms_(now + stage_timeout_ms_),
      expected_(config_.cohort.begin(), config_.cohort.end()) {}

// ---- requests ---------------------------------------------------------------------------------------------

SecAggAnswer SecAggSession::Dropped() const {
  return SecAggAnswer::Reject(v1::ABORTED,
                              StrCat("this device is no longer in the secure-aggregation session (stage ",
                                     SecAggStageName(stage_), " is open)"),
                              "secagg_dropped");
}

SecAggAnswer SecAggSession::Handle(uint32_t id, const v1::SecAggRequest& request) {
  if (std::find(config_.cohort.begin(), config_.cohort.end(), id) == config_.cohort.end()) {
    return SecAggAnswer::Reject(v1::NOT_SELECTED, "this device is not in the round's secure-aggregation cohort",
                                "not_selected");
  }
  if (request.stage() == v1::SECAGG_SETUP) return SecAggAnswer::Reply(setup_);
  if (request.stage() + 1 == stage_) {  // the previous stage closed: its reply, if the device made it
    auto it = replies_.find(id);
    return it != replies_.end() ? SecAggAnswer::Reply(it->second) : Dropped();
  }
  if (request.stage() != stage_) {
    if (request.stage() > stage_) {
      return SecAggAnswer::Reject(v1::MALFORMED_MESSAGE,
                                  StrCat("stage ", SecAggStageName(request.stage()), " is not open yet"), "malformed");
    }
    return Dropped();
  }
  if (!expected_.count(id)) return Dropped();
  if (answered_.count(id)) return Poll(id, request);
  if (request.message().empty()) {
    return SecAggAnswer::Reject(v1::MALFORMED_MESSAGE,
                                StrCat("no ", SecAggStageName(request.stage()), " message to poll for"), "malformed");
  }
  if (request.message_size() == 0) return Add(id, request.stage(), request.message());
  SecAggAnswer answer;
  std::optional<std::string> whole = Assemble(id, request, &answer);
  return whole.has_value() ? Add(id, request.stage(), *whole) : answer;
}

// A request of a device that already answered the open stage: a poll, or a re-sent submission after a lost
// reply (a piece of a whole message that already arrived is one too).
SecAggAnswer SecAggSession::Poll(uint32_t id, const v1::SecAggRequest& request) {
  if (!request.message().empty() && request.message_size() == 0 && Sha256(request.message()) != submitted_[id]) {
    // E.g. the app restarted and drew new keys: its neighbours already hold the old ones.
    return SecAggAnswer::Reject(v1::ABORTED, "a different message for a stage this device already answered",
                                "secagg_dropped");
  }
  return request.stage() == v1::SECAGG_UNMASK ? SecAggAnswer::Reply("") : SecAggAnswer::NotReady(stage_deadline_ms_);
}

std::optional<std::string> SecAggSession::Assemble(uint32_t id, const v1::SecAggRequest& request,
                                                   SecAggAnswer* answer) {
  const uint64_t limit = request.stage() == v1::SECAGG_MASKED_INPUT
                             ? 4 * static_cast<uint64_t>(config_.params.vector_length) + 4096
                             : comms::kMaxControlFrameBytes;
  if (request.message_size() > limit) {
    *answer = SecAggAnswer::Reject(v1::RESOURCE_EXHAUSTED,
                                   StrCat("a ", SecAggStageName(request.stage()), " message of ",
                                          request.message_size(), " bytes; this session's are at most ", limit),
                                   "secagg_too_large");
    return std::nullopt;
  }
  std::string& held = pieces_[id];
  const uint64_t offset = request.message_offset();
  const uint64_t size = request.message().size();
  if (offset + size <= held.size() && held.compare(offset, size, request.message()) == 0) {
    *answer = SecAggAnswer::NotReady(stage_deadline_ms_);  // a piece re-sent after a lost reply
    return std::nullopt;
  }
  if (offset != held.size() || offset + size > request.message_size()) {
    *answer =
        SecAggAnswer::Reject(v1::MALFORMED_MESSAGE,
                             StrCat("a piece of ", size, " bytes at offset ", offset, " of a ", request.message_size(),
                                    "-byte message; the server holds ", held.size(), " bytes of it"),
                             "malformed");
    return std::nullopt;
  }
  held += request.message();
  if (held.size() < request.message_size()) {
    *answer = SecAggAnswer::NotReady(stage_deadline_ms_);
    return std::nullopt;
  }
  std::string whole = std::move(held);
  pieces_.erase(id);
  return whole;
}

// Parses the message, checks its sender is this device (an authenticated device speaks only for its own id),
// and adds it to the library's session.
SecAggAnswer SecAggSession::Add(uint32_t id, v1::SecAggStage stage, const std::string& message) {
  absl::Status added;
  auto add = [&](auto parsed, auto add_fn) {
    if (!parsed.ok()) {
      added = parsed.status();
    } else if (parsed->sender != id) {
      added =
          absl::InvalidArgumentError(StrCat("message from participant ", parsed->sender, " sent by participant ", id));
    } else {
      added = add_fn(*parsed);
    }
  };
  switch (stage) {
    case v1::SECAGG_ADVERTISE_KEYS:
      add(privacy::AdvertiseKeysMessage::Parse(message), [&](const auto& m) { return server_.AddAdvertiseKeys(m); });
      break;
    case v1::SECAGG_SHARE_KEYS:
      add(privacy::ShareKeysMessage::Parse(message), [&](const auto& m) { return server_.AddShareKeys(m); });
      break;
    case v1::SECAGG_MASKED_INPUT:
      add(privacy::MaskedInputMessage::Parse(message), [&](const auto& m) { return server_.AddMaskedInput(m); });
      break;
    default:
      add(privacy::UnmaskResponseMessage::Parse(message), [&](const auto& m) { return server_.AddUnmaskResponse(m); });
  }
  if (!added.ok()) {
    // The library counts the sender as dropped; so does the session (it no longer waits for it).
    expected_.erase(id);
    SecAggAnswer answer =
        SecAggAnswer::Reject(v1::INVALID_UPDATE, StrCat("secure aggregation: ", added.message()), "secagg_invalid");
    answer.invalid = std::string(added.message());
    return answer;
  }
  answered_.insert(id);
  submitted_[id] = Sha256(message);
  SecAggAnswer answer;
  answer.kind = SecAggAnswer::Kind::kAccepted;
  answer.bytes = message.size();
  return answer;
}

SecAggAnswer SecAggSession::AnswerAfterSubmit(uint32_t id, v1::SecAggStage submitted) const {
  if (submitted == v1::SECAGG_UNMASK) return SecAggAnswer::Reply("");  // the device's part is over
  if (stage_ == submitted + 1) {  // the stage closed: the device's reply for the next one
    if (auto it = replies_.find(id); it != replies_.end()) return SecAggAnswer::Reply(it->second);
  }
  return SecAggAnswer::NotReady(stage_deadline_ms_);
}

// ---- closing stages ---------------------------------------------------------------------------------------

bool SecAggSession::ReadyToClose(int64_t target) const {
  if (AllAnswered()) return true;
  if (stage_ != v1::SECAGG_MASKED_INPUT) return false;
  const uint64_t answered = answered_.size();
  const uint64_t cohort = config_.cohort.size();
  const uint64_t max_dropouts = cohort - privacy::MinSurvivors(config_.params);
  return answered >= static_cast<uint64_t>(target) && cohort - answered <= max_dropouts;
}

absl::StatusOr<std::map<uint32_t, std::string>> SecAggSession::CloseKeyStage() {
  std::map<uint32_t, std::string> replies;
  auto collect = [&](auto result) -> absl::Status {
    if (!result.ok()) return result.status();
    for (const auto& [id, message] : *result) replies[id] = message.Serialize();
    return absl::OkStatus();
  };
  switch (stage_) {
    case v1::SECAGG_ADVERTISE_KEYS:
      SEEDLING_RETURN_IF_ERROR(collect(server_.CloseAdvertiseKeys()));
      break;
    case v1::SECAGG_SHARE_KEYS:
      SEEDLING_RETURN_IF_ERROR(collect(server_.CloseShareKeys()));
      break;
    case v1::SECAGG_MASKED_INPUT:
      SEEDLING_RETURN_IF_ERROR(collect(server_.CloseMaskedInput()));
      break;
    default:
      return absl::InternalError("no stage to close");
  }
  return replies;
}

void SecAggSession::OpenNextStage(std::map<uint32_t, std::string> replies, int64_t now) {
  replies_ = std::move(replies);
  expected_.clear();
  for (const auto& [id, reply] : replies_) expected_.insert(id);
  answered_.clear();
  submitted_.clear();
  pieces_.clear();  // a message still incomplete when its stage closed came too late
  stage_ = static_cast<v1::SecAggStage>(stage_ + 1);
  // The masked input includes local training: it has the round's deadline, as a plaintext upload would.
  stage_deadline_ms_ = stage_ == v1::SECAGG_MASKED_INPUT ? round_deadline_ms_ : now + stage_timeout_ms_;
}

absl::StatusOr<std::optional<SecAggSum>> SecAggSession::CloseStage(int64_t now) {
  if (stage_ != v1::SECAGG_UNMASK) {
    auto replies = CloseKeyStage();
    if (!replies.ok()) return replies.status();
    OpenNextStage(std::move(replies).value(), now);
    return std::nullopt;
  }
  // Reconstruct, unmask, and decode Σ w·x and Σ w.
  SEEDLING_ASSIGN_OR_RETURN(privacy::AggregateResult result, server_.Finish());
  SecAggSum sum;
  SEEDLING_ASSIGN_OR_RETURN(sum.aggregate, privacy::DecodeAggregate(result.sum, config_.params));
  sum.clients = static_cast<int64_t>(result.survivors.size());
  return sum;
}

SecAggProgress SecAggSession::progress() const {
  SecAggProgress p;
  p.stage = stage_;
  p.cohort = static_cast<int64_t>(config_.cohort.size());
  p.expected = static_cast<int64_t>(expected_.size());
  p.answered = static_cast<int64_t>(answered_.size());
  return p;
}

}  // namespace seedling::server
