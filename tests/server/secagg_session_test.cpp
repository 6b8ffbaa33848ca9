// The server's SecAgg+ session on its own (server/secagg_session.h): real clients (privacy::SecAggClient) run
// every stage through SecAggSession::Handle, with the requests a device would send, and the unmasked sum is
// compared with the sum computed in the test.

#include "server/secagg_session.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace seedling::server {
namespace {

constexpr int64_t kNow = 1'000'000;
constexpr int64_t kRoundDeadline = kNow + 600'000;
constexpr uint32_t kEntries = 6;  // adapter entries; the session masks one more (the weight slot)

SecAggConfig Config() {
  SecAggConfig c;
  c.enabled = true;
  c.max_dropout_fraction = 0.2;
  c.quantization_levels = 1 << 12;
  c.clipping_range = 1.0;
  c.max_weight = 1;
  c.stage_timeout_ms = 30'000;
  return c;
}

v1::SecAggRequest Request(v1::SecAggStage stage, std::string message = "") {
  v1::SecAggRequest r;
  r.set_stage(stage);
  r.set_message(std::move(message));
  return r;
}

// A cohort of devices running privacy::SecAggClient against one session.
struct Cohort {
  std::unique_ptr<SecAggSession> session;
  privacy::SessionConfig config;  // as the devices parse it from the SETUP reply
  privacy::SeededRandomSourceForSimulation random{7};
  std::map<uint32_t, privacy::SecAggClient> clients;
  std::map<uint32_t, std::vector<float>> inputs;

  explicit Cohort(std::vector<uint32_t> ids) {
    auto started = SecAggSession::Start(Config(), 3, ids, kEntries + 1, std::string(32, 'h'), kNow, kRoundDeadline);
    INFO(started.status().ToString());
    REQUIRE(started.ok());
    session = std::move(started).value();
    for (uint32_t id : ids) {
      const SecAggAnswer setup = session->Handle(id, Request(v1::SECAGG_SETUP));
      REQUIRE(setup.kind == SecAggAnswer::Kind::kReply);
      auto parsed = privacy::SetupMessage::Parse(setup.message);
      REQUIRE(parsed.ok());
      config = parsed->config;
      auto client = privacy::SecAggClient::Create(config, id, random);
      REQUIRE(client.ok());
      clients.emplace(id, std::move(*client));
      for (uint32_t i = 0; i < kEntries; ++i) inputs[id].push_back(0.1f * static_cast<float>(id) - 0.05f * i);
    }
  }

  // Sends `id`'s message for the open stage and closes the stage when the session says it is ready, as the
  // coordinator does.
  SecAggAnswer Submit(uint32_t id, v1::SecAggStage stage, std::string message, int64_t target) {
    SecAggAnswer a = session->Handle(id, Request(stage, std::move(message)));
    if (a.kind != SecAggAnswer::Kind::kAccepted) return a;
    if (session->ReadyToClose(target)) {
      auto closed = session->CloseStage(kNow);
      REQUIRE(closed.ok());
      if (closed->has_value()) sum = std::move(**closed);
    }
    return session->AnswerAfterSubmit(id, stage);
  }

  // The closed previous stage's reply to `id`, as a device polls for it.
  std::string Reply(uint32_t id, v1::SecAggStage stage) {
    const SecAggAnswer a = session->Handle(id, Request(static_cast<v1::SecAggStage>(stage - 1)));
    REQUIRE(a.kind == SecAggAnswer::Kind::kReply);
    return a.message;
  }

  std::string Message(uint32_t id, v1::SecAggStage stage) {
    privacy::SecAggClient& c = clients.at(id);
    switch (stage) {
      case v1::SECAGG_ADVERTISE_KEYS:
        return c.AdvertiseKeys()->Serialize();
      case v1::SECAGG_SHARE_KEYS:
        return c.ShareKeys(*privacy::KeyDirectoryMessage::Parse(Reply(id, stage)))->Serialize();
      case v1::SECAGG_MASKED_INPUT: {
        auto input = privacy::EncodeInput(inputs.at(id), 1, config.params, privacy::Rounding::kNearest);
        REQUIRE(input.ok());
        return c.MaskInput(*privacy::ShareRelayMessage::Parse(Reply(id, stage)), *input)->Serialize();
      }
      default:
        return c.Unmask(*privacy::UnmaskRequestMessage::Parse(Reply(id, stage)))->Serialize();
    }
  }

