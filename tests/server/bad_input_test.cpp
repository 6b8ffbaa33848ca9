// Table-driven bad input against a live coordinator behind real TLS: every bad request gets its own code
// and changes nothing durable (the store's checksum is the same before and after).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>

#include "base/file.h"
#include "base/sha256.h"
#include "comms/codec.h"
#include "comms/framing.h"
#include "comms/tls.h"
#include "model/init.h"
#include "server/coordinator.h"
#include "tests/server/store_rounds.h"

namespace seedling::server {
namespace {

struct Harness {
  std::string dir;
  ServerConfig config;
  ManualClock clock;
  std::unique_ptr<Coordinator> coordinator;
  std::unique_ptr<comms::TlsServer> server;
  std::unique_ptr<comms::Transport> transport;
  std::string token;
  std::string other_token;

  // `max_update_norm`: the server's cap; 0 turns it off, so what lies behind it can be tested.
  explicit Harness(double max_update_norm = 5.0) {
    static std::atomic<int> n{0};
    dir = std::filesystem::temp_directory_path() /
          ("seedling_bad_" + std::to_string(getpid()) + "_" + std::to_string(n++));
    std::filesystem::create_directories(dir);
    model::InitModelOptions init;
    init.preset = "tiny";
    REQUIRE(model::InitModel(JoinPath(dir, "model"), init).ok());
    comms::CertificateOptions co;
    co.dir = JoinPath(dir, "certs");
    REQUIRE(comms::CreateCertificates(co).ok());
    config.state_dir = JoinPath(dir, "state");
    config.model_dir = JoinPath(dir, "model");
    config.cert_file = JoinPath(co.dir, "server.crt");
    config.key_file = JoinPath(co.dir, "server.key");
    config.codec.codec = v1::CODEC_FP32;
    config.clients_per_round = 2;
    config.min_reports = 1;
    config.max_update_norm = max_update_norm;
    config.lora_rank = 2;
    auto c = Coordinator::Create(config, &clock, nullptr);
    REQUIRE(c.ok());
    coordinator = std::move(c).value();
    auto t = coordinator->RegisterDevice("phone");
    REQUIRE(t.ok());
    token = *t;
    auto o = coordinator->RegisterDevice("other");
    REQUIRE(o.ok());
    other_token = *o;
    coordinator->Tick();  // round 1 opens
    comms::TlsServerOptions tls;
    tls.cert_file = config.cert_file;
    tls.key_file = config.key_file;
    tls.read_timeout = comms::Duration(300);
    tls.idle_timeout = comms::Duration(2000);
    tls.handshake_timeout = comms::Duration(2000);
    auto s = comms::TlsServer::Start(tls, coordinator->handler_factory());
    REQUIRE(s.ok());
    server = std::move(s).value();
    comms::TlsClientOptions tc;
    tc.port = server->port();
    tc.ca_file = JoinPath(co.dir, "ca.crt");
    tc.server_name = "localhost";
    auto tr = comms::MakeTlsTransport(tc);
    REQUIRE(tr.ok());
    transport = std::move(tr).value();
  }
  ~Harness() {
    if (server != nullptr) server->Stop();
    std::filesystem::remove_all(dir);
  }

  std::string Checksum() {
    auto c = coordinator->StoreChecksum();
    REQUIRE(c.ok());
    return *c;
  }

  std::unique_ptr<comms::Channel> Authenticated(const std::string& device = "phone") {
    auto ch = transport->Connect(comms::Duration(5000));
    REQUIRE(ch.ok());
    v1::Envelope hello;
    hello.set_protocol_version(1);
    hello.set_request_id(1);
    hello.mutable_hello()->set_device_id(device);
    hello.mutable_hello()->set_token(device == "other" ? other_token : token);
    auto r = (*ch)->Call(hello, comms::Duration(5000));
    REQUIRE(r.ok());
    REQUIRE(r->has_hello_reply());
    return std::move(ch).value();
  }

  v1::Envelope Call(comms::Channel& ch, v1::Envelope e) {
    static std::atomic<uint64_t> id{100};
    e.set_protocol_version(1);
    e.set_request_id(++id);
    auto r = ch.Call(e, comms::Duration(5000));
    REQUIRE(r.ok());
    return *r;
  }

  v1::Task CheckIn(comms::Channel& ch) {
    v1::Envelope e;
    e.mutable_check_in()->mutable_conditions()->set_charging(true);
    v1::Envelope r = Call(ch, e);
    REQUIRE(r.has_check_in_reply());
    REQUIRE(r.check_in_reply().has_task());
    return r.check_in_reply().task();
  }

