#include "comms/tls.h"

// Server: the shape of Boost.Beast's async SSL server examples (docs/contributing.md, "Ownership and concurrency"). An
// acceptor on its own strand hands each socket to a Session that owns itself through shared_from_this and runs on its
// own strand; the Server registers sessions so that Stop() can close them all. Each handshake, read and write arms the
// session's one timer first; when it fires the socket is closed and the pending operation ends with an error that goes
// to Session::Fail.
//
// Client: each Channel has its own io_context, run on the calling thread until the operation
// completes or the deadline timer closes the socket, so the synchronous Channel API keeps every
// deadline.

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <array>
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <cctype>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>

#include "base/check.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/framing.h"
#include "comms/internal/openssl_util.h"
#include "comms/internal/response_id.h"
#include "spdlog/spdlog.h"

namespace seedling::comms {
namespace {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = asio::ip::tcp;
using boost::system::error_code;

constexpr size_t kHeaderBytes = 4;
// After a final reply (a Reject for a bad frame) the server reads and discards what the peer still
// sends for at most this long (and at most read_timeout) before closing, so that closing with
// unread bytes does not reset the connection before the peer has read the reply.
constexpr Duration kMaxLinger{2000};
// A body buffer larger than this is released after its frame instead of being kept for the next
// one.
constexpr size_t kKeepBufferBytes = 64 << 10;

std::string EndpointString(const tcp::endpoint& endpoint) {
  const asio::ip::address address = endpoint.address();
  if (address.is_v6()) return StrCat("[", address.to_string(), "]:", endpoint.port());
  return StrCat(address.to_string(), ":", endpoint.port());
}

// The peer closed or reset the connection: an ordinary end of a connection.
bool IsPeerGone(const error_code& ec) {
  return ec == asio::error::eof || ec == ssl::error::stream_truncated || ec == asio::error::connection_reset ||
         ec == asio::error::broken_pipe || ec == asio::error::connection_aborted;
}

// TLS errors that mean a certificate was refused, by us or by the peer (its alert).
bool IsCertificateRejection(const error_code& ec) {
  if (ec.category() != asio::error::get_ssl_category()) return false;
  switch (ERR_GET_REASON(static_cast<unsigned long>(ec.value()))) {
    case SSL_R_CERTIFICATE_VERIFY_FAILED:
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
      return true;
    default:
      return false;
  }
}

absl::Status ValidateDuration(Duration d, std::string_view name) {
  if (d.count() <= 0) return absl::InvalidArgumentError(StrCat(name, " must be positive, got ", d.count(), " ms"));
  return absl::OkStatus();
}

// ---- Server ------------------------------------------------------------------------------------

class Session;

// Everything the server's I/O threads share. Owned by TlsServer::Impl; outlives every Session
// (sessions live in io_context handlers, and the io_context is destroyed first).
class Server {
 public:
  Server(TlsServerOptions options, HandlerFactory factory)
      : options_(std::move(options)),
        factory_(std::move(factory)),
        acceptor_(asio::make_strand(ioc_)),
        accept_retry_(acceptor_.get_executor()) {}
  ~Server() { Stop(); }

  absl::Status Start();
  void Stop();
  uint16_t port() const { return port_; }
  int active_connections() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(sessions_.size());
  }

  const TlsServerOptions& options() const { return options_; }
  const HandlerFactory& factory() const { return factory_; }
  // Adds a session to the registry. False, and the caller drops it, when stopping or at
  // max_connections.
  bool Register(const std::shared_ptr<Session>& session, const std::string& address);
  void Unregister(Session* session);

 private:
  absl::Status ConfigureTls();
  absl::Status Listen();
  void DoAccept();
  void OnAccept(const error_code& ec, tcp::socket socket);
  void RunIoThread();

  // Constant after construction / Start().
  const TlsServerOptions options_;
  const HandlerFactory factory_;
  uint16_t port_ = 0;
  std::vector<std::thread::id> thread_ids_;

  mutable std::mutex mu_;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions_;  // guarded by mu_
  bool stopping_ = false;                                          // guarded by mu_

  std::mutex stop_mu_;    // serializes Stop()
  bool stopped_ = false;  // guarded by stop_mu_

  // Declared after the registry, so that they are destroyed before it (sessions unregister on
  // destruction).
  ssl::context ssl_ctx_{ssl::context::tls_server};
  asio::io_context ioc_;
  tcp::acceptor acceptor_;            // used on its strand
  asio::steady_timer accept_retry_;   // on the acceptor's strand
  std::vector<std::thread> threads_;  // joined by Stop()

