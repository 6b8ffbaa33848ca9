// Concurrency benchmark of the coordination server: N devices on loopback each run one full device
// session against a real `seedling serve` child process, and we report what the server got done and
// what it cost.
//
//   seedling_bench_concurrency [--n 100,500,1000,2000] [--work-dir DIR] [--client-threads 2]
//                              [--max-inflight 0] [--session-timeout-s 60] [--server-io-threads 2]
//                              [--chunk-bytes 1048576] [--json] [--keep-work-dir] [--seedling PATH]
//                              [--soak-seconds 0] [--soak-sample-s 10]
//
// One session, as a phone runs it: TCP connect, TLS 1.3 handshake (server certificate verified
// against the benchmark's CA and its IP subjectAltName), Hello with the device's token, CheckIn,
// and if the reply is a task: a dense update of the task's num_parameters encoded with
// comms::EncodeDense in the task's codec, sent with UploadBegin / UploadChunk / UploadCommit. A
// session's latency runs from the start of the TCP connect to its last response (encoding the
// update, a few microseconds, is inside it).
//
// For each N the server starts from scratch: a fresh state directory with exactly N registered
// devices, a config in which every device can get a task (clients_per_round = N, over_selection 1,
// min_reports 1, a selection window and deadline far beyond the run), and a wait until round 1 is
// open before the first device connects. Every session opens its own connection with a full
// handshake (no TLS resumption; the server issues no tickets anyway), because every device is a
// different phone.
//
// Client side: one process, one io_context run by --client-threads threads, sessions written as
// Asio coroutines. By default all N sessions are started at once (--max-inflight 0), so N
// connections really are in flight together; the peak number of sessions open at the same time is
// measured and printed. The client shares the machine's cores with the server: its CPU time is
// printed next to the server's.
//
// Outcome of a session: "done" (the server answered every request: with a task, a RetryAfter, an
// accepted upload or a Reject) or an error (connect failure, TLS failure, broken connection,
// malformed response, or the per-session deadline). Latency percentiles (nearest rank) are over
// done sessions. After the clients finish, the server's VmHWM is read from /proc, the server is
// stopped with SIGTERM, and its store is opened to check round 1 against what the clients were told
// (an acknowledged upload must be in the ledger).
//
// Soak (--soak-seconds S): each of the N devices runs session after session for S seconds, as a phone
// does over a day: after a RetryAfter it waits the seconds the server said (at most 60), after an
// upload or an error 1 s. The server runs rounds back to back (clients_per_round = N / 10, a 5 s
// selection window, rounds until stopped), so devices get tasks, upload, and rounds commit throughout.
// The server's VmRSS is sampled every --soak-sample-s seconds; the benchmark prints the samples and the
// growth of the last half's peak over the first half's (after the first minute), and checks every
// round's ledger against the uploads the devices were told were accepted.

#include <fcntl.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/file.h"
#include "base/memory.h"
#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "comms/framing.h"
#include "comms/proto/seedling.pb.h"
#include "comms/tls.h"
#include "model/init.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/store.h"

extern char** environ;

namespace {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
namespace v1 = seedling::v1;
namespace comms = seedling::comms;
namespace server = seedling::server;
using tcp = asio::ip::tcp;
using boost::system::error_code;
using SteadyClock = std::chrono::steady_clock;
using seedling::StrCat;

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);
constexpr const char* kLoopback = "127.0.0.1";

// ---- options
// --------------------------------------------------------------------------------------------

struct Options {
  std::vector<int> ns = {100, 500, 1000, 2000};  // device counts, one server run each
  std::string work_dir;                          // empty: a fresh directory under /tmp, removed afterwards
  bool keep_work_dir = false;                    // keep the temporary work directory (logs, state)
  int client_threads = 2;                        // threads running the clients' io_context
  int max_inflight = 0;                          // sessions in flight at once; 0 = all N
  int session_timeout_s = 60;                    // per-session deadline, connect to last response
  int server_io_threads = 2;                     // [server] io_threads
  int64_t chunk_bytes = comms::kMaxChunkBytes;   // UploadChunk size (the SDK's default: 1 MiB)
  bool json = false;                             // one JSON line per N at the end
  int soak_s = 0;          // > 0: every device runs sessions in a loop for this long (see the file comment)
  int soak_sample_s = 10;  // the soak's RSS sampling period
  std::string seedling_binary = SEEDLING_BINARY;
};

[[noreturn]] void Usage(int code) {
  std::fprintf(code == 0 ? stdout : stderr,
               "usage: seedling_bench_concurrency [--n 100,500,1000,2000] [--work-dir DIR] "
               "[--keep-work-dir]\n"
               "         [--client-threads 2] [--max-inflight 0 (= all N)] [--session-timeout-s 60]\n"
               "         [--server-io-threads 2] [--chunk-bytes 1048576] [--json] [--seedling PATH]\n"
               "         [--soak-seconds 0 (off)] [--soak-sample-s 10]\n");
  std::exit(code);
}

int ParsePositive(const std::string& flag, const std::string& text, int min_value) {
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (end == text.c_str() || *end != '\0' || v < min_value || v > (1 << 30)) {
    std::fprintf(stderr, "seedling_bench_concurrency: %s wants an integer >= %d, got '%s'\n", flag.c_str(), min_value,
                 text.c_str());
    Usage(2);
  }
  return static_cast<int>(v);
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "seedling_bench_concurrency: %s needs a value\n", arg.c_str());
        Usage(2);
      }
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      Usage(0);
    } else if (arg == "--n") {
      o.ns.clear();
      std::stringstream list(value());
      for (std::string item; std::getline(list, item, ',');) o.ns.push_back(ParsePositive("--n", item, 1));
      if (o.ns.empty()) Usage(2);
    } else if (arg == "--work-dir") {
      o.work_dir = value();
    } else if (arg == "--keep-work-dir") {
      o.keep_work_dir = true;
    } else if (arg == "--client-threads") {
      o.client_threads = ParsePositive(arg, value(), 1);
    } else if (arg == "--max-inflight") {
      o.max_inflight = ParsePositive(arg, value(), 0);
    } else if (arg == "--session-timeout-s") {
      o.session_timeout_s = ParsePositive(arg, value(), 1);
    } else if (arg == "--server-io-threads") {
      o.server_io_threads = ParsePositive(arg, value(), 1);
    } else if (arg == "--chunk-bytes") {
      o.chunk_bytes = ParsePositive(arg, value(), 1);
      if (o.chunk_bytes > static_cast<int64_t>(comms::kMaxChunkBytes)) {
        std::fprintf(stderr, "seedling_bench_concurrency: --chunk-bytes is at most %zu\n", comms::kMaxChunkBytes);
        Usage(2);
      }
    } else if (arg == "--json") {
      o.json = true;
    } else if (arg == "--soak-seconds") {
      o.soak_s = ParsePositive(arg, value(), 0);
    } else if (arg == "--soak-sample-s") {
      o.soak_sample_s = ParsePositive(arg, value(), 1);
    } else if (arg == "--seedling") {
      o.seedling_binary = value();
    } else {
      std::fprintf(stderr, "seedling_bench_concurrency: unknown argument '%s'\n", arg.c_str());
      Usage(2);
    }
  }
  return o;
}

