#pragma once

// TLS 1.3 over TCP (Boost.Asio + OpenSSL): the server accepts connections and runs a ConnectionHandler per
// connection; the client side is a Transport. TLS 1.2 and older are refused. The client verifies the server
// against a CA file and, optionally, a pinned SHA-256 of the server's public key (SubjectPublicKeyInfo);
// optional mutual TLS. Every handshake, read and write has a timeout, idle connections are closed.
//
// Server, per connection: after the handshake the factory makes the handler (PeerInfo has the client
// certificate's CN with mutual TLS); then, per frame, the length is checked against MaxRequestBytes() before
// the body is read, Handle runs on an I/O thread, and the response is written. A bad frame gets the
// handler's OnMalformed response; then the server half-closes and discards what the peer still sends for
// at most min(read_timeout, 2 s) before closing, so that the peer can read the Reject. OnClose runs exactly
// once per handler, however the connection ends. Client channels run their own io_context on the calling
// thread: connect, handshake, write and read all end by the call's deadline.

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comms/transport.h"

namespace seedling::comms {

struct TlsServerOptions {
  std::string bind_address = "127.0.0.1";
  uint16_t port = 0;           // 0: pick a free port (see TlsServer::port())
  std::string cert_file;       // PEM server certificate (chain)
  std::string key_file;        // PEM private key
  std::string client_ca_file;  // non-empty: require client certificates signed by this CA
  Duration handshake_timeout{10000};
  Duration read_timeout{30000};  // for the rest of a frame once its first byte arrived
  Duration idle_timeout{60000};  // between frames
  Duration write_timeout{30000};
  int threads = 2;             // I/O threads
  int max_connections = 4096;  // further connections are closed right after accept
};

class TlsServer {
 public:
  // Loads the certificate and key (InvalidArgument naming the file if unusable), binds and listens.
  static absl::StatusOr<std::unique_ptr<TlsServer>> Start(const TlsServerOptions& options, HandlerFactory factory);
  ~TlsServer();  // Stop()
  uint16_t port() const;
  // Stops accepting, closes every connection (their handlers see OnClose), joins the I/O threads.
  // Idempotent; safe from a signal-handling thread.
  // Waits for a Handle() in progress to return. Must not be called from a ConnectionHandler (an I/O
  // thread): that aborts.
  void Stop();
  // Connections open now, including those still in their TLS handshake (what max_connections counts).
  int active_connections() const;

 private:
  struct Impl;
  explicit TlsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct TlsClientOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  std::string ca_file;                   // PEM CA that signed the server certificate (required)
  std::string pinned_public_key_sha256;  // optional hex SHA-256 of the server's SubjectPublicKeyInfo (DER)
  std::string server_name;               // SNI and the name checked against the certificate; default `host`
  std::string client_cert_file;          // optional, for mutual TLS
  std::string client_key_file;
};

// A Transport whose channels are TLS connections. Unauthenticated for verification failures (unknown CA,
// wrong name, pin mismatch).
absl::StatusOr<std::unique_ptr<Transport>> MakeTlsTransport(const TlsClientOptions& options);

// Certificates for `seedling certs init`: a CA (ECDSA P-256, self-signed) and a server certificate signed by
// it with the given DNS names / IP addresses as subjectAltName. PEM files written atomically into `dir`:
// ca.crt, ca.key, server.crt, server.key (keys mode 0600). Also usable for client certificates (mTLS).
struct CertificateOptions {
  std::string dir;
  std::vector<std::string> server_names = {"localhost", "127.0.0.1"};
  int validity_days = 825;
  bool overwrite = false;  // refuse to replace existing files unless set
};
absl::Status CreateCertificates(const CertificateOptions& options);
// Issues a client certificate (for mutual TLS) signed by the CA in `dir`: <name>.crt / <name>.key.
absl::Status CreateClientCertificate(const std::string& dir, const std::string& name, int validity_days = 825);
// Hex SHA-256 of a certificate file's SubjectPublicKeyInfo, for TlsClientOptions::pinned_public_key_sha256.
absl::StatusOr<std::string> PublicKeySha256(const std::string& cert_file);

}  // namespace seedling::comms