  friend class Session;
};

// One connection: handshake, then frames in a loop. Runs on its own strand (its socket's executor);
// every member below is used only from there, except the constant ones.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Server& server, tcp::socket socket, std::string address)
      : server_(server),
        address_(std::move(address)),
        stream_(std::move(socket), server.ssl_ctx_),
        timer_(stream_.get_executor()) {}

  ~Session() {
    // Normally Finish() already ran; this covers handlers destroyed without running (io_context
    // teardown).
    if (!finished_) {
      finished_ = true;
      CallOnClose();
      server_.Unregister(this);
    }
  }

  void Start() {
    asio::dispatch(stream_.get_executor(), [self = shared_from_this()] {
      self->ArmTimer(self->server_.options().handshake_timeout, "handshake");
      self->stream_.async_handshake(ssl::stream_base::server, [self](const error_code& ec) { self->OnHandshake(ec); });
    });
  }

  // Thread-safe: closes the connection (Stop()).
  void Close() {
    asio::post(stream_.get_executor(), [self = shared_from_this()] {
      self->closing_ = true;
      self->CloseSocket();
    });
  }

  // For a connection refused at accept: never started, nothing to report.
  void Drop() {
    finished_ = true;
    CloseSocket();
  }

 private:
  // Every operation is preceded by this: when the timer fires first, the socket is closed and the
  // operation fails. A generation number makes a timer that already fired before being re-armed
  // harmless.
  void ArmTimer(Duration timeout, const char* what) {
    const uint64_t generation = ++timer_generation_;
    timer_.expires_after(timeout);
    timer_.async_wait([self = shared_from_this(), generation, what](const error_code& ec) {
      if (ec || generation != self->timer_generation_) return;
      self->timed_out_ = what;
      self->CloseSocket();
    });
  }

  void CancelTimer() {
    ++timer_generation_;
    timer_.cancel();
  }

  void CloseSocket() {
    error_code ignored;
    stream_.lowest_layer().close(ignored);
  }

  void OnHandshake(const error_code& ec) {
    CancelTimer();
    if (ec) return Fail(ec, "TLS handshake");
    PeerInfo peer;
    peer.address = address_;
    if (X509* cert = SSL_get0_peer_certificate(stream_.native_handle())) {
      peer.client_cert_subject = internal::SubjectCommonName(cert);
    }
    try {
      handler_ = server_.factory()(peer);
    } catch (const std::exception& e) {
      spdlog::error("tls server: the handler factory threw for {}: {}", address_, e.what());
    }
    if (handler_ == nullptr) {
      spdlog::warn("tls server: no handler for {}, closing", address_);
      return Finish();
    }
    ReadFrameStart();
  }

  // Waits (up to idle_timeout) for the first byte of the next frame.
  void ReadFrameStart() {
    ArmTimer(server_.options().idle_timeout, "idle");
    stream_.async_read_some(asio::buffer(header_),
                            [self = shared_from_this()](const error_code& ec, size_t n) { self->OnFirstBytes(ec, n); });
  }