  std::optional<SecAggSum> sum;
};

float Step() { return 2.0f / static_cast<float>((1 << 12) - 1); }  // one quantization step of [−1, 1]

}  // namespace

TEST_CASE("A SecAgg session unmasks the sum of its cohort's inputs", "[server][secagg]") {
  Cohort cohort({1, 2, 3, 4, 5});
  for (v1::SecAggStage stage :
       {v1::SECAGG_ADVERTISE_KEYS, v1::SECAGG_SHARE_KEYS, v1::SECAGG_MASKED_INPUT, v1::SECAGG_UNMASK}) {
    REQUIRE(cohort.session->stage() == stage);
    for (uint32_t id = 1; id <= 5; ++id) {
      const SecAggAnswer a = cohort.Submit(id, stage, cohort.Message(id, stage), 5);
      // Until the last device answers, the others poll; the last one gets its next-stage reply at once. An
      // unmask answer ends the device's part.
      const bool reply = id == 5 || stage == v1::SECAGG_UNMASK;
      CHECK(a.kind == (reply ? SecAggAnswer::Kind::kReply : SecAggAnswer::Kind::kNotReady));
    }
  }
  REQUIRE(cohort.sum.has_value());
  CHECK(cohort.sum->clients == 5);
  CHECK(cohort.sum->aggregate.total_weight == 5);
  for (uint32_t i = 0; i < kEntries; ++i) {
    double expected = 0;
    for (uint32_t id = 1; id <= 5; ++id) expected += cohort.inputs[id][i];
    CHECK(std::abs(cohort.sum->aggregate.weighted_sum[i] - expected) <= 5 * Step());
  }
}

TEST_CASE("A SecAgg session closes the masked input at the target and drops the missing device", "[server][secagg]") {
  Cohort cohort({1, 2, 3, 4, 5});
  for (v1::SecAggStage stage : {v1::SECAGG_ADVERTISE_KEYS, v1::SECAGG_SHARE_KEYS}) {
    for (uint32_t id = 1; id <= 5; ++id) cohort.Submit(id, stage, cohort.Message(id, stage), 4);
  }
  REQUIRE(cohort.session->stage() == v1::SECAGG_MASKED_INPUT);
  CHECK(cohort.session->stage_deadline_ms() == kRoundDeadline);  // the masked input includes training
  for (uint32_t id = 1; id <= 4; ++id)
    cohort.Submit(id, v1::SECAGG_MASKED_INPUT, cohort.Message(id, v1::SECAGG_MASKED_INPUT), 4);
  // Four of five is the target and one dropout fits the budget: the unmask stage is open.
  REQUIRE(cohort.session->stage() == v1::SECAGG_UNMASK);
  const SecAggAnswer late = cohort.session->Handle(5, Request(v1::SECAGG_MASKED_INPUT, "late"));
  CHECK(late.kind == SecAggAnswer::Kind::kReject);
  CHECK(late.code == v1::ABORTED);
  for (uint32_t id = 1; id <= 4; ++id) cohort.Submit(id, v1::SECAGG_UNMASK, cohort.Message(id, v1::SECAGG_UNMASK), 4);
  REQUIRE(cohort.sum.has_value());
  CHECK(cohort.sum->clients == 4);
  for (uint32_t i = 0; i < kEntries; ++i) {
    double expected = 0;
    for (uint32_t id = 1; id <= 4; ++id) expected += cohort.inputs[id][i];
    CHECK(std::abs(cohort.sum->aggregate.weighted_sum[i] - expected) <= 4 * Step());
  }
}

