// Tests of the transports: framing, the in-memory transport, TLS server and client, certificates.
// TLS tests run a real TlsServer on 127.0.0.1 with certificates made by CreateCertificates in a
// temporary directory; attacks and slow peers are played by a raw OpenSSL client written here.

#include "comms/transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "base/file.h"
#include "base/memory.h"
#include "comms/framing.h"
#include "comms/in_memory.h"
#include "comms/internal/openssl_util.h"
#include "comms/tls.h"
#include "spdlog/spdlog.h"

namespace seedling::comms {
namespace {

using namespace std::chrono_literals;
using Ms = std::chrono::milliseconds;

// Writes to a peer that is gone must fail with EPIPE, not kill the test; server chatter stays out
// of the test output.
const bool kProcessSetUp = [] {
  ::signal(SIGPIPE, SIG_IGN);
  spdlog::set_level(spdlog::level::warn);
  return true;
}();

Ms Since(Clock::time_point start) { return std::chrono::duration_cast<Ms>(Clock::now() - start); }

// Polls `pred` until it holds or `timeout` passes (for state that has no notification, e.g. a
// server's connection count).
template <typename Pred>
bool Eventually(Pred pred, Ms timeout = 10s) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (!pred()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = (std::filesystem::temp_directory_path() /
             ("seedling_transport_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++)))
                .string();
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return JoinPath(path_, name); }

 private:
  std::string path_;
};

struct Certs {
  TempDir dir;
  std::string ca() const { return dir.File("ca.crt"); }
  std::string server_crt() const { return dir.File("server.crt"); }
  std::string server_key() const { return dir.File("server.key"); }
};

std::unique_ptr<Certs> MakeCerts() {
  auto certs = std::make_unique<Certs>();
  CertificateOptions options;
  options.dir = certs->dir.path();
  absl::Status status = CreateCertificates(options);
  REQUIRE(status.ToString() == "OK");
  return certs;
}

// -------------------------------------------------------------------------------------------------
// A test handler: answers Hello with a HelloReply carrying the device_id in server_version,
// anything else with an Ack; answers bad frames with a Reject whose code follows the error; records
// what happened.

struct HandlerStats {
  std::mutex mu;
  std::condition_variable cv;
  int created = 0;
  int handled = 0;
  int closed = 0;
  std::vector<PeerInfo> peers;
  std::vector<absl::Status> malformed;
  std::atomic<size_t> max_request_bytes{kMaxControlFrameBytes};
  std::atomic<int> handle_sleep_ms{0};

  template <typename Pred>
  bool WaitFor(Pred pred, Ms timeout = 10s) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, pred);
  }
  int Created() {
    std::lock_guard<std::mutex> lock(mu);
    return created;
  }
  int Handled() {
    std::lock_guard<std::mutex> lock(mu);
    return handled;
  }
  int Closed() {
    std::lock_guard<std::mutex> lock(mu);
    return closed;
  }
  std::vector<absl::Status> Malformed() {
    std::lock_guard<std::mutex> lock(mu);
    return malformed;
  }
};

class TestHandler final : public ConnectionHandler {
 public:
  explicit TestHandler(std::shared_ptr<HandlerStats> stats) : stats_(std::move(stats)) {}

  size_t MaxRequestBytes() const override { return stats_->max_request_bytes.load(); }

  v1::Envelope Handle(const v1::Envelope& request) override {
    if (const int ms = stats_->handle_sleep_ms.load(); ms > 0) std::this_thread::sleep_for(Ms(ms));
    {
      std::lock_guard<std::mutex> lock(stats_->mu);
      ++stats_->handled;
    }
    stats_->cv.notify_all();
    v1::Envelope response;
    response.set_protocol_version(1);
    response.set_request_id(request.request_id());
    if (request.has_hello()) {
      response.mutable_hello_reply()->set_server_version(request.hello().device_id());
    } else {
      response.mutable_ack();
    }
    return response;
  }

  v1::Envelope OnMalformed(const absl::Status& error) override {
    {
      std::lock_guard<std::mutex> lock(stats_->mu);
      stats_->malformed.push_back(error);
    }
    stats_->cv.notify_all();
    v1::Envelope response;
    response.set_protocol_version(1);
    v1::Reject* reject = response.mutable_reject();
    switch (error.code()) {
      case absl::StatusCode::kResourceExhausted:
        reject->set_code(v1::RESOURCE_EXHAUSTED);
        break;
      case absl::StatusCode::kFailedPrecondition:
        reject->set_code(v1::UNSUPPORTED_VERSION);
        break;
      default:
        reject->set_code(v1::MALFORMED_MESSAGE);
    }
    reject->set_message(std::string(error.message()));
    return response;
  }

  void OnClose() override {
    {
      std::lock_guard<std::mutex> lock(stats_->mu);
      ++stats_->closed;
    }
    stats_->cv.notify_all();
  }