  // The rest of the frame gets read_timeout from here.
  void OnFirstBytes(const error_code& ec, size_t n) {
    if (ec) return Fail(ec, "read");
    ArmTimer(server_.options().read_timeout, "read");
    if (n >= kHeaderBytes) return OnHeader({});
    asio::async_read(stream_, asio::buffer(header_.data() + n, kHeaderBytes - n),
                     [self = shared_from_this()](const error_code& ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(const error_code& ec) {
    if (ec) return Fail(ec, "read");
    size_t limit = 0;
    if (!GuardHandler("MaxRequestBytes", [&] { limit = handler_->MaxRequestBytes(); })) return Finish();
    // The length is checked before the body is allocated.
    absl::StatusOr<uint32_t> length = DecodeFrameLength(header_.data(), limit);
    if (!length.ok()) return RejectAndClose(length.status());
    body_.resize(*length);
    asio::async_read(stream_, asio::buffer(body_),
                     [self = shared_from_this()](const error_code& ec, size_t) { self->OnBody(ec); });
  }

  void OnBody(const error_code& ec) {
    if (ec) return Fail(ec, "read");
    CancelTimer();
    absl::StatusOr<v1::Envelope> request = DecodeFrameBody(body_);
    if (body_.size() > kKeepBufferBytes) std::string().swap(body_);
    if (!request.ok()) return RejectAndClose(request.status());
    v1::Envelope response;
    if (!GuardHandler("Handle", [&] { response = handler_->Handle(*request); })) return Finish();
    Reply(response, /*close_after=*/false);
  }

  void RejectAndClose(const absl::Status& error) {
    spdlog::info("tls server: bad frame from {}, closing: {}", address_, error.ToString());
    v1::Envelope response;
    if (!GuardHandler("OnMalformed", [&] { response = handler_->OnMalformed(error); })) return Finish();
    Reply(response, /*close_after=*/true);
  }

  void Reply(const v1::Envelope& response, bool close_after) {
    absl::StatusOr<std::string> frame = EncodeFrame(response, kMaxControlFrameBytes);
    if (!frame.ok()) {
      spdlog::error("tls server: the handler's response to {} is unusable, closing: {}", address_,
                    frame.status().ToString());
      return Finish();
    }
    out_ = std::move(*frame);
    ArmTimer(server_.options().write_timeout, "write");
    asio::async_write(
        stream_, asio::buffer(out_),
        [self = shared_from_this(), close_after](const error_code& ec, size_t) { self->OnWrite(ec, close_after); });
  }

  void OnWrite(const error_code& ec, bool close_after) {
    if (ec) return Fail(ec, "write");
    if (out_.size() > kKeepBufferBytes) std::string().swap(out_);
    if (close_after) return Linger();
    ReadFrameStart();
  }

  // After the final reply: send FIN, then discard whatever the peer still sends until it closes or
  // the linger time passes (without this, closing with unread bytes would reset the connection and
  // could destroy the reply before the peer read it).
  void Linger() {
    error_code ec;
    stream_.lowest_layer().shutdown(tcp::socket::shutdown_send, ec);
    if (ec) return Finish();
    ArmTimer(std::min(kMaxLinger, server_.options().read_timeout), "linger");
    DrainOnce();
  }

  void DrainOnce() {
    stream_.next_layer().async_read_some(asio::buffer(header_),
                                         [self = shared_from_this()](const error_code& ec, size_t) {
                                           if (ec) return self->Finish();
                                           self->DrainOnce();
                                         });
  }

  // The one place a connection's failure is reported; then the connection ends.
  void Fail(const error_code& ec, std::string_view what) {
    if (finished_) return;
    if (closing_) {
      spdlog::debug("tls server: closed {} (server stopping)", address_);
    } else if (timed_out_ != nullptr) {
      spdlog::info("tls server: closing {}: {} timed out", address_, timed_out_);
    } else if (IsPeerGone(ec) || ec == asio::error::operation_aborted) {
      spdlog::debug("tls server: {} closed the connection ({}: {})", address_, what, ec.message());
    } else {
      spdlog::info("tls server: {} failed for {}: {}", what, address_, ec.message());
    }
    Finish();
  }

  // Ends the connection exactly once: closes the socket, tells the handler, leaves the registry.
  void Finish() {
    if (finished_) return;
    finished_ = true;
    CancelTimer();
    CloseSocket();
    CallOnClose();
    server_.Unregister(this);
  }

  void CallOnClose() {
    if (handler_ == nullptr) return;
    GuardHandler("OnClose", [&] { handler_->OnClose(); });
    handler_.reset();
  }

  // Runs a handler call; an exception is logged and reported as false (the connection is then
  // closed).
  template <typename F>
  bool GuardHandler(const char* what, F&& f) {
    try {
      f();
      return true;
    } catch (const std::exception& e) {
      spdlog::error("tls server: ConnectionHandler::{} threw for {}: {}", what, address_, e.what());
      return false;
    }
  }

  // Constant after construction.
  Server& server_;
  const std::string address_;

  // Used on the session's strand only.
  ssl::stream<tcp::socket> stream_;
  asio::steady_timer timer_;
  uint64_t timer_generation_ = 0;
  const char* timed_out_ = nullptr;  // what timed out, if the timer closed the socket
  bool closing_ = false;             // Stop() closed the socket
  bool finished_ = false;
  std::unique_ptr<ConnectionHandler> handler_;
  std::array<uint8_t, kHeaderBytes> header_{};
  std::string body_;
  std::string out_;
};

bool Server::Register(const std::shared_ptr<Session>& session, const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return false;
  if (sessions_.size() >= static_cast<size_t>(options_.max_connections)) {
    spdlog::warn("tls server: refusing {}: {} connections open (max_connections)", address, sessions_.size());
    return false;
  }
  sessions_.emplace(session.get(), session);
  return true;
}

void Server::Unregister(Session* session) {
  std::lock_guard<std::mutex> lock(mu_);
  sessions_.erase(session);
}

absl::Status Server::ConfigureTls() {
  SSL_CTX* native = ssl_ctx_.native_handle();
  if (SSL_CTX_set_min_proto_version(native, TLS1_3_VERSION) != 1) {
    return absl::InternalError(StrCat("cannot require TLS 1.3: ", internal::OpenSslErrors()));
  }
  ssl_ctx_.set_options(ssl::context::default_workarounds | ssl::context::no_compression);
  // No session tickets: clients do not resume, and tickets would be extra writes after every
  // handshake.
  SSL_CTX_set_num_tickets(native, 0);
  error_code ec;
  ssl_ctx_.use_certificate_chain_file(options_.cert_file, ec);
  if (ec) {
    return absl::InvalidArgumentError(StrCat("cannot load the certificate '", options_.cert_file, "': ", ec.message()));
  }
  ssl_ctx_.use_private_key_file(options_.key_file, ssl::context::pem, ec);
  if (ec) {
    return absl::InvalidArgumentError(StrCat("cannot load the private key '", options_.key_file, "': ", ec.message()));
  }
  if (SSL_CTX_check_private_key(native) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(
        StrCat("the private key '", options_.key_file, "' does not match the certificate '", options_.cert_file, "'"));
  }
  if (!options_.client_ca_file.empty()) {
    ssl_ctx_.load_verify_file(options_.client_ca_file, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          StrCat("cannot load the client CA '", options_.client_ca_file, "': ", ec.message()));
    }
    // Tell clients which CA we accept.
    if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(options_.client_ca_file.c_str())) {
      SSL_CTX_set_client_CA_list(native, names);
    }
    ERR_clear_error();
    ssl_ctx_.set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
  }
  return absl::OkStatus();
}

absl::Status Server::Listen() {
  error_code ec;
  const asio::ip::address address = asio::ip::make_address(options_.bind_address, ec);
  if (ec) {
    return absl::InvalidArgumentError(StrCat("bind_address '", options_.bind_address, "' is not an IP address"));
  }
  const tcp::endpoint endpoint(address, options_.port);
  const std::string where = EndpointString(endpoint);
  acceptor_.open(endpoint.protocol(), ec);
  if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(endpoint, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return absl::UnavailableError(StrCat("cannot listen on ", where, ": ", ec.message()));
  port_ = acceptor_.local_endpoint(ec).port();
  if (ec) return absl::InternalError(StrCat("cannot read the listening port: ", ec.message()));
  return absl::OkStatus();
}

absl::Status Server::Start() {
  SEEDLING_RETURN_IF_ERROR(ConfigureTls());
  SEEDLING_RETURN_IF_ERROR(Listen());
  DoAccept();
  for (int i = 0; i < options_.threads; ++i) threads_.emplace_back([this] { RunIoThread(); });
  for (const std::thread& t : threads_) thread_ids_.push_back(t.get_id());
  spdlog::info("tls server: listening on {}:{}", options_.bind_address, port_);
  return absl::OkStatus();
}

void Server::RunIoThread() {
  for (;;) {
    try {
      ioc_.run();
      return;
    } catch (const std::exception& e) {
      spdlog::error("tls server: exception on an I/O thread: {}", e.what());
    }
  }
}

void Server::DoAccept() {
  acceptor_.async_accept(asio::make_strand(ioc_),
                         [this](const error_code& ec, tcp::socket socket) { OnAccept(ec, std::move(socket)); });
}

void Server::OnAccept(const error_code& ec, tcp::socket socket) {
  if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
  if (ec) {
    // E.g. out of file descriptors: try again a little later rather than spinning.
    spdlog::warn("tls server: accept failed: {}", ec.message());
    accept_retry_.expires_after(std::chrono::milliseconds(100));
    accept_retry_.async_wait([this](const error_code& wait_ec) {
      if (!wait_ec && acceptor_.is_open()) DoAccept();
    });
    return;
  }
  error_code endpoint_ec;
  const tcp::endpoint remote = socket.remote_endpoint(endpoint_ec);
  std::string address = endpoint_ec ? std::string("unknown") : EndpointString(remote);
  auto session = std::make_shared<Session>(*this, std::move(socket), address);
  if (Register(session, address)) {
    session->Start();
  } else {
    session->Drop();
  }
  DoAccept();
}

void Server::Stop() {
  std::lock_guard<std::mutex> stop_lock(stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  const std::thread::id self = std::this_thread::get_id();
  SEEDLING_CHECK(std::find(thread_ids_.begin(), thread_ids_.end(), self) == thread_ids_.end(),
                 "TlsServer::Stop() called from one of its own I/O threads (a ConnectionHandler)");
  std::vector<std::shared_ptr<Session>> live;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;  // from here on, accepted connections are dropped
    for (auto& [ptr, weak] : sessions_) {
      if (std::shared_ptr<Session> session = weak.lock()) live.push_back(std::move(session));
    }
  }
  asio::post(acceptor_.get_executor(), [this] {
    error_code ignored;
    acceptor_.close(ignored);
    accept_retry_.cancel();
  });
  for (const std::shared_ptr<Session>& session : live) session->Close();
  live.clear();
  // With the acceptor and every socket closed the io_context runs out of work and the threads
  // return.
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  if (threads_.empty()) {
    // Start() failed before any thread ran: run the posted close here.
    ioc_.restart();
    ioc_.run();
  }
  spdlog::info("tls server: stopped");
}

// ---- Client ------------------------------------------------------------------------------------

// Resolves a host name by the deadline. getaddrinfo cannot be cancelled (Asio's async_resolve only
// reports the cancellation once it returns), so it runs on a detached thread that the caller stops
// waiting for at the deadline; the thread finishes on its own and frees the shared state.
absl::StatusOr<std::vector<tcp::endpoint>> Resolve(const std::string& host, uint16_t port, Clock::time_point deadline,
                                                   Duration timeout) {
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;                     // guarded by mu
    error_code ec;                         // guarded by mu
    std::vector<tcp::endpoint> endpoints;  // guarded by mu
  };
  auto state = std::make_shared<State>();
  std::thread([state, host, port] {
    asio::io_context ioc;
    tcp::resolver resolver(ioc);
    error_code ec;
    const tcp::resolver::results_type results = resolver.resolve(host, std::to_string(port), ec);
    std::vector<tcp::endpoint> endpoints;
    for (const auto& entry : results) endpoints.push_back(entry.endpoint());
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->ec = ec;
      state->endpoints = std::move(endpoints);
      state->done = true;
    }
    state->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(state->mu);
  if (!state->cv.wait_until(lock, deadline, [&] { return state->done; })) {
    return absl::DeadlineExceededError(StrCat("resolving ", host, " took over ", timeout.count(), " ms"));
  }
  if (state->ec || state->endpoints.empty()) {
    return absl::UnavailableError(StrCat("cannot resolve ", host, ": ", state->ec.message()));
  }
  return std::move(state->endpoints);
}

// What every channel of one transport shares. The SSL_CTX is only used to create SSL objects, which
// OpenSSL allows from many threads.
struct ClientConfig {
  TlsClientOptions options;
  std::string server_name;  // the name verified against the certificate
  std::string pin;          // lowercase hex, or empty
  ssl::context ctx{ssl::context::tls_client};
};

class TlsChannel final : public Channel {
 public:
  explicit TlsChannel(std::shared_ptr<ClientConfig> config)
      : config_(std::move(config)), stream_(ioc_, config_->ctx), timer_(ioc_) {}
  ~TlsChannel() override { Close(); }

  // Connects, handshakes, verifies; all within `timeout`.
  absl::Status Open(Duration timeout);
  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, Duration timeout) override;
  void Close() override;

 private:
  // Runs the io_context on this thread until `done()` holds or `deadline` passes; at the deadline
  // it calls `on_timeout` (which must make the pending operations complete, e.g. by closing the
  // socket) and returns true once they have.
  template <typename Done, typename OnTimeout>
  bool RunUntil(Done&& done, Clock::time_point deadline, OnTimeout&& on_timeout);

  absl::Status Connect(Clock::time_point deadline, Duration timeout);
  absl::Status Handshake(Clock::time_point deadline, Duration timeout);
  absl::StatusOr<v1::Envelope> Exchange(const v1::Envelope& request, Clock::time_point deadline, Duration timeout);
  void StartReadResponse();
  void CloseSocket() {
    error_code ignored;
    stream_.lowest_layer().close(ignored);
  }
  std::string Where() const { return StrCat(config_->options.host, ":", config_->options.port); }
  absl::Status ConnectionError(const error_code& ec, std::string_view what) const;

  // Constant after construction.
  const std::shared_ptr<ClientConfig> config_;

  asio::io_context ioc_;
  ssl::stream<tcp::socket> stream_;
  asio::steady_timer timer_;
  bool open_ = false;

  // State of the call in flight (members, not locals, so that no handler ever refers to a dead
  // frame).
  std::string write_buffer_;
  bool write_done_ = false;
  error_code write_ec_;
  bool read_done_ = false;
  error_code read_ec_;
  absl::Status read_status_;
  std::array<uint8_t, kHeaderBytes> header_{};
  std::string body_;
};

template <typename Done, typename OnTimeout>
bool TlsChannel::RunUntil(Done&& done, Clock::time_point deadline, OnTimeout&& on_timeout) {
  bool timed_out = false;
  bool timer_done = false;
  timer_.expires_at(deadline);
  timer_.async_wait([&](const error_code& ec) {
    timer_done = true;
    if (!ec && !done()) {
      timed_out = true;
      on_timeout();
    }
  });
  ioc_.restart();
  while (!done()) {
    if (ioc_.run_one() == 0) break;
  }
  timer_.cancel();
  while (!timer_done) {
    if (ioc_.run_one() == 0) break;
  }
  SEEDLING_CHECK(done() && timer_done, "TLS channel: io_context ran out of work with operations pending");
  return timed_out;
}

absl::Status TlsChannel::ConnectionError(const error_code& ec, std::string_view what) const {
  if (IsCertificateRejection(ec)) {
    return absl::UnauthenticatedError(StrCat(what, " with ", Where(), " failed, certificate refused: ", ec.message()));
  }
  return absl::UnavailableError(StrCat(what, " with ", Where(), " failed: ", ec.message()));
}

absl::Status TlsChannel::Connect(Clock::time_point deadline, Duration timeout) {
  const TlsClientOptions& options = config_->options;
  std::vector<tcp::endpoint> endpoints;
  error_code ec;
  const asio::ip::address ip = asio::ip::make_address(options.host, ec);
  if (!ec) {
    endpoints.emplace_back(ip, options.port);
  } else {
    SEEDLING_ASSIGN_OR_RETURN(endpoints, Resolve(options.host, options.port, deadline, timeout));
  }
  bool done = false;
  error_code connect_ec;
  asio::async_connect(stream_.lowest_layer(), endpoints, [&](const error_code& e, const tcp::endpoint&) {
    connect_ec = e;
    done = true;
  });
  if (RunUntil([&] { return done; }, deadline, [&] { CloseSocket(); })) {
    return absl::DeadlineExceededError(StrCat("connecting to ", Where(), " took over ", timeout.count(), " ms"));
  }
  if (connect_ec) {
    return absl::UnavailableError(StrCat("cannot connect to ", Where(), ": ", connect_ec.message()));
  }
  stream_.lowest_layer().set_option(tcp::no_delay(true), ec);
  return absl::OkStatus();
}

absl::Status TlsChannel::Handshake(Clock::time_point deadline, Duration timeout) {
  SSL* ssl = stream_.native_handle();
  const std::string& name = config_->server_name;
  error_code ec;
  asio::ip::make_address(name, ec);
  if (ec) {
    // A DNS name: sent as SNI and checked against the certificate's subjectAltName DNS entries.
    if (SSL_set_tlsext_host_name(ssl, name.c_str()) != 1 || SSL_set1_host(ssl, name.c_str()) != 1) {
      return absl::InternalError(StrCat("cannot set the server name '", name, "': ", internal::OpenSslErrors()));
    }
  } else if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name.c_str()) != 1) {
    return absl::InternalError(StrCat("cannot set the server address '", name, "': ", internal::OpenSslErrors()));
  }
  bool done = false;
  error_code handshake_ec;
  stream_.async_handshake(ssl::stream_base::client, [&](const error_code& e) {
    handshake_ec = e;
    done = true;
  });
  if (RunUntil([&] { return done; }, deadline, [&] { CloseSocket(); })) {
    return absl::DeadlineExceededError(StrCat("TLS handshake with ", Where(), " took over ", timeout.count(), " ms"));
  }
  if (handshake_ec) {
    const long verify = SSL_get_verify_result(ssl);
    if (verify != X509_V_OK) {
      return absl::UnauthenticatedError(StrCat("the certificate of ", Where(), " (as '", name,
                                               "') failed verification: ", X509_verify_cert_error_string(verify)));
    }
    return ConnectionError(handshake_ec, "TLS handshake");
  }
  if (!config_->pin.empty()) {
    X509* cert = SSL_get0_peer_certificate(ssl);
    if (cert == nullptr) return absl::UnauthenticatedError(StrCat(Where(), " presented no certificate"));
    SEEDLING_ASSIGN_OR_RETURN(const std::string actual, internal::SubjectPublicKeySha256(cert));
    if (actual != config_->pin) {
      return absl::UnauthenticatedError(
          StrCat("the public key of ", Where(), " has SHA-256 ", actual, ", the pinned key is ", config_->pin));
    }
  }
  return absl::OkStatus();
}

