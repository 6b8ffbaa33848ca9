#include "simulator/mpi.h"

// C API only: OpenMPI's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <sched.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <vector>

#include "base/bytes.h"
#include "base/strings.h"

namespace seedling::simulator {
namespace {

constexpr int kTag = 7;
// How long the progress thread sleeps when there was nothing to do: from kMinIdlePoll right after a
// message (the answer to a request usually follows within a few hundred microseconds), doubling while
// nothing comes, up to kMaxIdlePoll, short against a training step (tens of ms). Each poll costs a timed
// wait and an MPI_Iprobe, and each wake-up preempts the rank's training on a busy core. Measured with
// 2 ranks on 2 cores (bench/simulate_bench.sh's MPI case, 4 rounds): a 0.2 ms cap gave 1.55x over one
// rank, 1 ms 1.69x, 2-3 ms 1.74-1.75x, 8 ms 1.69x (the answers wait too long). Spinning for a few ms
// after each message was no faster either.
constexpr auto kMinIdlePoll = std::chrono::microseconds(50);
constexpr auto kMaxIdlePoll = std::chrono::microseconds(2000);

int EnvInt(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? 0 : std::atoi(v);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MpiRanks>> MpiRanks::FromEnvironment() {
  const int launched = std::max(EnvInt("OMPI_COMM_WORLD_SIZE"), EnvInt("PMI_SIZE"));
  if (launched <= 1) return std::unique_ptr<MpiRanks>();
  int provided = 0;
  if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
    return absl::InternalError("MPI_Init_thread failed");
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    return absl::InternalError(
        StrCat("the MPI library gives thread level ", provided, "; the simulator needs MPI_THREAD_SERIALIZED"));
  }
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // OpenMPI binds each rank to one core by default (for 2 ranks or fewer): then the hub, the progress
  // thread and the training share that core, which costs about 15% here. Say so; `--bind-to none` (or a
  // binding with more cores per rank) avoids it.
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) == 1 &&
      std::thread::hardware_concurrency() > 1) {
    std::fprintf(stderr,
                 "rank %d: bound to one CPU by the launcher; `mpirun --bind-to none` lets its threads use the others\n",
                 rank);
  }
  return std::unique_ptr<MpiRanks>(new MpiRanks(rank, size));
}

MpiRanks::MpiRanks(int rank, int size) : rank_(rank), size_(size) {
  progress_ = std::thread(&MpiRanks::Progress, this);
}

MpiRanks::~MpiRanks() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  progress_cv_.notify_all();
  mailbox_cv_.notify_all();
  progress_.join();
  MPI_Finalize();
}

void MpiRanks::Send(int dest, uint64_t key, std::string payload) {
  std::string framed;
  framed.reserve(8 + payload.size());
  AppendU64Le(framed, key);
  framed += payload;
  {
    std::lock_guard<std::mutex> lock(mu_);
    outgoing_.emplace_back(dest, std::move(framed));
  }
  progress_cv_.notify_one();
}

absl::StatusOr<MpiRanks::Message> MpiRanks::Receive(uint64_t key, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  std::deque<Message>& box = mailboxes_[key];
  if (!mailbox_cv_.wait_for(lock, timeout, [&] { return !box.empty() || stopping_; })) {
    return absl::DeadlineExceededError(StrCat("no message from another rank within ", timeout.count(), " ms"));
  }
  if (box.empty()) return absl::UnavailableError("the MPI ranks are shutting down");
  Message m = std::move(box.front());
  box.pop_front();
  return m;
}

void MpiRanks::Abort(const std::string& why) {
  std::fprintf(stderr, "rank %d: %s; aborting every rank\n", rank_, why.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();
}

// The only thread that calls MPI between init and finalize: posts sends, completes them, receives.
void MpiRanks::Progress() {
  struct Pending {
    MPI_Request request;
    std::string bytes;  // must outlive the send
  };
  std::list<Pending> pending;
  std::vector<char> buffer;
  auto idle_poll = kMinIdlePoll;
  while (true) {
    std::deque<std::pair<int, std::string>> batch;
    bool stopping = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch.swap(outgoing_);
      stopping = stopping_;
    }
    bool busy = !batch.empty();
    for (auto& [dest, bytes] : batch) {
      pending.push_back({MPI_REQUEST_NULL, std::move(bytes)});
      Pending& p = pending.back();
      MPI_Isend(p.bytes.data(), static_cast<int>(p.bytes.size()), MPI_BYTE, dest, kTag, MPI_COMM_WORLD, &p.request);
    }
    for (auto it = pending.begin(); it != pending.end();) {
      int done = 0;
      MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
      it = done ? pending.erase(it) : std::next(it);
    }
    int arrived = 0;
    MPI_Status status;
    MPI_Iprobe(MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, &arrived, &status);
    if (arrived) {
      busy = true;
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      buffer.resize(static_cast<size_t>(count));
      MPI_Recv(buffer.data(), count, MPI_BYTE, status.MPI_SOURCE, kTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      if (count >= 8) {
        Message m{status.MPI_SOURCE, std::string(buffer.data() + 8, buffer.size() - 8)};
        {
          std::lock_guard<std::mutex> lock(mu_);
          mailboxes_[LoadU64Le(std::string_view(buffer.data(), buffer.size()))].push_back(std::move(m));
        }
        mailbox_cv_.notify_all();
      }
    }
    if (stopping && pending.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      if (outgoing_.empty()) return;
      continue;
    }
    if (busy) {
      idle_poll = kMinIdlePoll;
    } else {
      std::unique_lock<std::mutex> lock(mu_);
      progress_cv_.wait_for(lock, idle_poll, [&] { return !outgoing_.empty() || stopping_; });
      idle_poll = std::min<std::chrono::microseconds>(idle_poll * 2, kMaxIdlePoll);
    }
  }
}

}  // namespace seedling::simulator
