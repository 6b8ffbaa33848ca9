#pragma once

// The coordinator's observability endpoint (docs/architecture.md, "The server"): plain HTTP on its own port, separate
// from the device protocol, bound to 127.0.0.1 unless configured otherwise.
//
//   GET /            self-contained HTML dashboard (no scripts, no external assets, optional meta
//   refresh) GET /api/status  the DashboardSnapshot as JSON GET /metrics     Prometheus text format
//   0.0.4 (Metrics::RenderPrometheus) GET /healthz     200 "ok", or 503 "unavailable: <reason>"
//   when the health callback says so other paths 404; other methods on these paths 405 (Allow: GET)
//
// Nothing here is secret-bearing by construction: the snapshot holds counts, states and reasons
// only. Keep it that way (no tokens, no device ids, no key material), because the page is
// unauthenticated.

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/metrics.h"

namespace seedling::server {

namespace http_internal {
class Server;
}  // namespace http_internal

// One round as the dashboard shows it. Times are milliseconds since the Unix epoch, 0 = not yet.
struct DashboardRound {
  uint64_t round_id = 0;
  std::string state;             // "open", "collecting", "aggregating", "committed", "aborted"
  std::string method;            // "fedavg", "mezo", ...
  int64_t selected = 0;          // tasks handed out
  int64_t accepted = 0;          // updates accepted
  int64_t rejected = 0;          // updates refused
  double loss_start = NAN;       // mean over reporting clients before local training; NaN if none
  double loss_end = NAN;         // mean over reporting clients after local training; NaN if none
  uint64_t bytes_up = 0;         // client → server payload bytes
  uint64_t bytes_down = 0;       // server → client payload bytes
  int64_t processed_tokens = 0;  // tokens the accepted updates' local steps processed, as the devices report
  // fwdgrad pacing: the variance of the pooled gradient estimate (server/fwdgrad_pacing.h); NaN if not measured.
  double gradient_variance = NAN;
  int64_t opened_ms = 0;
  int64_t deadline_ms = 0;  // when collecting stops; 0 = no deadline
  int64_t closed_ms = 0;
  std::string abort_reason;  // empty unless aborted
};

// Everything the dashboard and /api/status show, produced on demand by the coordinator.
struct DashboardSnapshot {
  std::string server_version;
  uint64_t global_version = 0;
  std::optional<DashboardRound> current;  // the round in progress, if any
  std::vector<DashboardRound> recent;     // finished rounds, newest first
  std::map<std::string, int64_t> rejected_by_reason;
  int64_t devices_registered = 0;
  int64_t connections = 0;
  double epsilon = NAN;            // DP budget spent so far; NaN when DP is off
  double dp_target_epsilon = NAN;  // the budget ([privacy] target_epsilon); NaN when DP is off
  double dp_delta = NAN;           // its δ; NaN when DP is off
  std::string dp_mechanism;        // [privacy] mechanism ("gaussian" or "dp-ftrl"); empty when DP is off
  // DP-FTRL only (NaN otherwise): the zCDP ρ of the committed rounds and its ε at δ = 1e-10 (`epsilon` above
  // is its ε at dp_delta). The Gaussian mechanism's RDP accountant has no single ρ.
  double dp_rho = NAN;
  double dp_epsilon_delta_1e10 = NAN;
  std::string dp_refusal;  // why no round opens (budget exhausted), empty otherwise
};

// The snapshot as a JSON object with the field names above, except dp_epsilon_delta_1e10, written as
// "dp_epsilon_delta_1e-10" (the name each round's result uses); NaN numbers and an empty dp_mechanism become
// null, `current` is null when absent, invalid UTF-8 in strings is replaced by U+FFFD.
std::string RenderStatusJson(const DashboardSnapshot& snapshot);

// The dashboard page. `refresh_seconds` > 0 adds <meta http-equiv="refresh">. Every string from the
// snapshot is HTML-escaped. The charts plot `recent` oldest to newest: the loss chart (<svg
// class="chart-loss">) has one <circle class="pt-start"> per round with a finite loss_start and one
// <circle class="pt-end"> per round with a finite loss_end; the bytes chart (<svg
// class="chart-bytes">) one <rect class="bar-up"> and one <rect class="bar-down"> per round.
std::string RenderDashboardHtml(const DashboardSnapshot& snapshot, int refresh_seconds);

struct HttpOptions {
  std::string bind_address = "127.0.0.1";          // IPv4 or IPv6 literal; "0.0.0.0" exposes it to the network
  uint16_t port = 0;                               // 0 = the OS picks a free port (see HttpServer::port())
  int threads = 1;                                 // I/O threads, >= 1
  std::chrono::milliseconds read_timeout{30000};   // a whole request, including keep-alive idle time
  std::chrono::milliseconds write_timeout{30000};  // a whole response
  uint32_t max_header_bytes = 8 * 1024;            // request line + headers (>= 1024); more: 431 and close
  uint32_t max_body_bytes = 1024;                  // routes are GET-only; a bigger body gets 413 and a close
  int max_connections = 64;                        // further connections are closed on accept
  int dashboard_refresh_seconds = 10;              // meta refresh of GET /; 0 = none
};

// Produces the dashboard data. Called on an I/O thread per request to / or /api/status, possibly
// from several threads at once: it must be thread-safe and quick. An exception it throws becomes a
// 500.
using SnapshotProvider = std::function<DashboardSnapshot()>;
// OK = healthy. Any other status makes /healthz answer 503 with the status message, e.g. when the
// coordinator's store is unusable. Same threading rules as SnapshotProvider.
using HealthCheck = std::function<absl::Status()>;

// A Boost.Beast HTTP/1.1 server: acceptor → one session per connection on its own strand,
// registered so Stop() can close them all; a timeout before every read and write; keep-alive.
// Records seedling_http_requests_total{route,code} into `metrics`.
//
// Thread-safety: Start, Stop and port may be called from any thread, but not concurrently with each
// other. Nothing throws.
class HttpServer {
 public:
  // `metrics` must outlive this server.
  explicit HttpServer(Metrics& metrics);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds, listens and starts the I/O threads; returns once the port accepts connections.
  // InvalidArgument for bad options (unparsable address, threads < 1, a missing provider),
  // Unavailable when the address cannot be bound (in use, not local, no permission),
  // FailedPrecondition when called a second time (a server starts at most once).
  // A missing `health` means "healthy while running".
  absl::Status Start(const HttpOptions& options, SnapshotProvider provider, HealthCheck health = {});

  // Stops accepting, closes every open connection (including idle keep-alive ones) and joins the
  // I/O threads. Requests being answered at that moment are cut off. Idempotent; a no-op before
  // Start. Must not be called from a SnapshotProvider or HealthCheck (it joins the threads running
  // them).
  void Stop();

  // The bound port (the OS's choice when options.port was 0); 0 before Start.
  uint16_t port() const;

 private:
  Metrics& metrics_;
  std::unique_ptr<http_internal::Server> impl_;
  bool started_ = false;
};

}  // namespace seedling::server