absl::Status TlsChannel::Open(Duration timeout) {
  const Clock::time_point deadline = Clock::now() + timeout;
  absl::Status status = Connect(deadline, timeout);
  if (status.ok()) status = Handshake(deadline, timeout);
  if (!status.ok()) {
    CloseSocket();
    return status;
  }
  open_ = true;
  return absl::OkStatus();
}

void TlsChannel::StartReadResponse() {
  asio::async_read(stream_, asio::buffer(header_), [this](const error_code& ec, size_t) {
    auto finish = [this] {
      read_done_ = true;
      // A response before the request is fully written: the server gave up on it (a
      // connection-level Reject); stop writing.
      if (!write_done_) CloseSocket();
    };
    if (ec) {
      read_ec_ = ec;
      return finish();
    }
    absl::StatusOr<uint32_t> length = DecodeFrameLength(header_.data(), kMaxControlFrameBytes);
    if (!length.ok()) {
      read_status_ = absl::InvalidArgumentError(StrCat("bad response frame: ", length.status().message()));
      return finish();
    }
    body_.resize(*length);
    asio::async_read(stream_, asio::buffer(body_), [this, finish](const error_code& ec, size_t) {
      read_ec_ = ec;
      finish();
    });
  });
}

absl::StatusOr<v1::Envelope> TlsChannel::Exchange(const v1::Envelope& request, Clock::time_point deadline,
                                                  Duration timeout) {
  SEEDLING_ASSIGN_OR_RETURN(write_buffer_, EncodeFrame(request, kMaxControlFrameBytes));
  write_done_ = read_done_ = false;
  write_ec_ = read_ec_ = {};
  read_status_ = absl::OkStatus();
  // The response is read while the request is written, so that a server refusing an oversized
  // request early is heard.
  asio::async_write(stream_, asio::buffer(write_buffer_), [this](const error_code& ec, size_t) {
    write_ec_ = ec;
    write_done_ = true;
  });
  StartReadResponse();
  const bool timed_out = RunUntil([this] { return read_done_ && write_done_; }, deadline, [this] { CloseSocket(); });
  if (write_buffer_.size() > kKeepBufferBytes) std::string().swap(write_buffer_);
  if (timed_out)
    return absl::DeadlineExceededError(StrCat("no response from ", Where(), " within ", timeout.count(), " ms"));
  if (!read_status_.ok()) return read_status_;
  if (read_ec_) {
    // A failed write (the peer went away) usually explains a failed read better.
    return ConnectionError(write_ec_ && !IsCertificateRejection(read_ec_) ? write_ec_ : read_ec_, "call");
  }
  absl::StatusOr<v1::Envelope> response = DecodeFrameBody(body_);
  if (body_.size() > kKeepBufferBytes) std::string().swap(body_);
  if (!response.ok()) {
    return absl::Status(response.status().code(), StrCat("bad response frame: ", response.status().message()));
  }
  SEEDLING_RETURN_IF_ERROR(internal::CheckResponseId(request, *response));
  return response;
}