// ---- /proc helpers
// --------------------------------------------------------------------------------------

// A "Key:   1234 kB" line of /proc/<pid>/status, in bytes; -1 if unreadable (the process is gone).
int64_t ProcStatusBytes(pid_t pid, std::string_view key) {
  absl::StatusOr<std::string> text = seedling::ReadFile(StrCat("/proc/", pid, "/status"));
  if (!text.ok()) return -1;
  std::istringstream in(*text);
  for (std::string line; std::getline(in, line);) {
    if (line.compare(0, key.size(), key) == 0 && line.size() > key.size() && line[key.size()] == ':') {
      return std::strtoll(line.c_str() + key.size() + 1, nullptr, 10) * 1024;
    }
  }
  return -1;
}

// User + system CPU seconds of a process so far (/proc/<pid>/stat fields 14 and 15); -1 if
// unreadable.
double ProcCpuSeconds(pid_t pid) {
  absl::StatusOr<std::string> text = seedling::ReadFile(StrCat("/proc/", pid, "/stat"));
  if (!text.ok()) return -1;
  // The command name (field 2) may contain spaces; the fields after it start past the last ')'.
  const size_t close = text->rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream in(text->substr(close + 2));
  std::string field;
  long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && (in >> field); ++i) {
    if (i == 14) utime = std::atoll(field.c_str());
    if (i == 15) stime = std::atoll(field.c_str());
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double SelfCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

std::string CpuModel() {
  absl::StatusOr<std::string> text = seedling::ReadFile("/proc/cpuinfo");
  if (!text.ok()) return "unknown CPU";
  std::istringstream in(*text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown CPU";
}

std::string ReadSysctl(const char* path) {
  absl::StatusOr<std::string> text = seedling::ReadFile(path);
  if (!text.ok()) return "?";
  std::string s = *text;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// ---- the server child process
// ---------------------------------------------------------------------------

class ServerProcess {
 public:
  // Starts `binary --log-level info serve --config <config> --port-file <port_file>` with stdout
  // and stderr going to `log_path` (info level: round open / commit lines and every
  // connection-level failure).
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Spawn(const std::string& binary, const std::string& config,
                                                              const std::string& port_file,
                                                              const std::string& log_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    std::vector<std::string> args = {binary,     "--log-level", "info",        "serve",
                                     "--config", config,        "--port-file", port_file};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) return absl::InternalError(StrCat("cannot start ", binary, ": ", std::strerror(rc)));
    return std::unique_ptr<ServerProcess>(new ServerProcess(pid));
  }

  // Never leaves a server behind, whatever path the benchmark takes out.
  ~ServerProcess() {
    if (Running()) {
      kill(pid_, SIGKILL);
      Reap(/*block=*/true);
    }
  }

  pid_t pid() const { return pid_; }

  bool Running() {
    if (!exited_) Reap(/*block=*/false);
    return !exited_;
  }

  // How the process ended ("exit status 0", "killed by signal 9"); empty while it runs.
  std::string ExitDescription() const {
    if (!exited_) return "";
    if (WIFEXITED(status_)) return StrCat("exit status ", WEXITSTATUS(status_));
    if (WIFSIGNALED(status_))
      return StrCat("killed by signal ", WTERMSIG(status_), " (", strsignal(WTERMSIG(status_)), ")");
    return "ended";
  }
  bool ExitedCleanly() const { return exited_ && WIFEXITED(status_) && WEXITSTATUS(status_) == 0; }

  // SIGTERM (the server's graceful shutdown), then SIGKILL after `grace`. Error if it had to be
  // killed or did not exit with status 0.
  absl::Status Stop(std::chrono::seconds grace) {
    if (!Running()) return absl::UnavailableError(StrCat("the server had already ended: ", ExitDescription()));
    kill(pid_, SIGTERM);
    const auto deadline = SteadyClock::now() + grace;
    while (Running() && SteadyClock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (Running()) {
      kill(pid_, SIGKILL);
      Reap(/*block=*/true);
      return absl::DeadlineExceededError(StrCat("the server did not stop within ", grace.count(), " s of SIGTERM"));
    }
    if (!ExitedCleanly()) return absl::InternalError(StrCat("the server stopped with ", ExitDescription()));
    return absl::OkStatus();
  }

 private:
  explicit ServerProcess(pid_t pid) : pid_(pid) {}

  void Reap(bool block) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, block ? 0 : WNOHANG);
    if (r == pid_) {
      exited_ = true;
      status_ = status;
    }
  }

  const pid_t pid_;
  bool exited_ = false;
  int status_ = 0;
};

// ---- one device session
// ---------------------------------------------------------------------------------

enum class Stage { kConnect, kHandshake, kHello, kCheckIn, kUploadBegin, kUploadChunk, kUploadCommit };

const char* StageName(Stage s) {
  switch (s) {
    case Stage::kConnect:
      return "connect";
    case Stage::kHandshake:
      return "tls_handshake";
    case Stage::kHello:
      return "hello";
    case Stage::kCheckIn:
      return "check_in";
    case Stage::kUploadBegin:
      return "upload_begin";
    case Stage::kUploadChunk:
      return "upload_chunk";
    case Stage::kUploadCommit:
      return "upload_commit";
  }
  return "?";
}

// Written by the session's coroutine only; read by the main thread after every session ended.
struct SessionResult {
  bool started = false;
  bool done = false;  // the server answered every request (task, RetryAfter, Reject or acceptance)
  bool got_task = false;
  bool retry_after = false;
  uint32_t retry_seconds = 0;  // what the RetryAfter said
  std::string retry_reason;
  bool accepted = false;  // UploadCommit acknowledged with accepted = true
  bool rejected = false;
  v1::RejectCode reject_code = v1::REJECT_UNSPECIFIED;
  std::string reject_message;
  Stage stage = Stage::kConnect;  // where a rejection or error happened
  bool error = false;
  bool timed_out = false;
  std::string error_message;
  uint64_t num_parameters = 0;
  uint64_t update_bytes = 0;
  SteadyClock::time_point start, connected, end;
};

// Shared by all sessions of one run. Constant while they run except the atomics and `results` (each
// session writes only its own element).
struct RunState {
  ssl::context* tls = nullptr;
  tcp::endpoint endpoint;
  std::chrono::seconds session_timeout{60};
  int64_t chunk_bytes = comms::kMaxChunkBytes;
  std::vector<std::string> device_ids;
  std::vector<std::string> tokens;
  std::vector<SessionResult> results;
  SteadyClock::time_point soak_end;         // soak: no session starts after this
  std::vector<SessionResult> soak_results;  // soak: every finished session; guarded by mu
  std::atomic<int> next{0};                 // next session index to start
  std::atomic<int> in_flight{0};
  std::atomic<int> peak_in_flight{0};
  std::atomic<int> workers_done{0};
  std::mutex mu;
  std::vector<std::string> worker_failures;  // guarded by mu
};

// The socket, and a deadline timer that closes it: every pending operation then completes with an
// error, so no session outlives its deadline whatever the server does.
struct Connection {
  Connection(const asio::any_io_executor& executor, ssl::context& tls) : stream(executor, tls), deadline(executor) {}
  ssl::stream<tcp::socket> stream;
  asio::steady_timer deadline;
  bool timed_out = false;
  uint64_t last_request_id = 0;
};

absl::Status IoError(const Connection& c, std::string_view what, const error_code& ec) {
  if (c.timed_out) return absl::DeadlineExceededError("the session deadline passed");
  return absl::UnavailableError(StrCat(what, ": ", ec.message()));
}

// Sends one request and reads its response (the same request_id, or a connection-level Reject with
// 0).
asio::awaitable<absl::StatusOr<v1::Envelope>> Call(Connection& c, v1::Envelope request) {
  const uint64_t id = ++c.last_request_id;
  request.set_protocol_version(1);
  request.set_request_id(id);
  absl::StatusOr<std::string> frame = comms::EncodeFrame(request, comms::kMaxChunkFrameBytes);
  if (!frame.ok()) co_return frame.status();
  auto [write_ec, written] = co_await asio::async_write(c.stream, asio::buffer(*frame), kAwait);
  if (write_ec) co_return IoError(c, "write", write_ec);
  std::array<uint8_t, 4> header{};
  auto [header_ec, header_n] = co_await asio::async_read(c.stream, asio::buffer(header), kAwait);
  if (header_ec) co_return IoError(c, "read", header_ec);
  absl::StatusOr<uint32_t> length = comms::DecodeFrameLength(header.data(), comms::kMaxControlFrameBytes);
  if (!length.ok()) co_return length.status();
  std::string body(*length, '\0');
  auto [body_ec, body_n] = co_await asio::async_read(c.stream, asio::buffer(body), kAwait);
  if (body_ec) co_return IoError(c, "read", body_ec);
  absl::StatusOr<v1::Envelope> response = comms::DecodeFrameBody(body);
  if (!response.ok()) co_return response.status();
  if (response->request_id() != id && !(response->has_reject() && response->request_id() == 0)) {
    co_return absl::InvalidArgumentError(
        StrCat("response to request ", id, " has request_id ", response->request_id()));
  }
  co_return response;
}

void Fail(SessionResult& r, const Connection& c, Stage stage, std::string message) {
  r.error = true;
  r.timed_out = c.timed_out;
  r.stage = stage;
  r.error_message = c.timed_out ? "session deadline passed" : std::move(message);
}

void Reject(SessionResult& r, Stage stage, const v1::Reject& reject) {
  r.done = true;
  r.rejected = true;
  r.stage = stage;
  r.reject_code = reject.code();
  r.reject_message = reject.message();
}

// The session's requests in order; returns at the first error or final answer (recorded in `r`).
asio::awaitable<void> SessionBody(RunState& run, int index, Connection& c, SessionResult& r) {
  // Connect and handshake.
  auto [connect_ec] = co_await c.stream.lowest_layer().async_connect(run.endpoint, kAwait);
  if (connect_ec) co_return Fail(r, c, Stage::kConnect, connect_ec.message());
  error_code ignored;
  c.stream.lowest_layer().set_option(tcp::no_delay(true), ignored);
  SSL* native = c.stream.native_handle();
  // The server certificate must name this address in its subjectAltName (as comms' TLS client
  // checks it).
  if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(native), kLoopback) != 1) {
    co_return Fail(r, c, Stage::kHandshake, "cannot set the expected server address");
  }
  auto [handshake_ec] = co_await c.stream.async_handshake(ssl::stream_base::client, kAwait);
  if (handshake_ec) {
    const long verify = SSL_get_verify_result(native);
    co_return Fail(r, c, Stage::kHandshake,
                   verify != X509_V_OK ? StrCat("certificate verification: ", X509_verify_cert_error_string(verify))
                                       : handshake_ec.message());
  }
  if (SSL_version(native) != TLS1_3_VERSION) co_return Fail(r, c, Stage::kHandshake, "not TLS 1.3");
  r.connected = SteadyClock::now();

  // Hello.
  v1::Envelope hello;
  hello.mutable_hello()->set_device_id(run.device_ids[index]);
  hello.mutable_hello()->set_token(run.tokens[index]);
  hello.mutable_hello()->set_sdk_version("seedling_bench_concurrency");
  hello.mutable_hello()->add_methods("lora-bp");
  absl::StatusOr<v1::Envelope> reply = co_await Call(c, hello);
  if (!reply.ok()) co_return Fail(r, c, Stage::kHello, std::string(reply.status().message()));
  if (reply->has_reject()) co_return Reject(r, Stage::kHello, reply->reject());
  if (!reply->has_hello_reply()) co_return Fail(r, c, Stage::kHello, "the answer to Hello is not a HelloReply");

  // CheckIn: a phone on a charger, on Wi-Fi, idle, with room for the tiny model.
  constexpr uint64_t kNumExamples = 100;
  v1::Envelope check_in;
  v1::DeviceConditions* cond = check_in.mutable_check_in()->mutable_conditions();
  cond->set_charging(true);
  cond->set_unmetered(true);
  cond->set_idle(true);
  cond->set_battery(1.0f);
  check_in.mutable_check_in()->set_memory_budget_bytes(1ull << 30);
  check_in.mutable_check_in()->set_num_examples(kNumExamples);
  reply = co_await Call(c, check_in);
  if (!reply.ok()) co_return Fail(r, c, Stage::kCheckIn, std::string(reply.status().message()));
  if (reply->has_reject()) co_return Reject(r, Stage::kCheckIn, reply->reject());
  if (!reply->has_check_in_reply())
    co_return Fail(r, c, Stage::kCheckIn, "the answer to CheckIn is not a CheckInReply");
  if (reply->check_in_reply().has_retry_after()) {
    r.done = true;
    r.retry_after = true;
    r.retry_seconds = reply->check_in_reply().retry_after().seconds();
    r.retry_reason = reply->check_in_reply().retry_after().reason();
    co_return;
  }
  if (!reply->check_in_reply().has_task()) co_return Fail(r, c, Stage::kCheckIn, "CheckInReply has no outcome");
  const v1::Task task = reply->check_in_reply().task();
  r.got_task = true;
  r.num_parameters = task.num_parameters();

  // The update: small Gaussian values, different for every device (a real device's update would be
  // its training result; the server's cost does not depend on the values).
  if (task.num_parameters() > (64ull << 20)) {
    co_return Fail(r, c, Stage::kUploadBegin, StrCat("task has ", task.num_parameters(), " parameters"));
  }
  std::vector<float> update(task.num_parameters());
  seedling::FillNormal({static_cast<uint64_t>(index) + 1, seedling::rng_stream::kPerturbation}, 0, update);
  for (float& x : update) x *= 1e-3f;
  comms::CodecOptions codec;
  codec.codec = task.codec().codec();
  codec.block_size = task.codec().block_size();
  codec.topk_fraction = task.codec().topk_fraction();
  comms::ErrorFeedback feedback(codec.codec == v1::CODEC_TOPK ? update.size() : 0);
  absl::StatusOr<std::string> payload =
      comms::EncodeDense(update, codec, task.seed(), codec.codec == v1::CODEC_TOPK ? &feedback : nullptr);
  if (!payload.ok()) {
    co_return Fail(r, c, Stage::kUploadBegin, StrCat("cannot encode the update: ", payload.status().message()));
  }
  r.update_bytes = payload->size();
  const std::string key = StrCat(run.device_ids[index], "/", task.round_id(), "/", task.task_id());

  v1::Envelope begin;
  v1::UploadBegin* b = begin.mutable_upload_begin();
  b->set_round_id(task.round_id());
  b->set_task_id(task.task_id());
  b->set_idempotency_key(key);
  b->set_total_bytes(payload->size());
  b->set_codec(codec.codec);
  b->set_num_examples(kNumExamples);
  b->mutable_metrics()->set_loss_start(3.0f);
  b->mutable_metrics()->set_loss_end(2.5f);
  b->mutable_metrics()->set_steps(20);
  b->set_sha256(seedling::Sha256(*payload));
  reply = co_await Call(c, begin);
  if (!reply.ok()) co_return Fail(r, c, Stage::kUploadBegin, std::string(reply.status().message()));
  if (reply->has_reject()) co_return Reject(r, Stage::kUploadBegin, reply->reject());
  if (!reply->has_upload_ack()) co_return Fail(r, c, Stage::kUploadBegin, "the answer is not an UploadAck");
  uint64_t offset = reply->upload_ack().received_bytes();
  while (offset < payload->size()) {
    v1::Envelope chunk;
    chunk.mutable_upload_chunk()->set_idempotency_key(key);
    chunk.mutable_upload_chunk()->set_offset(offset);
    chunk.mutable_upload_chunk()->set_data(payload->substr(offset, static_cast<size_t>(run.chunk_bytes)));
    reply = co_await Call(c, chunk);
    if (!reply.ok()) co_return Fail(r, c, Stage::kUploadChunk, std::string(reply.status().message()));
    if (reply->has_reject()) co_return Reject(r, Stage::kUploadChunk, reply->reject());
    if (!reply->has_upload_ack()) co_return Fail(r, c, Stage::kUploadChunk, "the answer is not an UploadAck");
    if (reply->upload_ack().received_bytes() <= offset) {
      co_return Fail(r, c, Stage::kUploadChunk, "the server acknowledged no progress");
    }
    offset = reply->upload_ack().received_bytes();
  }
  v1::Envelope commit;
  commit.mutable_upload_commit()->set_idempotency_key(key);
  reply = co_await Call(c, commit);
  if (!reply.ok()) co_return Fail(r, c, Stage::kUploadCommit, std::string(reply.status().message()));
  if (reply->has_reject()) co_return Reject(r, Stage::kUploadCommit, reply->reject());
  if (!reply->has_upload_ack() || !reply->upload_ack().accepted()) {
    co_return Fail(r, c, Stage::kUploadCommit, "the commit was answered without accepted = true");
  }
  r.done = true;
  r.accepted = true;
}