  // UploadBegin + one chunk + commit of `payload` for `task`; returns the commit's (or the first) response.
  v1::Envelope Upload(comms::Channel& ch, const v1::Task& task, const std::string& payload,
                      const std::string& device = "phone") {
    const std::string key = device + "/" + std::to_string(task.round_id()) + "/" + task.task_id();
    v1::Envelope b;
    b.mutable_upload_begin()->set_round_id(task.round_id());
    b.mutable_upload_begin()->set_task_id(task.task_id());
    b.mutable_upload_begin()->set_idempotency_key(key);
    b.mutable_upload_begin()->set_total_bytes(payload.size());
    b.mutable_upload_begin()->set_codec(task.codec().codec());
    b.mutable_upload_begin()->set_num_examples(3);
    b.mutable_upload_begin()->set_sha256(Sha256(payload));
    v1::Envelope r = Call(ch, b);
    if (r.has_reject() || r.upload_ack().accepted()) return r;
    for (size_t off = 0; off < payload.size(); off += comms::kMaxChunkBytes) {
      v1::Envelope c;
      c.mutable_upload_chunk()->set_idempotency_key(key);
      c.mutable_upload_chunk()->set_offset(off);
      c.mutable_upload_chunk()->set_data(payload.substr(off, comms::kMaxChunkBytes));
      r = Call(ch, c);
      if (r.has_reject()) return r;
    }
    v1::Envelope m;
    m.mutable_upload_commit()->set_idempotency_key(key);
    return Call(ch, m);
  }

  std::string Dense(const v1::Task& task, float value) {
    std::vector<float> v(task.num_parameters(), value);
    comms::CodecOptions o;
    o.codec = v1::CODEC_FP32;
    auto p = comms::EncodeDense(v, o, 0);
    REQUIRE(p.ok());
    return *p;
  }
};

// A raw TLS connection for writing arbitrary bytes (the SDK's channel only sends well-formed frames).
struct RawTls {
  SSL_CTX* ctx = nullptr;
  SSL* ssl = nullptr;
  int fd = -1;
  bool handshake_ok = false;