absl::StatusOr<v1::Envelope> TlsChannel::Call(const v1::Envelope& request, Duration timeout) {
  if (!open_) return absl::UnavailableError(StrCat("the channel to ", Where(), " is closed"));
  absl::StatusOr<v1::Envelope> response;
  try {
    response = Exchange(request, Clock::now() + timeout, timeout);
  } catch (const std::exception& e) {
    response = absl::InternalError(StrCat("TLS call failed: ", e.what()));
  }
  // After an error, or a Reject for the connection (the server closes it), the channel is done.
  if (!response.ok() || internal::IsConnectionReject(*response) || write_ec_) Close();
  return response;
}

void TlsChannel::Close() {
  if (!open_) return;
  open_ = false;
  error_code ignored;
  stream_.lowest_layer().shutdown(tcp::socket::shutdown_both, ignored);
  CloseSocket();
}

class TlsTransport final : public Transport {
 public:
  explicit TlsTransport(std::shared_ptr<ClientConfig> config) : config_(std::move(config)) {}

  absl::StatusOr<std::unique_ptr<Channel>> Connect(Duration timeout) override {
    try {
      auto channel = std::make_unique<TlsChannel>(config_);
      SEEDLING_RETURN_IF_ERROR(channel->Open(timeout));
      return std::unique_ptr<Channel>(std::move(channel));
    } catch (const std::exception& e) {
      return absl::InternalError(StrCat("TLS connect failed: ", e.what()));
    }
  }