TEST_CASE("A SecAgg session answers polls, pieces and out-of-turn requests without changing state",
          "[server][secagg]") {
  Cohort cohort({1, 2, 3});
  const std::string keys = cohort.Message(1, v1::SECAGG_ADVERTISE_KEYS);

  SECTION("a message in pieces is added once its last piece is in") {
    v1::SecAggRequest first = Request(v1::SECAGG_ADVERTISE_KEYS, keys.substr(0, 10));
    first.set_message_size(keys.size());
    CHECK(cohort.session->Handle(1, first).kind == SecAggAnswer::Kind::kNotReady);
    CHECK(cohort.session->Handle(1, first).kind == SecAggAnswer::Kind::kNotReady);  // re-sent piece
    CHECK(cohort.session->progress().answered == 0);
    v1::SecAggRequest rest = Request(v1::SECAGG_ADVERTISE_KEYS, keys.substr(10));
    rest.set_message_size(keys.size());
    rest.set_message_offset(10);
    CHECK(cohort.session->Handle(1, rest).kind == SecAggAnswer::Kind::kAccepted);
    CHECK(cohort.session->progress().answered == 1);
  }
  SECTION("a piece out of order is refused") {
    v1::SecAggRequest gap = Request(v1::SECAGG_ADVERTISE_KEYS, keys.substr(10));
    gap.set_message_size(keys.size());
    gap.set_message_offset(10);
    const SecAggAnswer a = cohort.session->Handle(1, gap);
    CHECK(a.kind == SecAggAnswer::Kind::kReject);
    CHECK(a.code == v1::MALFORMED_MESSAGE);
  }
  SECTION("a re-sent message is a poll; a different one is refused") {
    REQUIRE(cohort.session->Handle(1, Request(v1::SECAGG_ADVERTISE_KEYS, keys)).kind == SecAggAnswer::Kind::kAccepted);
    CHECK(cohort.session->Handle(1, Request(v1::SECAGG_ADVERTISE_KEYS, keys)).kind == SecAggAnswer::Kind::kNotReady);
    const SecAggAnswer other = cohort.session->Handle(1, Request(v1::SECAGG_ADVERTISE_KEYS, keys + "x"));
    CHECK(other.kind == SecAggAnswer::Kind::kReject);
    CHECK(other.code == v1::ABORTED);
    CHECK(cohort.session->progress().answered == 1);
  }
  SECTION("a stage that is not open, a stranger and a forged sender are refused") {
    CHECK(cohort.session->Handle(1, Request(v1::SECAGG_UNMASK, "x")).code == v1::MALFORMED_MESSAGE);
    CHECK(cohort.session->Handle(9, Request(v1::SECAGG_SETUP)).code == v1::NOT_SELECTED);
    const SecAggAnswer forged = cohort.session->Handle(2, Request(v1::SECAGG_ADVERTISE_KEYS, keys));
    CHECK(forged.kind == SecAggAnswer::Kind::kReject);
    CHECK(forged.code == v1::INVALID_UPDATE);
    CHECK_FALSE(forged.invalid.empty());
    CHECK(cohort.session->progress().expected == 2);  // device 2 is now a dropout
  }
}

TEST_CASE("A SecAgg session that loses too many devices fails and releases nothing", "[server][secagg]") {
  Cohort cohort({1, 2, 3, 4, 5});
  for (uint32_t id = 1; id <= 2; ++id) {
    cohort.Submit(id, v1::SECAGG_ADVERTISE_KEYS, cohort.Message(id, v1::SECAGG_ADVERTISE_KEYS), 5);
  }
  // The deadline passes with three of five silent: more dropouts than the session tolerates.
  auto closed = cohort.session->CloseStage(kNow + 30'000);
  CHECK_FALSE(closed.ok());
  CHECK(cohort.session->stage() == v1::SECAGG_ADVERTISE_KEYS);
}

TEST_CASE("Too small a cohort for the SecAgg parameters does not start a session", "[server][secagg]") {
  auto started = SecAggSession::Start(Config(), 3, {1}, kEntries + 1, std::string(32, 'h'), kNow, kRoundDeadline);
  CHECK_FALSE(started.ok());
}

}  // namespace seedling::server