 private:
  std::shared_ptr<HandlerStats> stats_;
};

HandlerFactory FactoryFor(const std::shared_ptr<HandlerStats>& stats) {
  return [stats](const PeerInfo& peer) {
    {
      std::lock_guard<std::mutex> lock(stats->mu);
      ++stats->created;
      stats->peers.push_back(peer);
    }
    stats->cv.notify_all();
    return std::make_unique<TestHandler>(stats);
  };
}

v1::Envelope Hello(uint64_t request_id, const std::string& device_id) {
  v1::Envelope e;
  e.set_protocol_version(1);
  e.set_request_id(request_id);
  e.mutable_hello()->set_device_id(device_id);
  e.mutable_hello()->set_token("secret-token");
  return e;
}

// -------------------------------------------------------------------------------------------------
// TLS fixtures.

TlsServerOptions ServerOptions(const Certs& certs) {
  TlsServerOptions options;
  options.cert_file = certs.server_crt();
  options.key_file = certs.server_key();
  options.threads = 2;
  return options;
}

std::unique_ptr<TlsServer> StartServer(const TlsServerOptions& options, const std::shared_ptr<HandlerStats>& stats) {
  absl::StatusOr<std::unique_ptr<TlsServer>> server = TlsServer::Start(options, FactoryFor(stats));
  REQUIRE(server.status().ToString() == "OK");
  REQUIRE((*server)->port() != 0);
  return std::move(*server);
}

TlsClientOptions ClientOptions(const Certs& certs, uint16_t port) {
  TlsClientOptions options;
  options.host = "127.0.0.1";
  options.port = port;
  options.ca_file = certs.ca();
  return options;
}

std::unique_ptr<Transport> MakeClient(const TlsClientOptions& options) {
  absl::StatusOr<std::unique_ptr<Transport>> transport = MakeTlsTransport(options);
  REQUIRE(transport.status().ToString() == "OK");
  return std::move(*transport);
}

std::unique_ptr<Channel> MustConnect(Transport& transport) {
  absl::StatusOr<std::unique_ptr<Channel>> channel = transport.Connect(5s);
  REQUIRE(channel.status().ToString() == "OK");
  return std::move(*channel);
}

int TcpConnect(uint16_t port, int receive_buffer_bytes = 0) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  if (receive_buffer_bytes > 0) {
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer_bytes, sizeof(receive_buffer_bytes));
  }
  timeval tv{};
  tv.tv_sec = 10;  // a hung test fails instead of hanging
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  return fd;
}

// A TLS client on plain OpenSSL that writes whatever bytes a test wants.
class RawTlsClient {
 public:
  // `receive_buffer_bytes` > 0 shrinks the socket's receive buffer (set before connecting).
  explicit RawTlsClient(uint16_t port, int receive_buffer_bytes = 0) : fd_(TcpConnect(port, receive_buffer_bytes)) {}
  ~RawTlsClient() { Close(); }

