#pragma once

// Scale-out over MPI ranks (docs/architecture.md, "The simulator"): `mpirun -np R seedling simulate ...`.
//
// Rank 0 runs the hub: the coordinator, the simulated clock and the event loop that grants every device
// request in simulated-time order. Each activation runs on the least busy rank when every rank sees rank 0's
// work directory (mpi_placement "auto"), else device d lives on rank d % R ("static"); a device on another
// rank runs the real client there, and its connection is forwarded: each request
// travels to rank 0 as bytes, waits at the same gate as a local device's, and its reply travels back. So
// the coordinator sees the same sequence of requests for any number of ranks, and the per-round metrics
// are identical to a one-rank run with the same seed; ranks add training throughput.
//
// MPI is called from one thread per process (a progress thread started here), so the MPI library only
// needs MPI_THREAD_SERIALIZED. Messages are addressed to a mailbox key (a device number, or kControlKey);
// each mailbox is a FIFO, and MPI keeps the order of messages between two ranks.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace seedling::simulator {

class MpiRanks {
 public:
  static constexpr uint64_t kControlKey = ~uint64_t{0};

  struct Message {
    int source = 0;
    std::string payload;
  };

  // Initializes MPI when this process was started by an MPI launcher with more than one rank (OpenMPI's
  // OMPI_COMM_WORLD_SIZE, or PMI_SIZE) and returns the ranks; returns nullptr for a plain process (no MPI
  // call is made). Once per process: MPI cannot be initialized twice. Internal error if MPI fails or
  // cannot give MPI_THREAD_SERIALIZED.
  static absl::StatusOr<std::unique_ptr<MpiRanks>> FromEnvironment();

  // Stops the progress thread after every queued message has been sent, then MPI_Finalize.
  ~MpiRanks();
  MpiRanks(const MpiRanks&) = delete;
  MpiRanks& operator=(const MpiRanks&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  // Queues `payload` for mailbox `key` on rank `dest` and returns at once. Thread-safe.
  void Send(int dest, uint64_t key, std::string payload);

  // Waits for the next message in mailbox `key`. DeadlineExceeded after `timeout`; Unavailable once the
  // ranks are shutting down. Thread-safe; one waiter per key at a time.
  absl::StatusOr<Message> Receive(uint64_t key, std::chrono::milliseconds timeout);

  // Ends every rank of the job at once (MPI_Abort) after printing `why`: for an error on a rank that the
  // others would otherwise wait for forever.
  [[noreturn]] void Abort(const std::string& why);

 private:
  MpiRanks(int rank, int size);
  void Progress();

  const int rank_;
  const int size_;

  std::mutex mu_;
  std::condition_variable progress_cv_;  // the progress thread waits for outgoing messages (or polls)
  std::condition_variable mailbox_cv_;   // receivers wait for their mailbox
  // Guarded by mu_.
  std::deque<std::pair<int, std::string>> outgoing_;  // (dest, key + payload)
  std::map<uint64_t, std::deque<Message>> mailboxes_;
  bool stopping_ = false;

  std::thread progress_;
};

}  // namespace seedling::simulator
