#pragma once

// File utilities: whole-file reads, crash-safe atomic writes, and read-only memory maps.

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace seedling {

// The canonical Status for a failed system call on `path` (errno `err`): NotFound (ENOENT, ENOTDIR),
// PermissionDenied (EACCES, EPERM, EROFS), ResourceExhausted (ENOSPC, EDQUOT), else Internal; the message is
// "<what> '<path>': <strerror>".
absl::Status ErrnoStatus(int err, std::string_view what, std::string_view path);

// Reads the whole file. NotFound if it does not exist, PermissionDenied / Internal on other I/O errors.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// One line of a line-oriented file (JSONL), without its '\n'.
struct Line {
  int64_t number = 0;     // 1-based
  std::string_view text;  // empty when too_long; valid only during the callback
  int64_t bytes = 0;      // the line's full length
  bool too_long = false;  // longer than the reader's max_line_bytes: its text was not kept
};
using LineFn = std::function<absl::Status(const Line&)>;

// Calls `fn` for each line of `path` in order ('\n'-separated; a last line without one counts), holding at
// most `max_line_bytes` of a line in memory, whatever the file's size or its longest line. Stops at the
// first error `fn` returns. Errors as ReadFile's.
absl::Status ForEachLine(const std::string& path, int64_t max_line_bytes, const LineFn& fn);
// The same over text already in memory.
absl::Status ForEachLineIn(std::string_view text, int64_t max_line_bytes, const LineFn& fn);

// ---- the file-system seam

// A file being written, from FileSystem::NewWritableFile. Destroying it closes the file without syncing it.
// Not thread-safe.
class WritableFile {
 public:
  virtual ~WritableFile() = default;
  virtual absl::Status Append(std::string_view data) = 0;
  // Overwrites [offset, offset + data.size()), bytes that were already appended.
  virtual absl::Status WriteAt(uint64_t offset, std::string_view data) = 0;
  // Flushes the file's data and metadata to the disk (fsync).
  virtual absl::Status Sync() = 0;
  virtual absl::Status Close() = 0;
};

// The calls behind the crash-safe writes below and the server's checkpoint files, behind an interface (as
// LevelDB's Env) so a test can make a chosen write, fsync or rename fail. Errors are those of ErrnoStatus,
// naming the path. Implementations are thread-safe.
class FileSystem {
 public:
  virtual ~FileSystem() = default;
  // The operating system's file system (POSIX calls). Stateless, so one instance serves the whole process.
  static FileSystem* Default();

  // Creates `path` afresh (a leftover file there is removed first) with permission bits `mode` from its
  // creation on, open for writing.
  virtual absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path, mode_t mode) = 0;
  // rename(2): replaces `to` atomically.
  virtual absl::Status Rename(const std::string& from, const std::string& to) = 0;
  // Removes a file; NotFound if there is none.
  virtual absl::Status Remove(const std::string& path) = 0;
  // fsyncs a directory, so that a rename, creation or unlink in it survives a power loss.
  virtual absl::Status SyncDirectory(const std::string& dir) = 0;
};

// Writes `data` to `path` so that after a crash the file holds either its old or its new contents, never a
// mix: write to `path.tmp.<pid>` in the same directory, fsync it, rename over `path`, fsync the directory.
// `mode` is the file's permission bits, which the temporary file has from its creation on (0600 for a
// secret: it is never readable by others, not even before the rename). `fs` null means FileSystem::Default().
absl::Status WriteFileAtomic(const std::string& path, std::string_view data, mode_t mode = 0644,
                             FileSystem* fs = nullptr);

// fsyncs a directory of the default file system (FileSystem::SyncDirectory).
absl::Status FsyncDirectory(const std::string& dir);

// The 64-character hex SHA-256 of a file's contents, streamed (the file is never held whole).
absl::StatusOr<std::string> FileSha256Hex(const std::string& path);