  void Close() {
    ssl_.reset();
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // `max_version`: e.g. TLS1_2_VERSION to play an old client; 0 for no cap.
  bool Handshake(const std::string& ca_file, int max_version = 0) {
    ctx_.reset(SSL_CTX_new(TLS_client_method()));
    REQUIRE(ctx_ != nullptr);
    SSL_CTX_set_options(ctx_.get(), SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (max_version != 0) REQUIRE(SSL_CTX_set_max_proto_version(ctx_.get(), max_version) == 1);
    REQUIRE(SSL_CTX_load_verify_locations(ctx_.get(), ca_file.c_str(), nullptr) == 1);
    SSL_CTX_set_verify(ctx_.get(), SSL_VERIFY_PEER, nullptr);
    ssl_.reset(SSL_new(ctx_.get()));
    REQUIRE(ssl_ != nullptr);
    SSL_set_fd(ssl_.get(), fd_);
    const bool ok = SSL_connect(ssl_.get()) == 1;
    ERR_clear_error();
    return ok;
  }

  bool Write(std::string_view bytes) {
    size_t written = 0;
    return SSL_write_ex(ssl_.get(), bytes.data(), bytes.size(), &written) == 1 && written == bytes.size();
  }

  // One response frame, or nullopt if the connection ended or timed out first.
  std::optional<v1::Envelope> ReadFrame() {
    uint8_t header[4];
    if (!ReadExactly(header, 4)) return std::nullopt;
    const uint32_t length =
        (uint32_t{header[0]} << 24) | (uint32_t{header[1]} << 16) | (uint32_t{header[2]} << 8) | uint32_t{header[3]};
    if (length > kMaxControlFrameBytes) return std::nullopt;
    std::string body(length, '\0');
    if (!ReadExactly(body.data(), length)) return std::nullopt;
    v1::Envelope envelope;
    if (!envelope.ParseFromString(body)) return std::nullopt;
    return envelope;
  }

  // Reads until the server ends the connection: true if it did, false if the socket timed out (10
  // s).
  bool WaitClosed() {
    char buf[256];
    for (;;) {
      const int n = SSL_read(ssl_.get(), buf, sizeof(buf));
      if (n > 0) continue;
      const int err = SSL_get_error(ssl_.get(), n);
      const int saved_errno = errno;
      ERR_clear_error();
      if (err == SSL_ERROR_WANT_READ) return false;
      if (err == SSL_ERROR_SYSCALL && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK)) return false;
      return true;
    }
  }

 private:
  bool ReadExactly(void* out, size_t n) {
    auto* p = static_cast<char*>(out);
    while (n > 0) {
      size_t got = 0;
      if (SSL_read_ex(ssl_.get(), p, n, &got) != 1) {
        ERR_clear_error();
        return false;
      }
      p += got;
      n -= got;
    }
    return true;
  }

  int fd_;
  internal::SslCtxPtr ctx_;
  internal::SslPtr ssl_;
};

std::string LengthPrefix(uint32_t n) {
  std::string out(4, '\0');
  out[0] = static_cast<char>(n >> 24);
  out[1] = static_cast<char>(n >> 16);
  out[2] = static_cast<char>(n >> 8);
  out[3] = static_cast<char>(n);
  return out;
}

// ---- Framing -----------------------------------------------------------------------------------

TEST_CASE("A frame round-trips through EncodeFrame, DecodeFrameLength and DecodeFrameBody", "[comms][transport]") {
  const v1::Envelope hello = Hello(42, "phone-1");
  absl::StatusOr<std::string> frame = EncodeFrame(hello, kMaxControlFrameBytes);
  REQUIRE(frame.ok());
  REQUIRE(frame->size() == 4 + hello.ByteSizeLong());
  absl::StatusOr<uint32_t> length = DecodeFrameLength(reinterpret_cast<const uint8_t*>(frame->data()), 1000);
  REQUIRE(length.ok());
  CHECK(*length == hello.ByteSizeLong());
  absl::StatusOr<v1::Envelope> decoded = DecodeFrameBody(std::string_view(*frame).substr(4));
  REQUIRE(decoded.ok());
  CHECK(decoded->SerializeAsString() == hello.SerializeAsString());
  CHECK(decoded->request_id() == 42);
  CHECK(decoded->hello().device_id() == "phone-1");
}

TEST_CASE("EncodeFrame refuses an envelope over the limit", "[comms][transport]") {
  v1::Envelope big = Hello(1, std::string(2000, 'x'));
  CHECK(EncodeFrame(big, 1000).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(EncodeFrame(big, 4000).ok());
}

TEST_CASE("A 4 GiB length prefix is ResourceExhausted and nothing is allocated for it", "[comms][transport]") {
  const uint8_t header[4] = {0xff, 0xff, 0xff, 0xff};
  CHECK(DecodeFrameLength(header, kMaxControlFrameBytes).status().code() == absl::StatusCode::kResourceExhausted);
  // One over the limit is refused, the limit itself is fine.
  const std::string over = LengthPrefix(kMaxChunkFrameBytes + 1);
  const std::string at = LengthPrefix(kMaxChunkFrameBytes);
  CHECK(DecodeFrameLength(reinterpret_cast<const uint8_t*>(over.data()), kMaxChunkFrameBytes).status().code() ==
        absl::StatusCode::kResourceExhausted);
  CHECK(DecodeFrameLength(reinterpret_cast<const uint8_t*>(at.data()), kMaxChunkFrameBytes).ok());

  // The stream decoder stops at the header: what follows is not buffered either.
  FrameDecoder decoder(kMaxControlFrameBytes);
  decoder.Feed(std::string_view(reinterpret_cast<const char*>(header), 4));
  decoder.Feed(std::string(1 << 20, 'x'));
  CHECK(decoder.Next().status().code() == absl::StatusCode::kResourceExhausted);
  // A 4 GiB zero-filled buffer would have shown up in the peak RSS (or thrown bad_alloc).
  CHECK(PeakRssBytes() < (int64_t{1} << 30));
}

TEST_CASE("A zero length prefix is InvalidArgument", "[comms][transport]") {
  const uint8_t header[4] = {0, 0, 0, 0};
  CHECK(DecodeFrameLength(header, kMaxControlFrameBytes).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A garbage frame body is InvalidArgument", "[comms][transport]") {
  const std::string garbage(32, '\xff');
  CHECK(DecodeFrameBody(garbage).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("An envelope without a body is InvalidArgument", "[comms][transport]") {
  v1::Envelope empty;
  empty.set_protocol_version(1);
  empty.set_request_id(3);
  CHECK(DecodeFrameBody(empty.SerializeAsString()).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("An envelope of protocol version 2 is FailedPrecondition", "[comms][transport]") {
  v1::Envelope v2 = Hello(1, "d");
  v2.set_protocol_version(2);
  CHECK(DecodeFrameBody(v2.SerializeAsString()).status().code() == absl::StatusCode::kFailedPrecondition);
  v2.set_protocol_version(0);
  CHECK(DecodeFrameBody(v2.SerializeAsString()).status().code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("FrameDecoder yields the same frames whatever the split points of the stream", "[comms][transport]") {
  std::vector<v1::Envelope> sent = {Hello(1, "a"), Hello(2, std::string(300, 'b')), Hello(3, "")};
  std::string stream;
  for (const v1::Envelope& e : sent) stream += *EncodeFrame(e, kMaxControlFrameBytes);

  auto decode = [&](const std::vector<size_t>& cuts) {
    FrameDecoder decoder(kMaxControlFrameBytes);
    std::vector<v1::Envelope> got;
    size_t pos = 0;
    for (size_t i = 0; i <= cuts.size(); ++i) {
      const size_t end = i < cuts.size() ? cuts[i] : stream.size();
      decoder.Feed(std::string_view(stream).substr(pos, end - pos));
      pos = end;
      for (;;) {
        absl::StatusOr<std::optional<v1::Envelope>> next = decoder.Next();
        INFO(next.status().ToString());
        REQUIRE(next.ok());
        if (!next->has_value()) break;
        got.push_back(std::move(**next));
      }
    }
    return got;
  };
  auto same = [&](const std::vector<v1::Envelope>& got) {
    if (got.size() != sent.size()) return false;
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i].SerializeAsString() != sent[i].SerializeAsString()) return false;
    }
    return true;
  };

  for (size_t cut = 0; cut <= stream.size(); ++cut) {
    INFO("single split at " << cut);
    CHECK(same(decode({cut})));
  }
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<size_t> cuts;
    size_t pos = 0;
    while (true) {
      pos += std::uniform_int_distribution<size_t>(0, 9)(rng);
      if (pos >= stream.size()) break;
      cuts.push_back(pos);
    }
    INFO("trial " << trial);
    CHECK(same(decode(cuts)));
  }
}

TEST_CASE("FrameDecoder stays failed after a malformed frame", "[comms][transport]") {
  FrameDecoder decoder(kMaxControlFrameBytes);
  decoder.Feed(LengthPrefix(4) + "\xff\xff\xff\xff");
  CHECK(decoder.Next().status().code() == absl::StatusCode::kInvalidArgument);
  decoder.Feed(*EncodeFrame(Hello(1, "a"), kMaxControlFrameBytes));
  CHECK(decoder.Next().status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("FrameDecoder applies a lowered limit to a frame already buffered", "[comms][transport]") {
  FrameDecoder decoder(kMaxControlFrameBytes);
  decoder.Feed(*EncodeFrame(Hello(1, std::string(500, 'a')), kMaxControlFrameBytes));
  decoder.set_max_bytes(100);
  CHECK(decoder.Next().status().code() == absl::StatusCode::kResourceExhausted);
}

// ---- In-memory ---------------------------------------------------------------------------------

TEST_CASE("In-memory channels answer calls from many threads", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats));
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(1s);
      if (!channel.ok()) return;
      for (int i = 1; i <= 50; ++i) {
        const std::string device = "dev-" + std::to_string(t) + "-" + std::to_string(i);
        absl::StatusOr<v1::Envelope> r = (*channel)->Call(Hello(i, device), 5s);
        if (r.ok() && r->request_id() == static_cast<uint64_t>(i) && r->hello_reply().server_version() == device) {
          ++ok;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  CHECK(ok.load() == 8 * 50);
  CHECK(stats->Closed() == 8);  // every channel was destroyed
  CHECK(stats->peers[0].address.rfind("in-memory:", 0) == 0);
}

TEST_CASE("An in-memory channel calls OnClose exactly once", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats));
  {
    std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
    REQUIRE(channel->Call(Hello(1, "a"), 1s).ok());
    channel->Close();
    CHECK(stats->Closed() == 1);
    CHECK(channel->Call(Hello(2, "a"), 1s).status().code() == absl::StatusCode::kUnavailable);
  }
  CHECK(stats->Closed() == 1);
}

TEST_CASE("A dropped in-memory request fails the call with Unavailable", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  InMemoryFaults faults;
  faults.on_request = [](std::string&) { return false; };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  CHECK(channel->Call(Hello(1, "a"), 1s).status().code() == absl::StatusCode::kUnavailable);
  CHECK(stats->Handled() == 0);
  CHECK(stats->Closed() == 1);  // the "connection" broke
}

TEST_CASE("A dropped in-memory response fails the call with Unavailable after the handler ran", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  InMemoryFaults faults;
  faults.on_response = [](std::string&) { return false; };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  CHECK(channel->Call(Hello(1, "a"), 1s).status().code() == absl::StatusCode::kUnavailable);
  CHECK(stats->Handled() == 1);
}

TEST_CASE(
    "A truncated in-memory request gets the handler's malformed-frame Reject and closes the "
    "channel",
    "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  InMemoryFaults faults;
  faults.on_request = [](std::string& frame) {
    frame.resize(frame.size() - 3);
    return true;
  };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  absl::StatusOr<v1::Envelope> r = channel->Call(Hello(9, "a"), 1s);
  REQUIRE(r.ok());
  CHECK(r->reject().code() == v1::MALFORMED_MESSAGE);
  CHECK(stats->Handled() == 0);
  REQUIRE(stats->Malformed().size() == 1);
  CHECK(stats->Malformed()[0].code() == absl::StatusCode::kInvalidArgument);
  CHECK(stats->Closed() == 1);
  CHECK(channel->Call(Hello(10, "a"), 1s).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("A corrupted in-memory response is InvalidArgument", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  InMemoryFaults faults;
  faults.on_response = [](std::string& frame) {
    frame.resize(frame.size() - 1);
    return true;
  };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  CHECK(channel->Call(Hello(1, "a"), 1s).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A delayed in-memory call past its timeout is DeadlineExceeded", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  InMemoryFaults faults;
  faults.on_request = [](std::string&) {
    std::this_thread::sleep_for(50ms);
    return true;
  };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  CHECK(channel->Call(Hello(1, "a"), 10ms).status().code() == absl::StatusCode::kDeadlineExceeded);
}

TEST_CASE("An in-memory call is timed on the transport's clock: past its timeout there is DeadlineExceeded",
          "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  ManualClock clock;
  int64_t delay_ms = 0;
  InMemoryFaults faults;
  faults.on_request = [&](std::string&) {
    clock.Advance(delay_ms);  // the call takes this long on the transport's clock, no host time
    return true;
  };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults, &clock);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  delay_ms = 10;
  REQUIRE(channel->Call(Hello(1, "a"), 10ms).ok());  // exactly at the timeout is in time
  delay_ms = 11;
  CHECK(channel->Call(Hello(2, "a"), 10ms).status().code() == absl::StatusCode::kDeadlineExceeded);
}

TEST_CASE("A response with another request_id is an error", "[comms][transport]") {
  auto stats = std::make_shared<HandlerStats>();
  InMemoryFaults faults;
  faults.on_response = [](std::string& frame) {
    v1::Envelope e;
    REQUIRE(e.ParseFromString(frame.substr(4)));
    e.set_request_id(e.request_id() + 1);
    frame = *EncodeFrame(e, kMaxControlFrameBytes);
    return true;
  };
  std::unique_ptr<Transport> transport = MakeInMemoryTransport(FactoryFor(stats), faults);
  std::unique_ptr<Channel> channel = std::move(*transport->Connect(1s));
  CHECK(channel->Call(Hello(5, "a"), 1s).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("In-memory and TLS transports refuse the same oversized request with the same Reject", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  stats->max_request_bytes = 256;
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  std::unique_ptr<Transport> tls = MakeClient(ClientOptions(*certs, server->port()));
  std::unique_ptr<Transport> in_memory = MakeInMemoryTransport(FactoryFor(stats));

  for (Transport* transport : {tls.get(), in_memory.get()}) {
    std::unique_ptr<Channel> channel = MustConnect(*transport);
    // Under the limit: fine.
    REQUIRE(channel->Call(Hello(1, std::string(100, 'a')), 5s).ok());
    // Over the handler's limit: the handler's Reject comes back, then the connection is closed.
    absl::StatusOr<v1::Envelope> r = channel->Call(Hello(2, std::string(1000, 'a')), 5s);
    REQUIRE(r.status().ToString() == "OK");
    CHECK(r->reject().code() == v1::RESOURCE_EXHAUSTED);
    CHECK(channel->Call(Hello(3, "a"), 5s).status().code() == absl::StatusCode::kUnavailable);
    // Over the control-frame limit: refused before anything is sent.
    std::unique_ptr<Channel> other = MustConnect(*transport);
    CHECK(other->Call(Hello(4, std::string(kMaxControlFrameBytes + 1, 'a')), 5s).status().code() ==
          absl::StatusCode::kInvalidArgument);
  }
  CHECK(stats->Handled() == 2);
  const std::vector<absl::Status> malformed = stats->Malformed();
  REQUIRE(malformed.size() == 2);
  CHECK(malformed[0].code() == absl::StatusCode::kResourceExhausted);
  CHECK(malformed[1].code() == absl::StatusCode::kResourceExhausted);
}

// ---- TLS ---------------------------------------------------------------------------------------

TEST_CASE("A TLS client completes 100 sequential calls on one channel", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  std::unique_ptr<Channel> channel = MustConnect(*transport);
  int ok = 0;
  for (int i = 1; i <= 100; ++i) {
    const std::string device = "device-" + std::to_string(i);
    absl::StatusOr<v1::Envelope> r = channel->Call(Hello(i, device), 5s);
    if (r.ok() && r->request_id() == static_cast<uint64_t>(i) && r->hello_reply().server_version() == device) ++ok;
  }
  CHECK(ok == 100);
  CHECK(server->active_connections() == 1);
  CHECK(stats->Created() == 1);
  channel->Close();
  CHECK(stats->WaitFor([&] { return stats->closed == 1; }));
  CHECK(Eventually([&] { return server->active_connections() == 0; }));
}

TEST_CASE("32 TLS clients on their own threads make calls concurrently", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 32; ++t) {
    threads.emplace_back([&, t] {
      absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(10s);
      if (!channel.ok()) return;
      for (int i = 1; i <= 5; ++i) {
        const std::string device = "dev-" + std::to_string(t) + "-" + std::to_string(i);
        absl::StatusOr<v1::Envelope> r = (*channel)->Call(Hello(i, device), 10s);
        if (r.ok() && r->hello_reply().server_version() == device) ++ok;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  CHECK(ok.load() == 32 * 5);
  CHECK(stats->WaitFor([&] { return stats->closed == 32; }));
  CHECK(stats->Created() == 32);
}

TEST_CASE("A TLS client resolves a host name and verifies the server by it", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  TlsClientOptions options = ClientOptions(*certs, server->port());
  options.host = "localhost";  // resolved, sent as SNI and matched against the DNS subjectAltName
  std::unique_ptr<Transport> transport = MakeClient(options);
  std::unique_ptr<Channel> channel = MustConnect(*transport);
  CHECK(channel->Call(Hello(1, "a"), 5s).ok());
}

TEST_CASE("A TLS client refuses a server certificate from another CA with Unauthenticated", "[comms][transport]") {
  auto certs = MakeCerts();
  auto other = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  TlsClientOptions options = ClientOptions(*certs, server->port());
  options.ca_file = other->ca();
  std::unique_ptr<Transport> transport = MakeClient(options);
  absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(5s);
  INFO(channel.status().ToString());
  CHECK(channel.status().code() == absl::StatusCode::kUnauthenticated);
  CHECK(stats->Created() == 0);
}

TEST_CASE("A TLS client refuses a server certificate for another host name with Unauthenticated",
          "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  TlsClientOptions options = ClientOptions(*certs, server->port());
  options.server_name = "seedling.example.com";
  std::unique_ptr<Transport> transport = MakeClient(options);
  absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(5s);
  INFO(channel.status().ToString());
  CHECK(channel.status().code() == absl::StatusCode::kUnauthenticated);
  // And an IP address the certificate does not list.
  options.server_name = "127.0.0.2";
  std::unique_ptr<Transport> by_ip = MakeClient(options);
  CHECK(by_ip->Connect(5s).status().code() == absl::StatusCode::kUnauthenticated);
}

TEST_CASE("A TLS client accepts a server whose public key matches the pin", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  absl::StatusOr<std::string> pin = PublicKeySha256(certs->server_crt());
  REQUIRE(pin.ok());
  CHECK(pin->size() == 64);
  TlsClientOptions options = ClientOptions(*certs, server->port());
  options.pinned_public_key_sha256 = *pin;
  std::unique_ptr<Transport> transport = MakeClient(options);
  std::unique_ptr<Channel> channel = MustConnect(*transport);
  CHECK(channel->Call(Hello(1, "a"), 5s).ok());
}

TEST_CASE("A TLS client refuses a server whose public key does not match the pin", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  // The CA's key: a valid key of the same PKI, but not the server's.
  absl::StatusOr<std::string> wrong = PublicKeySha256(certs->ca());
  REQUIRE(wrong.ok());
  TlsClientOptions options = ClientOptions(*certs, server->port());
  options.pinned_public_key_sha256 = *wrong;
  std::unique_ptr<Transport> transport = MakeClient(options);
  absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(5s);
  INFO(channel.status().ToString());
  CHECK(channel.status().code() == absl::StatusCode::kUnauthenticated);
}

TEST_CASE("The TLS server refuses a TLS 1.2 client", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  {
    RawTlsClient tls12(server->port());
    CHECK_FALSE(tls12.Handshake(certs->ca(), TLS1_2_VERSION));
  }
  {
    RawTlsClient tls13(server->port());  // the same client without the cap gets in
    CHECK(tls13.Handshake(certs->ca()));
  }
  CHECK(stats->WaitFor([&] { return stats->created == 1; }));
}

TEST_CASE("A mutual-TLS server refuses a client without a certificate", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions server_options = ServerOptions(*certs);
  server_options.client_ca_file = certs->ca();
  std::unique_ptr<TlsServer> server = StartServer(server_options, stats);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  // With TLS 1.3 the client's handshake may finish before the server refuses it; the first call
  // then fails.
  absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(5s);
  absl::Status status = channel.status();
  if (channel.ok()) status = (*channel)->Call(Hello(1, "a"), 5s).status();
  INFO(status.ToString());
  CHECK(status.code() == absl::StatusCode::kUnauthenticated);
  CHECK(stats->Created() == 0);
}

TEST_CASE("A mutual-TLS server accepts a client certificate and reports its subject", "[comms][transport]") {
  auto certs = MakeCerts();
  REQUIRE(CreateClientCertificate(certs->dir.path(), "device-7").ok());
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions server_options = ServerOptions(*certs);
  server_options.client_ca_file = certs->ca();
  std::unique_ptr<TlsServer> server = StartServer(server_options, stats);
  TlsClientOptions options = ClientOptions(*certs, server->port());
  options.client_cert_file = certs->dir.File("device-7.crt");
  options.client_key_file = certs->dir.File("device-7.key");
  std::unique_ptr<Transport> transport = MakeClient(options);
  std::unique_ptr<Channel> channel = MustConnect(*transport);
  CHECK(channel->Call(Hello(1, "a"), 5s).ok());
  std::lock_guard<std::mutex> lock(stats->mu);
  REQUIRE(stats->peers.size() == 1);
  CHECK(stats->peers[0].client_cert_subject == "device-7");
  CHECK(stats->peers[0].address.rfind("127.0.0.1:", 0) == 0);
}

TEST_CASE("A length prefix over the limit gets a RESOURCE_EXHAUSTED Reject and the connection is closed",
          "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  RawTlsClient client(server->port());
  REQUIRE(client.Handshake(certs->ca()));
  REQUIRE(client.Write(LengthPrefix(0xffffffffu)));  // 4 GiB
  std::optional<v1::Envelope> reply = client.ReadFrame();
  REQUIRE(reply.has_value());
  CHECK(reply->reject().code() == v1::RESOURCE_EXHAUSTED);
  CHECK(client.WaitClosed());
  client.Close();
  CHECK(stats->WaitFor([&] { return stats->closed == 1; }));
  CHECK(stats->Handled() == 0);
  const std::vector<absl::Status> malformed = stats->Malformed();
  REQUIRE(malformed.size() == 1);
  CHECK(malformed[0].code() == absl::StatusCode::kResourceExhausted);
  // The server lives in this process: a 4 GiB body buffer would be in the peak RSS.
  CHECK(PeakRssBytes() < (int64_t{1} << 30));
}

TEST_CASE("The TLS server applies the handler's current limit to the next frame", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  stats->max_request_bytes = kMaxChunkFrameBytes;  // as during an upload
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  RawTlsClient client(server->port());
  REQUIRE(client.Handshake(certs->ca()));
  REQUIRE(client.Write(LengthPrefix(kMaxChunkFrameBytes + 1)));  // fine for a control frame, not for a chunk
  std::optional<v1::Envelope> reply = client.ReadFrame();
  REQUIRE(reply.has_value());
  CHECK(reply->reject().code() == v1::RESOURCE_EXHAUSTED);
  CHECK(client.WaitClosed());
  CHECK(stats->Handled() == 0);
}

TEST_CASE("Garbage bytes get a MALFORMED_MESSAGE Reject and the connection is closed", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  RawTlsClient client(server->port());
  REQUIRE(client.Handshake(certs->ca()));
  REQUIRE(client.Write(LengthPrefix(16) + std::string(16, '\xff')));
  std::optional<v1::Envelope> reply = client.ReadFrame();
  REQUIRE(reply.has_value());
  CHECK(reply->reject().code() == v1::MALFORMED_MESSAGE);
  CHECK(client.WaitClosed());
  client.Close();
  CHECK(stats->WaitFor([&] { return stats->closed == 1; }));
  CHECK(stats->Handled() == 0);
  REQUIRE(stats->Malformed().size() == 1);
  CHECK(stats->Malformed()[0].code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A truncated frame followed by silence is closed after read_timeout", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions options = ServerOptions(*certs);
  options.read_timeout = 200ms;
  options.idle_timeout = 30s;  // so that only the read timeout can end it
  std::unique_ptr<TlsServer> server = StartServer(options, stats);
  RawTlsClient client(server->port());
  REQUIRE(client.Handshake(certs->ca()));
  std::string frame = *EncodeFrame(Hello(1, std::string(100, 'a')), kMaxControlFrameBytes);
  frame.resize(frame.size() / 2);
  const Clock::time_point start = Clock::now();
  REQUIRE(client.Write(frame));
  CHECK(client.WaitClosed());
  const Ms elapsed = Since(start);
  CHECK(elapsed >= 150ms);
  CHECK(elapsed < 5s);
  CHECK(stats->WaitFor([&] { return stats->closed == 1; }));
  CHECK(stats->Handled() == 0);
  CHECK(stats->Malformed().empty());
}

TEST_CASE("A client that stops reading is closed after write_timeout", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions options = ServerOptions(*certs);
  options.write_timeout = 200ms;
  std::unique_ptr<TlsServer> server = StartServer(options, stats);
  RawTlsClient client(server->port(), /*receive_buffer_bytes=*/4096);
  REQUIRE(client.Handshake(certs->ca()));
  // The reply echoes the 3 MiB device_id: far more than the socket buffers hold while nobody reads.
  REQUIRE(client.Write(*EncodeFrame(Hello(1, std::string(3 << 20, 'a')), kMaxControlFrameBytes)));
  REQUIRE(stats->WaitFor([&] { return stats->handled == 1; }));
  const Clock::time_point start = Clock::now();
  REQUIRE(stats->WaitFor([&] { return stats->closed == 1; }));
  CHECK(Since(start) < 5s);
}

TEST_CASE("A client that connects and never handshakes is dropped after handshake_timeout", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions options = ServerOptions(*certs);
  options.handshake_timeout = 200ms;
  std::unique_ptr<TlsServer> server = StartServer(options, stats);
  const int fd = TcpConnect(server->port());
  REQUIRE(Eventually([&] { return server->active_connections() == 1; }));
  const Clock::time_point start = Clock::now();
  char byte;
  const ssize_t n = ::recv(fd, &byte, 1, 0);  // blocks until the server closes (or 10 s)
  const Ms elapsed = Since(start);
  ::close(fd);
  CHECK(n == 0);
  CHECK(elapsed < 5s);
  CHECK(Eventually([&] { return server->active_connections() == 0; }));
  CHECK(stats->Created() == 0);
}

TEST_CASE("An idle connection is closed after idle_timeout and its client then sees Unavailable",
          "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions options = ServerOptions(*certs);
  options.idle_timeout = 300ms;
  std::unique_ptr<TlsServer> server = StartServer(options, stats);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  std::unique_ptr<Channel> channel = MustConnect(*transport);
  REQUIRE(channel->Call(Hello(1, "a"), 5s).ok());
  const Clock::time_point start = Clock::now();
  REQUIRE(stats->WaitFor([&] { return stats->closed == 1; }));
  CHECK(Since(start) >= 200ms);
  CHECK(channel->Call(Hello(2, "a"), 5s).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE(
    "Stop() with open connections returns promptly, closes every handler, and clients see "
    "Unavailable",
    "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);  // default timeouts: 10 s+
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  std::vector<std::unique_ptr<Channel>> channels;
  for (int i = 0; i < 4; ++i) {
    channels.push_back(MustConnect(*transport));
    REQUIRE(channels.back()->Call(Hello(1, "a"), 5s).ok());
  }
  RawTlsClient mid_frame(server->port());  // and one stuck in the middle of a frame
  REQUIRE(mid_frame.Handshake(certs->ca()));
  REQUIRE(mid_frame.Write(LengthPrefix(100)));
  REQUIRE(stats->WaitFor([&] { return stats->created == 5; }));  // its handshake finished on the server too

  const Clock::time_point start = Clock::now();
  std::thread other([&] { server->Stop(); });  // from another thread, at the same time
  server->Stop();
  other.join();
  CHECK(Since(start) < 3s);
  CHECK(stats->Closed() == 5);
  CHECK(server->active_connections() == 0);
  server->Stop();  // and once more
  for (auto& channel : channels) {
    CHECK(channel->Call(Hello(2, "a"), 5s).status().code() == absl::StatusCode::kUnavailable);
  }
  CHECK(transport->Connect(2s).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("A call to a handler slower than the timeout is DeadlineExceeded at the timeout", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  std::unique_ptr<TlsServer> server = StartServer(ServerOptions(*certs), stats);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  std::unique_ptr<Channel> channel = MustConnect(*transport);
  stats->handle_sleep_ms = 1500;
  const Clock::time_point start = Clock::now();
  absl::StatusOr<v1::Envelope> r = channel->Call(Hello(1, "a"), 200ms);
  const Ms elapsed = Since(start);
  CHECK(r.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(elapsed >= 190ms);
  CHECK(elapsed < 1200ms);
  // The channel is closed after the error.
  CHECK(channel->Call(Hello(2, "a"), 1s).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("Connect gives up at its deadline when the server never answers the handshake", "[comms][transport]") {
  auto certs = MakeCerts();
  // A listener that never accepts: the TCP connect succeeds (backlog), the TLS handshake never
  // does.
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  REQUIRE(::listen(listener, 8) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, ntohs(addr.sin_port)));
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::unique_ptr<Channel>> channel = transport->Connect(300ms);
  const Ms elapsed = Since(start);
  ::close(listener);
  CHECK(channel.status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(elapsed >= 290ms);
  CHECK(elapsed < 1500ms);
}

TEST_CASE("Connecting to a port nobody listens on is Unavailable", "[comms][transport]") {
  auto certs = MakeCerts();
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(s);  // bound, never listened: connections are refused
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, ntohs(addr.sin_port)));
  CHECK(transport->Connect(2s).status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("The TLS server closes connections beyond max_connections", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions options = ServerOptions(*certs);
  options.max_connections = 2;
  std::unique_ptr<TlsServer> server = StartServer(options, stats);
  std::unique_ptr<Transport> transport = MakeClient(ClientOptions(*certs, server->port()));
  std::unique_ptr<Channel> a = MustConnect(*transport);
  std::unique_ptr<Channel> b = MustConnect(*transport);
  REQUIRE(a->Call(Hello(1, "a"), 5s).ok());
  REQUIRE(b->Call(Hello(1, "b"), 5s).ok());
  CHECK(transport->Connect(5s).status().code() == absl::StatusCode::kUnavailable);
  a->Close();
  REQUIRE(Eventually([&] { return server->active_connections() == 1; }));
  std::unique_ptr<Channel> c = MustConnect(*transport);
  CHECK(c->Call(Hello(1, "c"), 5s).ok());
}

TEST_CASE("TlsServer::Start names an unusable certificate file", "[comms][transport]") {
  auto certs = MakeCerts();
  auto stats = std::make_shared<HandlerStats>();
  TlsServerOptions options = ServerOptions(*certs);
  options.cert_file = certs->dir.File("missing.crt");
  absl::StatusOr<std::unique_ptr<TlsServer>> server = TlsServer::Start(options, FactoryFor(stats));
  CHECK(server.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(server.status().message()).find("missing.crt") != std::string::npos);
  // A key that belongs to another certificate.
  options = ServerOptions(*certs);
  options.key_file = certs->dir.File("ca.key");
  CHECK(TlsServer::Start(options, FactoryFor(stats)).status().code() == absl::StatusCode::kInvalidArgument);
}

// ---- Certificates ------------------------------------------------------------------------------

TEST_CASE("CreateCertificates writes private keys with mode 0600 and refuses to overwrite", "[comms][transport]") {
  TempDir dir;
  CertificateOptions options;
  options.dir = dir.path();
  REQUIRE(CreateCertificates(options).ok());
  for (const char* name : {"ca.key", "server.key"}) {
    struct stat st {};
    REQUIRE(::stat(dir.File(name).c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }
  absl::StatusOr<std::string> first = PublicKeySha256(dir.File("server.crt"));
  REQUIRE(first.ok());
  CHECK(CreateCertificates(options).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(*PublicKeySha256(dir.File("server.crt")) == *first);  // untouched
  options.overwrite = true;
  REQUIRE(CreateCertificates(options).ok());
  CHECK(*PublicKeySha256(dir.File("server.crt")) != *first);  // a new key
  // Client certificates too refuse to replace an existing one.
  REQUIRE(CreateClientCertificate(dir.path(), "phone").ok());
  CHECK(CreateClientCertificate(dir.path(), "phone").code() == absl::StatusCode::kFailedPrecondition);
  CHECK(CreateClientCertificate(dir.path(), "../escape").code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace seedling::comms