 private:
  const std::shared_ptr<ClientConfig> config_;  // shared with the channels
};

absl::StatusOr<std::string> NormalizePin(const std::string& pin) {
  std::string out;
  for (char c : pin) {
    if (c == ':') continue;
    if (!std::isxdigit(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(StrCat("pinned_public_key_sha256 '", pin, "' is not hex"));
    }
    out.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  }
  if (out.size() != 64) {
    return absl::InvalidArgumentError(
        StrCat("pinned_public_key_sha256 must be 64 hex digits (SHA-256), got ", out.size()));
  }
  return out;
}

}  // namespace

// ---- Public surface ----------------------------------------------------------------------------

struct TlsServer::Impl {
  Impl(TlsServerOptions options, HandlerFactory factory) : server(std::move(options), std::move(factory)) {}
  Server server;
};

absl::StatusOr<std::unique_ptr<TlsServer>> TlsServer::Start(const TlsServerOptions& options, HandlerFactory factory) {
  if (options.cert_file.empty() || options.key_file.empty()) {
    return absl::InvalidArgumentError("TlsServerOptions: cert_file and key_file are required");
  }
  if (!factory) return absl::InvalidArgumentError("TlsServer: the handler factory is empty");
  if (options.threads < 1) return absl::InvalidArgumentError(StrCat("threads must be >= 1, got ", options.threads));
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError(StrCat("max_connections must be >= 1, got ", options.max_connections));
  }
  SEEDLING_RETURN_IF_ERROR(ValidateDuration(options.handshake_timeout, "handshake_timeout"));
  SEEDLING_RETURN_IF_ERROR(ValidateDuration(options.read_timeout, "read_timeout"));
  SEEDLING_RETURN_IF_ERROR(ValidateDuration(options.idle_timeout, "idle_timeout"));
  SEEDLING_RETURN_IF_ERROR(ValidateDuration(options.write_timeout, "write_timeout"));
  try {
    auto impl = std::make_unique<Impl>(options, std::move(factory));
    SEEDLING_RETURN_IF_ERROR(impl->server.Start());
    return std::unique_ptr<TlsServer>(new TlsServer(std::move(impl)));
  } catch (const std::exception& e) {
    return absl::InternalError(StrCat("cannot start the TLS server: ", e.what()));
  }
}