asio::awaitable<void> RunSession(RunState& run, int index, SessionResult& r) {
  const int now_in_flight = ++run.in_flight;
  for (int peak = run.peak_in_flight.load();
       now_in_flight > peak && !run.peak_in_flight.compare_exchange_weak(peak, now_in_flight);) {
  }
  const asio::any_io_executor executor = co_await asio::this_coro::executor;
  auto c = std::make_shared<Connection>(executor, *run.tls);
  r.started = true;
  r.start = SteadyClock::now();
  c->deadline.expires_after(run.session_timeout);
  // The handler shares ownership: the timer's completion may already be queued when the session
  // ends.
  c->deadline.async_wait([c](const error_code& ec) {
    if (ec) return;
    c->timed_out = true;
    error_code ignored;
    c->stream.lowest_layer().close(ignored);
  });
  co_await SessionBody(run, index, *c, r);
  r.end = SteadyClock::now();
  c->deadline.cancel();
  // As the SDK's channel closes: no TLS close_notify round trip, the server sees EOF.
  error_code ignored;
  c->stream.lowest_layer().shutdown(tcp::socket::shutdown_both, ignored);
  c->stream.lowest_layer().close(ignored);
  --run.in_flight;
}

// Runs sessions one after the other until none are left; there are min(N, max_inflight) workers.
asio::awaitable<void> Worker(RunState& run) {
  for (int index = run.next++; index < static_cast<int>(run.results.size()); index = run.next++) {
    co_await RunSession(run, index, run.results[index]);
  }
}