// Streams a large file to disk with the same crash guarantee as WriteFileAtomic: bytes go to a temporary file
// next to `path`; Commit() fsyncs, renames and fsyncs the directory. Any failed step removes the temporary
// file and leaves `path` as it was (a failed directory fsync after the rename leaves the new file in place,
// maybe not durable). Destroying an uncommitted writer removes the temporary file and leaves `path`
// untouched. `fs` (null: FileSystem::Default()) must outlive the writer. Not thread-safe.
class AtomicFileWriter {
 public:
  static absl::StatusOr<std::unique_ptr<AtomicFileWriter>> Create(const std::string& path, mode_t mode = 0644,
                                                                  FileSystem* fs = nullptr);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  absl::Status Append(std::string_view data);
  // Overwrites bytes already appended, at [offset, offset + data.size()) (e.g. a digest in a header that
  // was written with a placeholder before the data it covers). InvalidArgument past what was written.
  absl::Status WriteAt(uint64_t offset, std::string_view data);
  absl::Status Commit();
  uint64_t bytes_written() const { return bytes_written_; }

 private:
  AtomicFileWriter(FileSystem* fs, std::string path, std::string tmp_path, std::unique_ptr<WritableFile> file)
      : fs_(fs), path_(std::move(path)), tmp_path_(std::move(tmp_path)), file_(std::move(file)) {}
  // Closes and removes the temporary file after a failed step; returns `error`.
  absl::Status Fail(absl::Status error);

  FileSystem* const fs_;
  const std::string path_;
  const std::string tmp_path_;
  std::unique_ptr<WritableFile> file_;  // null once committed or failed
  uint64_t bytes_written_ = 0;
};

// Creates `dir` and its parents if missing. OK when it already exists as a directory.
absl::Status MakeDirs(const std::string& dir);

bool FileExists(const std::string& path);

// A memory-mapped file. Pages come from the page cache, so many readers of one file (e.g. simulated clients
// sharing a base model) share one physical copy. Not copyable; thread-safe for concurrent reads.
class MappedFile {
 public:
  enum class Mode {
    kReadOnly,     // PROT_READ: writing through data() is a crash.
    kCopyOnWrite,  // MAP_PRIVATE + PROT_WRITE: writes go to private pages, the file never changes.
  };

  // Maps the whole file. NotFound / PermissionDenied / Internal with the path in the message.
  static absl::StatusOr<std::shared_ptr<MappedFile>> Open(const std::string& path, Mode mode = Mode::kReadOnly);
  // Holds `bytes` already in memory (a download, a buffer an app hands over) behind the same interface, so
  // the file parsers read it without a round trip through the file system. `name` stands in for the path
  // in messages. kReadOnly; Release does nothing.
  static std::shared_ptr<MappedFile> FromBytes(std::string name, std::string bytes);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint8_t* mutable_data() const { return data_; }  // only valid in kCopyOnWrite mode
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  Mode mode() const { return mode_; }

  // Drops the resident pages wholly inside [p, p + n) (madvise MADV_DONTNEED), e.g. after a tensor was
  // copied out in another dtype, so they stop counting in RSS; reading them again faults them back in
  // from the file. Pages written in kCopyOnWrite mode would lose the writes: only release unwritten data.
  void Release(const uint8_t* p, size_t n) const;

 private:
  MappedFile(std::string path, uint8_t* data, size_t size, Mode mode)
      : path_(std::move(path)), data_(data), size_(size), mode_(mode), mapped_(true) {}
  MappedFile(std::string name, std::string bytes)
      : path_(std::move(name)),
        owned_(std::move(bytes)),
        data_(reinterpret_cast<uint8_t*>(owned_.data())),
        size_(owned_.size()),
        mode_(Mode::kReadOnly),
        mapped_(false) {}

  // Constant after construction.
  const std::string path_;
  std::string owned_;  // FromBytes: the bytes data_ points into
  uint8_t* const data_;
  const size_t size_;
  const Mode mode_;
  const bool mapped_;  // data_ is an mmap of the file (else it points into owned_)
};

// Joins two path components with exactly one '/'.
std::string JoinPath(std::string_view a, std::string_view b);

}  // namespace seedling