  RawTls(uint16_t port, int max_version = 0) {
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);  // the server is what is under test here
    if (max_version != 0) SSL_CTX_set_max_proto_version(ctx, max_version);
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    handshake_ok = SSL_connect(ssl) == 1;
  }
  ~RawTls() {
    if (ssl != nullptr) SSL_free(ssl);
    if (fd >= 0) ::close(fd);
    SSL_CTX_free(ctx);
  }
  void Write(const std::string& bytes) { REQUIRE(SSL_write(ssl, bytes.data(), static_cast<int>(bytes.size())) > 0); }
  // Reads one response frame; nullopt if the server closed the connection without one.
  std::optional<v1::Envelope> ReadFrame() {
    uint8_t header[4];
    int got = 0;
    while (got < 4) {
      const int n = SSL_read(ssl, header + got, 4 - got);
      if (n <= 0) return std::nullopt;
      got += n;
    }
    const uint32_t len =
        (uint32_t{header[0]} << 24) | (uint32_t{header[1]} << 16) | (uint32_t{header[2]} << 8) | header[3];
    std::string body(len, '\0');
    size_t have = 0;
    while (have < len) {
      const int n = SSL_read(ssl, body.data() + have, static_cast<int>(len - have));
      if (n <= 0) return std::nullopt;
      have += static_cast<size_t>(n);
    }
    auto e = comms::DecodeFrameBody(body);
    if (!e.ok()) return std::nullopt;
    return *e;
  }
  bool Closed() {
    char c;
    return SSL_read(ssl, &c, 1) <= 0;
  }
};

std::string Frame(const v1::Envelope& e) {
  auto f = comms::EncodeFrame(e, comms::kMaxControlFrameBytes);
  REQUIRE(f.ok());
  return *f;
}

TEST_CASE("Bad input gets its own code and changes nothing durable", "[server][bad-input]") {
  Harness h;
  auto ch = h.Authenticated();
  const v1::Task task = h.CheckIn(*ch);

  struct Row {
    const char* name;
    std::function<v1::RejectCode()> run;  // returns the code the server answered with
    v1::RejectCode expected;
  };
  auto reject_code = [](const v1::Envelope& e) { return e.has_reject() ? e.reject().code() : v1::REJECT_UNSPECIFIED; };
  const std::vector<Row> rows = {
      {"length prefix over the limit",
       [&] {
         RawTls raw(h.server->port());
         REQUIRE(raw.handshake_ok);
         raw.Write(std::string("\xff\xff\xff\xf0", 4));  // ~4 GiB: must be refused before any allocation
         auto reply = raw.ReadFrame();
         CHECK(raw.Closed());
         return reply ? reject_code(*reply) : v1::REJECT_UNSPECIFIED;
       },
       v1::RESOURCE_EXHAUSTED},
      {"garbage bytes",
       [&] {
         RawTls raw(h.server->port());
         REQUIRE(raw.handshake_ok);
         raw.Write(std::string("\x00\x00\x00\x08garbage!", 12));
         auto reply = raw.ReadFrame();
         return reply ? reject_code(*reply) : v1::REJECT_UNSPECIFIED;
       },
       v1::MALFORMED_MESSAGE},
      {"a protocol version this server does not speak",
       [&] {
         RawTls raw(h.server->port());
         REQUIRE(raw.handshake_ok);
         raw.Write(Frame([] {
           v1::Envelope e;
           e.set_protocol_version(2);
           e.mutable_hello()->set_device_id("phone");
           return e;
         }()));
         auto reply = raw.ReadFrame();
         return reply ? reject_code(*reply) : v1::REJECT_UNSPECIFIED;
       },
       v1::UNSUPPORTED_VERSION},
      {"truncated frame (then silence): closed after the read timeout, no answer",
       [&] {
         RawTls raw(h.server->port());
         REQUIRE(raw.handshake_ok);
         std::string frame = Frame([] {
           v1::Envelope e;
           e.set_protocol_version(1);
           e.mutable_hello()->set_device_id("phone");
           return e;
         }());
         raw.Write(frame.substr(0, frame.size() - 3));
         return raw.ReadFrame().has_value() ? v1::INTERNAL : v1::REJECT_UNSPECIFIED;
       },
       v1::REJECT_UNSPECIFIED},
      {"wrong token",
       [&] {
         auto c = h.transport->Connect(comms::Duration(5000));
         REQUIRE(c.ok());
         v1::Envelope hello;
         hello.mutable_hello()->set_device_id("phone");
         hello.mutable_hello()->set_token("not-the-token");
         return reject_code(h.Call(**c, hello));
       },
       v1::UNAUTHENTICATED},
      {"a request before Hello",
       [&] {
         auto c = h.transport->Connect(comms::Duration(5000));
         REQUIRE(c.ok());
         v1::Envelope e;
         e.mutable_check_in();
         return reject_code(h.Call(**c, e));
       },
       v1::UNAUTHENTICATED},
      {"TLS 1.2 client: no handshake",
       [&] {
         RawTls raw(h.server->port(), TLS1_2_VERSION);
         return raw.handshake_ok ? v1::INTERNAL : v1::REJECT_UNSPECIFIED;
       },
       v1::REJECT_UNSPECIFIED},
      {"wrong shapes",
       [&] {
         std::vector<float> v(task.num_parameters() - 1, 0.01f);
         comms::CodecOptions o;
         auto p = comms::EncodeDense(v, o, 0);
         return reject_code(h.Upload(*ch, task, *p));
       },
       v1::INVALID_UPDATE},
      {"NaN",
       [&] {
         // The encoder refuses NaN, so write it into a valid payload's first value by hand.
         std::string payload = h.Dense(task, 0.0f);
         const float nan = std::numeric_limits<float>::quiet_NaN();
         std::memcpy(payload.data() + comms::kPayloadHeaderBytes, &nan, sizeof(nan));
         return reject_code(h.Upload(*ch, task, payload));
       },
       v1::INVALID_UPDATE},
      {"norm over the cap", [&] { return reject_code(h.Upload(*ch, task, h.Dense(task, 1.0f))); }, v1::INVALID_UPDATE},
      {"bad codec payload", [&] { return reject_code(h.Upload(*ch, task, std::string(64, 'x'))); }, v1::INVALID_UPDATE},
      {"an upload for a task the device does not have",
       [&] {
         v1::Task other = task;
         other.set_task_id("r1-99");
         return reject_code(h.Upload(*ch, other, h.Dense(task, 0.0f)));
       },
       v1::NOT_SELECTED},
  };
  for (const Row& row : rows) {
    DYNAMIC_SECTION(row.name) {
      const std::string before = h.Checksum();
      const v1::RejectCode code = row.run();
      INFO(row.name << ": got " << v1::RejectCode_Name(code));
      CHECK(code == row.expected);
      CHECK(h.Checksum() == before);
    }
  }
}

TEST_CASE("A duplicate upload under a used key is refused and changes nothing", "[server][bad-input]") {
  Harness h;
  auto ch = h.Authenticated();
  const v1::Task task = h.CheckIn(*ch);
  const v1::Envelope first = h.Upload(*ch, task, h.Dense(task, 0.001f));
  REQUIRE(first.has_upload_ack());
  REQUIRE(first.upload_ack().accepted());
  const std::string before = h.Checksum();
  // The exact retry gets the same acknowledgement, counted once...
  const v1::Envelope retry = h.Upload(*ch, task, h.Dense(task, 0.001f));
  CHECK(retry.has_upload_ack());
  CHECK(retry.upload_ack().accepted());
  // ...a different update under the same key is a Duplicate.
  const v1::Envelope dup = h.Upload(*ch, task, h.Dense(task, 0.002f));
  REQUIRE(dup.has_reject());
  CHECK(dup.reject().code() == v1::DUPLICATE);
  CHECK(h.Checksum() == before);
  auto round = h.coordinator->FindRound(task.round_id());
  REQUIRE(round.ok());
  CHECK((*round)->accepted == 1);
}

TEST_CASE("An upload after the round's deadline is Stale and changes nothing", "[server][bad-input]") {
  Harness h;
  auto ch = h.Authenticated();
  const v1::Task task = h.CheckIn(*ch);
  h.clock.Advance(h.config.round_deadline_s * 1000 + 1);  // the deadline passed (the tick has not run yet)
  const std::string before = h.Checksum();
  const v1::Envelope r = h.Upload(*ch, task, h.Dense(task, 0.001f));
  REQUIRE(r.has_reject());
  CHECK(r.reject().code() == v1::STALE);
  CHECK(h.Checksum() == before);
}

TEST_CASE("Huge finite updates never commit a non-finite global model", "[server][bad-input]") {
  // 3e38 per element is finite, but two of them sum past float's range. With the norm cap off, only
  // the check of the aggregate stands between them and a global model of infinities.
  Harness h(/*max_update_norm=*/0);
  for (int round = 0; round < 3; ++round) {
    for (const std::string device : {"phone", "other"}) {
      auto ch = h.Authenticated(device);
      const v1::Task task = h.CheckIn(*ch);
      const v1::Envelope r = h.Upload(*ch, task, h.Dense(task, 3e38f), device);
      REQUIRE(r.has_upload_ack());
      CHECK(r.upload_ack().accepted());
    }
    h.coordinator->Tick();  // the next round opens
  }
  int aborted = 0;
  for (uint64_t id = 1; id <= 3; ++id) {
    auto round = h.coordinator->FindRound(id);
    REQUIRE(round.ok());
    REQUIRE(round->has_value());
    if ((*round)->state == RoundState::kAborted) {
      ++aborted;
      CHECK_THAT((*round)->abort_reason, Catch::Contains("the aggregate is not finite (params[0])"));
    }
  }
  CHECK(aborted >= 2);  // 3e38 + 3e38 overflows whatever the first round committed
  CHECK(h.coordinator->global_version() < 3);
  for (float x : h.coordinator->global_params()) REQUIRE(std::isfinite(x));
  CHECK(h.coordinator->Health().ok());
}

TEST_CASE("The default norm cap refuses a 3e38 update on its own", "[server][bad-input]") {
  Harness h(kDefaultMaxUpdateNorm);
  auto ch = h.Authenticated();
  const v1::Task task = h.CheckIn(*ch);
  const std::string before = h.Checksum();
  const v1::Envelope r = h.Upload(*ch, task, h.Dense(task, 3e38f));
  REQUIRE(r.has_reject());
  CHECK(r.reject().code() == v1::INVALID_UPDATE);
  CHECK_THAT(r.reject().message(), Catch::Contains("exceeds max_update_norm 100000"));
  CHECK(h.Checksum() == before);
  // An honest update (norm ~0.3) passes the same cap.
  const v1::Envelope ok = h.Upload(*ch, task, h.Dense(task, 0.001f));
  REQUIRE(ok.has_upload_ack());
  CHECK(ok.upload_ack().accepted());
}

TEST_CASE("A stored non-finite global model makes /healthz unhealthy and opens no round", "[server][bad-input]") {
  Harness h;
  const size_t n = h.coordinator->global_params().size();
  h.server->Stop();
  h.server.reset();
  h.coordinator.reset();
  {
    // What a build before the aggregate check could commit.
    auto store = Store::Open(h.config.state_dir);
    REQUIRE(store.ok());
    REQUIRE((*store)->AbortRound(1, 1, "test").ok());
    const uint64_t id = seedling::server::testing::AggregatingRound(**store);
    std::vector<float> params(n, 0.0f);
    params[7] = std::numeric_limits<float>::infinity();
    REQUIRE((*store)->WriteCheckpoint(1, {{"params", params}}).ok());
    REQUIRE((*store)->CommitRound(id, 1, 3, "{}", "").ok());
  }
  auto c = Coordinator::Create(h.config, &h.clock, nullptr);
  REQUIRE(c.ok());
  const absl::Status health = (*c)->Health();
  CHECK(health.code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(health.message()), Catch::Contains("global model version 1 is not finite (params[7])"));
  (*c)->Tick();
  auto next = (*c)->FindRound(3);
  REQUIRE(next.ok());
  CHECK_FALSE(next->has_value());
}

}  // namespace
}  // namespace seedling::server