// Soak: device `index` runs sessions until the soak ends, pausing as the server said (RetryAfter, at
// most 60 s) or 1 s; the pause ends early when the soak does.
asio::awaitable<void> SoakDevice(RunState& run, int index) {
  asio::steady_timer pause(co_await asio::this_coro::executor);
  while (SteadyClock::now() < run.soak_end) {
    SessionResult r;
    co_await RunSession(run, index, r);
    const int wait_s = r.retry_after ? std::clamp<int>(static_cast<int>(r.retry_seconds), 1, 60) : 1;
    {
      std::lock_guard<std::mutex> lock(run.mu);
      run.soak_results.push_back(std::move(r));
    }
    pause.expires_at(std::min(SteadyClock::now() + std::chrono::seconds(wait_s), run.soak_end));
    co_await pause.async_wait(kAwait);
  }
}

// ---- one benchmark run
// ----------------------------------------------------------------------------------

struct Summary {
  int n = 0;
  int workers = 0;         // sessions allowed in flight at once
  int peak_in_flight = 0;  // measured
  int done = 0, got_task = 0, retry_after = 0, accepted = 0, rejected = 0, errors = 0, timeouts = 0, not_run = 0;
  std::map<std::string, int> rejected_by_code;  // "STALE at upload_commit"
  std::map<std::string, int> retry_reasons;
  std::map<std::string, int> errors_by_kind;           // "<stage>: <message>"
  std::map<std::string, std::string> reject_examples;  // one server message per code
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;
  double handshake_p50_ms = 0, handshake_p99_ms = 0;  // TCP connect + TLS handshake
  double wall_s = 0, sessions_per_s = 0;
  int64_t server_rss_start = -1, server_rss_end = -1, server_rss_peak = -1;
  double server_cpu_s = 0, client_cpu_s = 0;
  uint64_t num_parameters = 0, update_bytes = 0;
  int log_warnings = 0, log_errors = 0;
  std::vector<std::string> log_samples;
  std::string round1_state = "?";
  int64_t round1_selected = -1, round1_accepted = -1, ledger_entries = -1;
  double setup_s = 0;
  // Soak only: (seconds since the start, server VmRSS) samples, rounds committed, ledger entries of all
  // rounds.
  std::vector<std::pair<double, int64_t>> rss_samples;
  int64_t rounds_committed = -1, soak_ledger_entries = -1;
  std::string failure;  // non-empty: the run could not be measured (server died, ...)
  bool ledger_violation = false;
};

// Nearest-rank percentile of sorted values.
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