TlsServer::TlsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

TlsServer::~TlsServer() { Stop(); }

uint16_t TlsServer::port() const { return impl_->server.port(); }

void TlsServer::Stop() { impl_->server.Stop(); }

int TlsServer::active_connections() const { return impl_->server.active_connections(); }

absl::StatusOr<std::unique_ptr<Transport>> MakeTlsTransport(const TlsClientOptions& options) {
  if (options.host.empty()) return absl::InvalidArgumentError("TlsClientOptions: host is required");
  if (options.port == 0) return absl::InvalidArgumentError("TlsClientOptions: port is required");
  if (options.ca_file.empty()) return absl::InvalidArgumentError("TlsClientOptions: ca_file is required");
  if (options.client_cert_file.empty() != options.client_key_file.empty()) {
    return absl::InvalidArgumentError("TlsClientOptions: client_cert_file and client_key_file go together");
  }
  try {
    auto config = std::make_shared<ClientConfig>();
    config->options = options;
    config->server_name = options.server_name.empty() ? options.host : options.server_name;
    if (!options.pinned_public_key_sha256.empty()) {
      SEEDLING_ASSIGN_OR_RETURN(config->pin, NormalizePin(options.pinned_public_key_sha256));
    }
    SSL_CTX* native = config->ctx.native_handle();
    if (SSL_CTX_set_min_proto_version(native, TLS1_3_VERSION) != 1) {
      return absl::InternalError(StrCat("cannot require TLS 1.3: ", internal::OpenSslErrors()));
    }
    config->ctx.set_options(ssl::context::default_workarounds | ssl::context::no_compression);
    config->ctx.set_verify_mode(ssl::verify_peer);
    error_code ec;
    config->ctx.load_verify_file(options.ca_file, ec);
    if (ec) return absl::InvalidArgumentError(StrCat("cannot load the CA '", options.ca_file, "': ", ec.message()));
    if (!options.client_cert_file.empty()) {
      config->ctx.use_certificate_chain_file(options.client_cert_file, ec);
      if (ec) {
        return absl::InvalidArgumentError(
            StrCat("cannot load the client certificate '", options.client_cert_file, "': ", ec.message()));
      }
      config->ctx.use_private_key_file(options.client_key_file, ssl::context::pem, ec);
      if (ec) {
        return absl::InvalidArgumentError(
            StrCat("cannot load the client key '", options.client_key_file, "': ", ec.message()));
      }
      if (SSL_CTX_check_private_key(native) != 1) {
        ERR_clear_error();
        return absl::InvalidArgumentError(
            StrCat("the client key '", options.client_key_file, "' does not match '", options.client_cert_file, "'"));
      }
    }
    return std::unique_ptr<Transport>(std::make_unique<TlsTransport>(std::move(config)));
  } catch (const std::exception& e) {
    return absl::InternalError(StrCat("cannot set up TLS: ", e.what()));
  }
}

}  // namespace seedling::comms
