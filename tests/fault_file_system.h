#pragma once

// A FileSystem (base/file.h) for fault-injection tests: the real file system, except for the calls a test
// arms to fail.

#include <cerrno>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "base/file.h"

namespace seedling::testing {

// Forwards to FileSystem::Default(); a call armed with FailNext fails instead, as the operating system would
// fail it (EIO, or the errno given), without touching the disk. Thread-safe.
class FaultFileSystem : public FileSystem {
 public:
  enum class Op { kWrite, kSync, kRename, kSyncDirectory };

  // The next `times` calls of `op` whose path contains `path_part` fail with `err`.
  void FailNext(Op op, std::string path_part, int times = 1, int err = EIO) {
    std::lock_guard<std::mutex> lock(mu_);
    armed_.push_back({op, std::move(path_part), times, err});
  }
  // How many calls failed so far.
  int injected() const {
    std::lock_guard<std::mutex> lock(mu_);
    return injected_;
  }

  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path, mode_t mode) override {
    absl::StatusOr<std::unique_ptr<WritableFile>> file = FileSystem::Default()->NewWritableFile(path, mode);
    if (!file.ok()) return file;
    return std::unique_ptr<WritableFile>(new File(this, path, std::move(file).value()));
  }
  absl::Status Rename(const std::string& from, const std::string& to) override {
    if (absl::Status st = Check(Op::kRename, to, "cannot rename to"); !st.ok()) return st;
    return FileSystem::Default()->Rename(from, to);
  }
  absl::Status Remove(const std::string& path) override { return FileSystem::Default()->Remove(path); }
  absl::Status SyncDirectory(const std::string& dir) override {
    if (absl::Status st = Check(Op::kSyncDirectory, dir, "cannot fsync directory"); !st.ok()) return st;
    return FileSystem::Default()->SyncDirectory(dir);
  }

 private:
  struct Fault {
    Op op;
    std::string path_part;
    int times;
    int err;
  };

  class File : public WritableFile {
   public:
    File(FaultFileSystem* fs, std::string path, std::unique_ptr<WritableFile> real)
        : fs_(fs), path_(std::move(path)), real_(std::move(real)) {}
    absl::Status Append(std::string_view data) override {
      if (absl::Status st = fs_->Check(Op::kWrite, path_, "cannot write"); !st.ok()) return st;
      return real_->Append(data);
    }
    absl::Status WriteAt(uint64_t offset, std::string_view data) override {
      if (absl::Status st = fs_->Check(Op::kWrite, path_, "cannot write"); !st.ok()) return st;
      return real_->WriteAt(offset, data);
    }
    absl::Status Sync() override {
      if (absl::Status st = fs_->Check(Op::kSync, path_, "cannot fsync"); !st.ok()) return st;
      return real_->Sync();
    }
    absl::Status Close() override { return real_->Close(); }

   private:
    FaultFileSystem* const fs_;
    const std::string path_;
    const std::unique_ptr<WritableFile> real_;
  };

  // The error of an armed fault matching (op, path), consuming it; OK if none matches.
  absl::Status Check(Op op, const std::string& path, const char* what) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Fault& f : armed_) {
      if (f.op == op && f.times > 0 && path.find(f.path_part) != std::string::npos) {
        --f.times;
        ++injected_;
        return ErrnoStatus(f.err, what, path);
      }
    }
    return absl::OkStatus();
  }

  mutable std::mutex mu_;
  std::vector<Fault> armed_;  // guarded by mu_
  int injected_ = 0;          // guarded by mu_
};

}  // namespace seedling::testing