double Ms(SteadyClock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

std::string TomlString(const std::string& s) { return nlohmann::json(s).dump(); }  // a JSON string is TOML

std::string ServerToml(const Options& o, int n, const std::string& dir, const std::string& certs,
                       const std::string& model) {
  // Every device can get a task and nothing closes the round during the run: the benchmark measures
  // the request path, not the round's timers. Server timeouts stay at their production defaults.
  // A soak runs rounds back to back instead (see the file comment).
  const std::string rounds =
      o.soak_s > 0 ? StrCat("clients_per_round = ", std::max(1, n / 10), "\n", "over_selection = 1.0\n",
                            "min_reports = 1\n", "selection_window_s = 5\n", "round_deadline_s = 60\n")
                   : StrCat("clients_per_round = ", n, "\n", "over_selection = 1.0\n", "min_reports = 1\n",
                            "selection_window_s = 3600\n", "round_deadline_s = 7200\n");
  return StrCat("[server]\n", "state_dir = ", TomlString(seedling::JoinPath(dir, "state")), "\n", "bind = \"",
                kLoopback, "\"\n", "port = 0\n", "cert_file = ", TomlString(seedling::JoinPath(certs, "server.crt")),
                "\n", "key_file = ", TomlString(seedling::JoinPath(certs, "server.key")), "\n",
                "io_threads = ", o.server_io_threads, "\n", "max_connections = ", n + 64, "\n", "http_port = 0\n",
                "\n[model]\n", "dir = ", TomlString(model), "\n", "\n[training]\n", "method = \"lora-bp\"\n",
                "rounds = 0\n", rounds, "codec = \"fp32\"\n", "max_inflight_uploads = ", n, "\n");
}

// Waits for `pred` while the server runs, polling; false on timeout or if the server ended.
template <typename Pred>
bool WaitFor(ServerProcess& server, std::chrono::seconds timeout, Pred pred) {
  const auto deadline = SteadyClock::now() + timeout;
  while (SteadyClock::now() < deadline) {
    if (pred()) return true;
    if (!server.Running()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return pred();
}

// Counts warning / error lines of the server's log and keeps a few distinct ones (timestamps
// removed). Lines the benchmark's SIGTERM causes are not counted.
void ScanServerLog(const std::string& path, Summary& s) {
  absl::StatusOr<std::string> text = seedling::ReadFile(path);
  if (!text.ok()) return;
  std::istringstream in(*text);
  std::map<std::string, int> seen;
  for (std::string line; std::getline(in, line);) {
    const bool warning = line.find("] [warning] ") != std::string::npos;
    const bool error = line.find("] [error] ") != std::string::npos || line.find("check failed") != std::string::npos;
    if (!warning && !error) continue;
    // Caused by the benchmark's own SIGTERM: the shutdown notice and the abort of the round opened
    // after round 1 committed.
    if (line.find("shutdown requested") != std::string::npos ||
        line.find("server shut down during the round") != std::string::npos) {
      continue;
    }
    (warning ? s.log_warnings : s.log_errors)++;
    const size_t body = line.find("] [");
    std::string msg = body == std::string::npos ? line : line.substr(body + 2);
    // Group "refusing 127.0.0.1:40012: ..." style lines by cutting at the first digit run after the
    // level.
    const size_t digit = msg.find_first_of("0123456789", msg.find(']'));
    const std::string group = msg.substr(0, std::min(digit, msg.size()));
    if (seen[group]++ == 0 && s.log_samples.size() < 6) s.log_samples.push_back(msg.substr(0, 200));
  }
}

// Soak: the rounds the server committed and the ledger entries of every round.
void CountSoakRounds(server::Store& store, Summary& s) {
  absl::StatusOr<std::optional<server::RoundRecord>> latest = store.LatestRound();
  if (!latest.ok() || !latest->has_value()) return;
  s.rounds_committed = 0;
  s.soak_ledger_entries = 0;
  for (uint64_t id = 1; id <= (*latest)->round_id; ++id) {
    absl::StatusOr<std::optional<server::RoundRecord>> round = store.FindRound(id);
    if (round.ok() && round->has_value() && (*round)->state == server::RoundState::kCommitted) ++s.rounds_committed;
    absl::StatusOr<std::vector<server::LedgerEntry>> ledger = store.LedgerForRound(id);
    if (ledger.ok()) s.soak_ledger_entries += static_cast<int64_t>(ledger->size());
  }
}

// The soak's RSS growth: the peak of the samples in the last half of the run over the peak of those
// between the first minute and the half, minus 1 (0.05 = 5% more). 0 without enough samples.
double SoakRssGrowth(const Summary& s, int soak_s) {
  int64_t first = 0, last = 0;
  for (const auto& [t, rss] : s.rss_samples) {
    if (t >= soak_s / 2.0) {
      last = std::max(last, rss);
    } else if (t >= std::min(60.0, soak_s / 4.0)) {
      first = std::max(first, rss);
    }
  }
  return first > 0 && last > 0 ? static_cast<double>(last) / static_cast<double>(first) - 1 : 0;
}

// Counts, percentiles and rates of the finished sessions into `s`.
void TallySessions(const std::vector<SessionResult>& results, Summary& s) {
  std::vector<double> latencies, handshakes;
  SteadyClock::time_point first = SteadyClock::time_point::max(), last = SteadyClock::time_point::min();
  for (const SessionResult& r : results) {
    if (!r.started || (!r.done && !r.error)) {
      ++s.not_run;
      continue;
    }
    first = std::min(first, r.start);
    last = std::max(last, r.end);
    if (r.got_task) ++s.got_task;
    if (r.num_parameters != 0) s.num_parameters = r.num_parameters;
    if (r.update_bytes != 0) s.update_bytes = r.update_bytes;
    if (r.connected != SteadyClock::time_point{}) handshakes.push_back(Ms(r.connected - r.start));
    if (r.error) {
      ++s.errors;
      if (r.timed_out) ++s.timeouts;
      s.errors_by_kind[StrCat(StageName(r.stage), ": ", r.error_message.substr(0, 100))]++;
      continue;
    }
    ++s.done;
    latencies.push_back(Ms(r.end - r.start));
    if (r.retry_after) {
      ++s.retry_after;
      s.retry_reasons[r.retry_reason]++;
    }
    if (r.accepted) ++s.accepted;
    if (r.rejected) {
      ++s.rejected;
      const std::string code = StrCat(v1::RejectCode_Name(r.reject_code), " at ", StageName(r.stage));
      s.rejected_by_code[code]++;
      s.reject_examples.emplace(code, r.reject_message.substr(0, 160));
    }
  }
  std::sort(latencies.begin(), latencies.end());
  std::sort(handshakes.begin(), handshakes.end());
  s.p50_ms = Percentile(latencies, 50);
  s.p90_ms = Percentile(latencies, 90);
  s.p99_ms = Percentile(latencies, 99);
  s.max_ms = latencies.empty() ? 0 : latencies.back();
  double sum = 0;
  for (double v : latencies) sum += v;
  s.mean_ms = latencies.empty() ? 0 : sum / static_cast<double>(latencies.size());
  s.handshake_p50_ms = Percentile(handshakes, 50);
  s.handshake_p99_ms = Percentile(handshakes, 99);
  if (last > first) {
    s.wall_s = std::chrono::duration<double>(last - first).count();
    s.sessions_per_s = static_cast<double>(s.done) / s.wall_s;
  }
}

Summary RunOne(const Options& o, int n, const std::string& work_dir, const std::string& certs, const std::string& model,
               ssl::context& tls) {
  Summary s;
  s.n = n;
  s.workers = o.max_inflight > 0 && o.soak_s == 0 ? std::min(n, o.max_inflight) : n;
  const auto setup_start = SteadyClock::now();
  const std::string dir = seedling::JoinPath(work_dir, StrCat("n", n));
  std::error_code fs_ec;
  std::filesystem::remove_all(dir, fs_ec);
  if (absl::Status st = seedling::MakeDirs(dir); !st.ok()) {
    s.failure = st.ToString();
    return s;
  }
  const std::string config_path = seedling::JoinPath(dir, "server.toml");
  const std::string port_file = seedling::JoinPath(dir, "ports.json");
  const std::string log_path = seedling::JoinPath(dir, "server.log");
  const std::string state_dir = seedling::JoinPath(dir, "state");
  if (absl::Status st = seedling::WriteFileAtomic(config_path, ServerToml(o, n, dir, certs, model)); !st.ok()) {
    s.failure = st.ToString();
    return s;
  }

  RunState run;
  run.tls = &tls;
  run.session_timeout = std::chrono::seconds(o.session_timeout_s);
  run.chunk_bytes = o.chunk_bytes;
  run.results.resize(n);
  {
    // Registered before the server starts, and the store is closed again: the server takes its
    // lock.
    if (absl::Status st = seedling::MakeDirs(state_dir); !st.ok()) {
      s.failure = st.ToString();
      return s;
    }
    absl::StatusOr<std::unique_ptr<server::Store>> store = server::Store::Open(state_dir);
    if (!store.ok()) {
      s.failure = StrCat("cannot open the store: ", store.status().ToString());
      return s;
    }
    seedling::SystemClock clock;
    for (int i = 0; i < n; ++i) {
      char id[32];
      std::snprintf(id, sizeof(id), "bench-%05d", i);
      absl::StatusOr<std::string> token = server::AddDevice(**store, id, clock.NowMs());
      if (!token.ok()) {
        s.failure = StrCat("cannot register ", id, ": ", token.status().ToString());
        return s;
      }
      run.device_ids.push_back(id);
      run.tokens.push_back(*std::move(token));
    }
  }

  absl::StatusOr<std::unique_ptr<ServerProcess>> spawned =
      ServerProcess::Spawn(o.seedling_binary, config_path, port_file, log_path);
  if (!spawned.ok()) {
    s.failure = spawned.status().ToString();
    return s;
  }
  ServerProcess& server = **spawned;
  uint16_t port = 0;
  const bool listening = WaitFor(server, std::chrono::seconds(60), [&] {
    absl::StatusOr<std::string> text = seedling::ReadFile(port_file);
    if (!text.ok()) return false;
    const nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("port") || !j["port"].is_number_unsigned()) return false;
    port = j["port"].get<uint16_t>();
    return port != 0;
  });
  // The round opens on the server's first tick after it listens; a device that came earlier would
  // be told "no open round", which is not what this benchmark measures.
  const bool round_open = listening && WaitFor(server, std::chrono::seconds(30), [&] {
                            absl::StatusOr<std::string> text = seedling::ReadFile(log_path);
                            return text.ok() && text->find("round 1 open:") != std::string::npos;
                          });
  if (!round_open) {
    s.failure = server.Running() ? "the server did not open round 1 within the wait (see its log)"
                                 : StrCat("the server ended during start-up: ", server.ExitDescription());
    ScanServerLog(log_path, s);
    return s;
  }
  s.setup_s = std::chrono::duration<double>(SteadyClock::now() - setup_start).count();
  run.endpoint = tcp::endpoint(asio::ip::make_address(kLoopback), port);
  s.server_rss_start = ProcStatusBytes(server.pid(), "VmRSS");
  const double server_cpu_start = ProcCpuSeconds(server.pid());
  const double client_cpu_start = SelfCpuSeconds();

  // All workers are spawned before any thread runs the io_context, so with max_inflight = 0 every
  // session's connect is issued in the first pass over the queue.
  asio::io_context ioc(o.client_threads);
  const auto run_start = SteadyClock::now();
  run.soak_end = run_start + std::chrono::seconds(o.soak_s);
  for (int w = 0; w < s.workers; ++w) {
    asio::co_spawn(asio::make_strand(ioc), o.soak_s > 0 ? SoakDevice(run, w) : Worker(run),
                   [&run](std::exception_ptr e) {
                     if (e) {
                       std::string what = "unknown exception";
                       try {
                         std::rethrow_exception(e);
                       } catch (const std::exception& ex) {
                         what = ex.what();
                       } catch (...) {
                       }
                       std::lock_guard<std::mutex> lock(run.mu);
                       run.worker_failures.push_back(what);
                     }
                     ++run.workers_done;
                   });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < o.client_threads; ++t) threads.emplace_back([&ioc] { ioc.run(); });
  // Sessions end by their own deadline; this outer bound only catches a benchmark bug.
  const auto hard_deadline = o.soak_s > 0 ? run.soak_end + std::chrono::seconds(o.session_timeout_s + 30)
                                          : SteadyClock::now() +
                                                std::chrono::seconds(o.session_timeout_s) * (1 + (n - 1) / s.workers) +
                                                std::chrono::seconds(30);
  bool server_died = false, hung = false;
  auto next_sample = run_start;
  while (run.workers_done.load() < s.workers) {
    if (o.soak_s > 0 && SteadyClock::now() >= next_sample) {
      s.rss_samples.emplace_back(std::chrono::duration<double>(SteadyClock::now() - run_start).count(),
                                 ProcStatusBytes(server.pid(), "VmRSS"));
      next_sample += std::chrono::seconds(o.soak_sample_s);
    }
    if (!server.Running()) {
      server_died = true;
      break;
    }
    if (SteadyClock::now() > hard_deadline) {
      hung = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Measured before stopping anything: the server's state right after the last session.
  s.server_rss_peak = ProcStatusBytes(server.pid(), "VmHWM");
  s.server_rss_end = ProcStatusBytes(server.pid(), "VmRSS");
  s.server_cpu_s = ProcCpuSeconds(server.pid()) - server_cpu_start;
  if (server_died || hung) ioc.stop();
  for (std::thread& t : threads) t.join();
  s.client_cpu_s = SelfCpuSeconds() - client_cpu_start;
  if (server_died) s.failure = StrCat("the server died during the run: ", server.ExitDescription());
  if (hung) s.failure = "sessions did not finish by their deadlines (benchmark bug)";
  {
    std::lock_guard<std::mutex> lock(run.mu);
    if (!run.worker_failures.empty() && s.failure.empty()) {
      s.failure = StrCat(run.worker_failures.size(), " client workers threw, first: ", run.worker_failures.front());
    }
  }
  if (s.failure.empty()) {
    if (absl::Status st = server.Stop(std::chrono::seconds(30)); !st.ok()) s.failure = st.ToString();
  }
  ScanServerLog(log_path, s);

  TallySessions(o.soak_s > 0 ? run.soak_results : run.results, s);
  s.peak_in_flight = run.peak_in_flight.load();

  // The server's own record of round 1, once it has stopped and released the store.
  if (!server.Running()) {
    absl::StatusOr<std::unique_ptr<server::Store>> store = server::Store::Open(state_dir);
    if (store.ok()) {
      absl::StatusOr<std::optional<server::RoundRecord>> round = (*store)->FindRound(1);
      if (round.ok() && round->has_value()) {
        s.round1_state = server::RoundStateName((*round)->state);
        s.round1_selected = (*round)->selected;
        s.round1_accepted = (*round)->accepted;
      }
      absl::StatusOr<std::vector<server::LedgerEntry>> ledger = (*store)->LedgerForRound(1);
      if (ledger.ok()) s.ledger_entries = static_cast<int64_t>(ledger->size());
      if (o.soak_s > 0) CountSoakRounds(**store, s);
    } else {
      s.round1_state = StrCat("store unreadable: ", store.status().ToString());
    }
    // Every acknowledged upload must be in the ledger (the reverse need not hold: an
    // acknowledgement can be lost to a client deadline after the server recorded the update).
    const int64_t ledger = o.soak_s > 0 ? s.soak_ledger_entries : s.ledger_entries;
    s.ledger_violation = ledger >= 0 && s.accepted > ledger;
  }
  return s;
}

// ---- output
// ---------------------------------------------------------------------------------------------

std::string Mib(int64_t bytes) {
  if (bytes < 0) return "?";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

void PrintTableHeader() {
  std::printf("%6s %8s %6s %6s %6s %6s %6s %6s %8s %8s %8s %8s %7s %7s %12s %12s\n", "N", "inflight", "done", "task",
              "retry", "accept", "reject", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms", "wall s", "sess/s",
              "srv RSS start", "srv RSS peak");
}

void PrintTableRow(const Summary& s) {
  std::printf("%6d %8d %6d %6d %6d %6d %6d %6d %8.1f %8.1f %8.1f %8.1f %7.2f %7.1f %12s %12s\n", s.n, s.peak_in_flight,
              s.done, s.got_task, s.retry_after, s.accepted, s.rejected, s.errors, s.p50_ms, s.p90_ms, s.p99_ms,
              s.max_ms, s.wall_s, s.sessions_per_s, Mib(s.server_rss_start).c_str(), Mib(s.server_rss_peak).c_str());
}

void PrintDetails(const Summary& s) {
  std::printf(
      "  N=%d: %d sessions allowed in flight, peak %d measured; setup (devices + server start) "
      "%.1f s\n",
      s.n, s.workers, s.peak_in_flight, s.setup_s);
  std::printf("  connect + TLS handshake: p50 %.1f ms, p99 %.1f ms; session mean %.1f ms\n", s.handshake_p50_ms,
              s.handshake_p99_ms, s.mean_ms);
  std::printf("  CPU during the run: server %.2f s, benchmark clients %.2f s (wall %.2f s)\n", s.server_cpu_s,
              s.client_cpu_s, s.wall_s);
  std::printf("  server RSS: start %s, end %s, peak (VmHWM) %s\n", Mib(s.server_rss_start).c_str(),
              Mib(s.server_rss_end).c_str(), Mib(s.server_rss_peak).c_str());
  for (const auto& [reason, count] : s.retry_reasons) std::printf("  retry_after \"%s\": %d\n", reason.c_str(), count);
  for (const auto& [code, count] : s.rejected_by_code) {
    std::printf("  rejected %s: %d (e.g. \"%s\")\n", code.c_str(), count, s.reject_examples.at(code).c_str());
  }
  for (const auto& [kind, count] : s.errors_by_kind) std::printf("  error %s: %d\n", kind.c_str(), count);
  if (s.not_run > 0) std::printf("  sessions unfinished when the run stopped (not counted): %d\n", s.not_run);
  std::printf("  server store: round 1 %s, selected %lld, accepted %lld, ledger entries %lld%s\n",
              s.round1_state.c_str(), static_cast<long long>(s.round1_selected),
              static_cast<long long>(s.round1_accepted), static_cast<long long>(s.ledger_entries),
              s.ledger_violation ? "  <-- FEWER THAN THE CLIENTS' ACKNOWLEDGED UPLOADS" : "");
  if (!s.rss_samples.empty()) {
    std::printf("  soak: %lld rounds committed, ledger entries of all rounds %lld; server RSS (s: MiB):",
                static_cast<long long>(s.rounds_committed), static_cast<long long>(s.soak_ledger_entries));
    for (const auto& [t, rss] : s.rss_samples) std::printf(" %.0f: %.0f", t, static_cast<double>(rss) / (1 << 20));
    std::printf("\n  soak: peak RSS of the last half vs the first (after warm-up): %+.1f%%\n",
                100.0 * SoakRssGrowth(s, static_cast<int>(s.rss_samples.back().first)));
  }
  std::printf("  server log: %d warnings, %d errors\n", s.log_warnings, s.log_errors);
  for (const std::string& line : s.log_samples) std::printf("    %s\n", line.c_str());
  if (!s.failure.empty()) std::printf("  FAILED: %s\n", s.failure.c_str());
  std::fflush(stdout);
}

nlohmann::json ToJson(const Summary& s, const Options& o) {
  return {
      {"n", s.n},
      {"cores", sysconf(_SC_NPROCESSORS_ONLN)},
      {"max_inflight", s.workers},
      {"peak_inflight", s.peak_in_flight},
      {"client_threads", o.client_threads},
      {"server_io_threads", o.server_io_threads},
      {"done", s.done},
      {"got_task", s.got_task},
      {"retry_after", s.retry_after},
      {"retry_reasons", s.retry_reasons},
      {"accepted", s.accepted},
      {"rejected", s.rejected},
      {"rejected_by_code", s.rejected_by_code},
      {"errors", s.errors},
      {"timeouts", s.timeouts},
      {"errors_by_kind", s.errors_by_kind},
      {"latency_ms", {{"p50", s.p50_ms}, {"p90", s.p90_ms}, {"p99", s.p99_ms}, {"max", s.max_ms}, {"mean", s.mean_ms}}},
      {"handshake_ms", {{"p50", s.handshake_p50_ms}, {"p99", s.handshake_p99_ms}}},
      {"wall_s", s.wall_s},
      {"sessions_per_s", s.sessions_per_s},
      {"server_rss_start_bytes", s.server_rss_start},
      {"server_rss_end_bytes", s.server_rss_end},
      {"server_rss_peak_bytes", s.server_rss_peak},
      {"server_cpu_s", s.server_cpu_s},
      {"client_cpu_s", s.client_cpu_s},
      {"num_parameters", s.num_parameters},
      {"update_bytes", s.update_bytes},
      {"round1",
       {{"state", s.round1_state},
        {"selected", s.round1_selected},
        {"accepted", s.round1_accepted},
        {"ledger_entries", s.ledger_entries}}},
      {"soak_seconds", o.soak_s},
      {"soak_rounds_committed", s.rounds_committed},
      {"soak_ledger_entries", s.soak_ledger_entries},
      {"soak_rss_samples", s.rss_samples},
      {"server_log_warnings", s.log_warnings},
      {"server_log_errors", s.log_errors},
      {"failure", s.failure}};
}

// ---- main
// -----------------------------------------------------------------------------------------------

// Raises the soft descriptor limit to the hard one (the server child inherits it). Returns the new
// limit.
rlim_t RaiseFileLimit(rlim_t* before) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return 0;
  *before = lim.rlim_cur;
  if (lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &lim) != 0) getrlimit(RLIMIT_NOFILE, &lim);
  }
  return lim.rlim_cur;
}

absl::Status PrepareWorkDir(const std::string& work_dir, std::string* certs, std::string* model) {
  *certs = seedling::JoinPath(work_dir, "certs");
  *model = seedling::JoinPath(work_dir, "model");
  comms::CertificateOptions cert_options;
  cert_options.dir = *certs;
  cert_options.server_names = {"localhost", kLoopback};
  cert_options.overwrite = true;
  SEEDLING_RETURN_IF_ERROR(comms::CreateCertificates(cert_options));
  seedling::model::InitModelOptions model_options;
  model_options.preset = "tiny";
  model_options.overwrite = true;
  SEEDLING_RETURN_IF_ERROR(seedling::model::InitModel(*model, model_options));
  return absl::OkStatus();
}

absl::Status ConfigureClientTls(ssl::context& tls, const std::string& ca_file) {
  if (SSL_CTX_set_min_proto_version(tls.native_handle(), TLS1_3_VERSION) != 1) {
    return absl::InternalError("cannot require TLS 1.3");
  }
  tls.set_options(ssl::context::default_workarounds | ssl::context::no_compression);
  // Every device is a different phone: a full handshake each, no client-side session cache.
  SSL_CTX_set_session_cache_mode(tls.native_handle(), SSL_SESS_CACHE_OFF);
  tls.set_verify_mode(ssl::verify_peer);
  error_code ec;
  tls.load_verify_file(ca_file, ec);
  if (ec) return absl::InvalidArgumentError(StrCat("cannot load the CA '", ca_file, "': ", ec.message()));
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  const Options o = ParseOptions(argc, argv);
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);

  rlim_t nofile_before = 0;
  const rlim_t nofile = RaiseFileLimit(&nofile_before);
  cpu_set_t affinity;
  CPU_ZERO(&affinity);
  const int usable_cores = sched_getaffinity(0, sizeof(affinity), &affinity) == 0 ? CPU_COUNT(&affinity) : -1;

  std::printf("command: %s\n", command.c_str());
  std::printf("machine: %ld online cores (%d usable by this process), %s\n", sysconf(_SC_NPROCESSORS_ONLN),
              usable_cores, CpuModel().c_str());
  std::printf(
      "limits: RLIMIT_NOFILE %llu (raised from %llu; the server inherits it), somaxconn %s, "
      "tcp_max_syn_backlog %s\n",
      static_cast<unsigned long long>(nofile), static_cast<unsigned long long>(nofile_before),
      ReadSysctl("/proc/sys/net/core/somaxconn").c_str(), ReadSysctl("/proc/sys/net/ipv4/tcp_max_syn_backlog").c_str());
  std::printf(
      "server: %s serve, io_threads %d, TLS 1.3 with an ECDSA P-256 certificate verified against "
      "the "
      "benchmark CA, lora-bp on the tiny preset, codec fp32, fresh state per N\n",
      o.seedling_binary.c_str(), o.server_io_threads);
  std::printf(
      "clients: one process, one io_context on %d threads, %s; a full TLS handshake per session; "
      "per-session deadline %d s; upload chunks of up to %lld bytes\n",
      o.client_threads,
      o.max_inflight > 0 ? StrCat("at most ", o.max_inflight, " sessions in flight").c_str()
                         : "all N sessions started at once",
      o.session_timeout_s, static_cast<long long>(o.chunk_bytes));
  std::printf(
      "latency: TCP connect to the session's last response, over sessions the server answered "
      "(nearest-rank percentiles)\n");
  for (int n : o.ns) {
    // Each side needs a descriptor per connection plus its own few dozen.
    if (static_cast<rlim_t>(n) + 128 > nofile) {
      std::printf(
          "WARNING: N=%d needs about %d descriptors per process; RLIMIT_NOFILE is %llu: expect "
          "connect "
          "or accept failures\n",
          n, n + 128, static_cast<unsigned long long>(nofile));
    }
  }
  std::fflush(stdout);

  std::string work_dir = o.work_dir;
  const bool temporary = work_dir.empty();
  if (temporary) {
    char tmpl[] = "/tmp/seedling-bench-concurrency-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      std::fprintf(stderr, "seedling_bench_concurrency: mkdtemp: %s\n", std::strerror(errno));
      return 1;
    }
    work_dir = tmpl;
  }
  if (absl::Status st = seedling::MakeDirs(work_dir); !st.ok()) {
    std::fprintf(stderr, "seedling_bench_concurrency: %s\n", st.ToString().c_str());
    return 1;
  }
  std::printf("work dir: %s\n", work_dir.c_str());
  std::fflush(stdout);
  std::string certs, model;
  if (absl::Status st = PrepareWorkDir(work_dir, &certs, &model); !st.ok()) {
    std::fprintf(stderr, "seedling_bench_concurrency: preparing %s: %s\n", work_dir.c_str(), st.ToString().c_str());
    return 1;
  }
  ssl::context tls(ssl::context::tls_client);
  if (absl::Status st = ConfigureClientTls(tls, seedling::JoinPath(certs, "ca.crt")); !st.ok()) {
    std::fprintf(stderr, "seedling_bench_concurrency: %s\n", st.ToString().c_str());
    return 1;
  }

  std::vector<Summary> summaries;
  bool failed = false;
  for (int n : o.ns) {
    std::fprintf(stderr, "N=%d: registering devices, starting the server, running %d sessions...\n", n, n);
    Summary s = RunOne(o, n, work_dir, certs, model, tls);
    PrintDetails(s);
    summaries.push_back(s);
    if (!s.failure.empty() || s.ledger_violation) {
      failed = true;
      break;  // a dead or misbehaving server makes later figures meaningless
    }
  }

  if (!summaries.empty() && summaries.front().num_parameters > 0) {
    std::printf(
        "\nupdate: %llu parameters, %llu bytes encoded (fp32), one session = Hello, CheckIn, "
        "UploadBegin, "
        "%llu UploadChunk, UploadCommit\n",
        static_cast<unsigned long long>(summaries.front().num_parameters),
        static_cast<unsigned long long>(summaries.front().update_bytes),
        static_cast<unsigned long long>((summaries.front().update_bytes + o.chunk_bytes - 1) / o.chunk_bytes));
  }
  std::printf("\n");
  PrintTableHeader();
  for (const Summary& s : summaries) PrintTableRow(s);
  if (o.json) {
    for (const Summary& s : summaries) std::printf("%s\n", ToJson(s, o).dump().c_str());
  }
  std::fflush(stdout);
  if (temporary && !o.keep_work_dir && !failed) {
    std::error_code ec;
    std::filesystem::remove_all(work_dir, ec);
  } else {
    std::printf("kept %s (server logs in n<N>/server.log)\n", work_dir.c_str());
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
