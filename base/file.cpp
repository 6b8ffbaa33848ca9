#include "base/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling {

absl::Status ErrnoStatus(int err, std::string_view what, std::string_view path) {
  std::string msg = StrCat(what, " '", path, "': ", std::strerror(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

namespace {

// Closes a file descriptor on scope exit.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

absl::Status WriteAll(int fd, std::string_view data, const std::string& path) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot write", path);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Opens `path` for reading into `closer` and returns its size; a directory is InvalidArgument.
absl::StatusOr<size_t> OpenForReading(const std::string& path, FdCloser& closer) {
  closer.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (closer.fd < 0) return ErrnoStatus(errno, "cannot open", path);
  struct stat st;
  if (::fstat(closer.fd, &st) != 0) return ErrnoStatus(errno, "cannot stat", path);
  if (S_ISDIR(st.st_mode)) return absl::InvalidArgumentError(StrCat("'", path, "' is a directory"));
  return static_cast<size_t>(st.st_size);
}

}  // namespace

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  FdCloser closer{-1};
  SEEDLING_ASSIGN_OR_RETURN(const size_t size, OpenForReading(path, closer));
  const int fd = closer.fd;
  std::string out;
  out.resize(size);
  size_t got = 0;
  while (true) {
    if (got == out.size()) out.resize(out.size() * 2 + 4096);  // file grew or is a pipe
    ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot read", path);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

absl::Status ForEachLine(const std::string& path, int64_t max_line_bytes, const LineFn& fn) {
  FdCloser closer{-1};
  SEEDLING_RETURN_IF_ERROR(OpenForReading(path, closer).status());
  const int fd = closer.fd;
  const auto cap = static_cast<size_t>(std::max<int64_t>(max_line_bytes, 0));
  std::string buffer(64 << 10, '\0');
  std::string current;  // the line so far, up to `cap` bytes
  Line line;
  line.number = 1;
  bool pending = false;  // bytes of an unfinished line were read
  auto emit = [&]() -> absl::Status {
    line.text = line.too_long ? std::string_view() : std::string_view(current);
    SEEDLING_RETURN_IF_ERROR(fn(line));
    current.clear();
    const int64_t next = line.number + 1;
    line = Line();
    line.number = next;
    pending = false;
    return absl::OkStatus();
  };
  while (true) {
    ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "cannot read", path);
    }
    if (n == 0) break;
    std::string_view chunk(buffer.data(), static_cast<size_t>(n));
    while (!chunk.empty()) {
      const size_t newline = chunk.find('\n');
      const std::string_view part = chunk.substr(0, newline);
      line.bytes += static_cast<int64_t>(part.size());
      pending = true;
      if (!line.too_long && current.size() + part.size() > cap) {
        line.too_long = true;
        std::string().swap(current);  // give the memory back at once
      }
      if (!line.too_long) current.append(part);
      if (newline == std::string_view::npos) break;
      SEEDLING_RETURN_IF_ERROR(emit());
      chunk.remove_prefix(newline + 1);
    }
  }
  if (pending) SEEDLING_RETURN_IF_ERROR(emit());
  return absl::OkStatus();
}

absl::Status ForEachLineIn(std::string_view text, int64_t max_line_bytes, const LineFn& fn) {
  int64_t number = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    Line line;
    line.number = ++number;
    line.bytes = static_cast<int64_t>(end - pos);
    line.too_long = line.bytes > max_line_bytes;
    if (!line.too_long) line.text = text.substr(pos, end - pos);
    SEEDLING_RETURN_IF_ERROR(fn(line));
    pos = end + 1;
  }
  return absl::OkStatus();
}

namespace {

// The POSIX file behind PosixFileSystem::NewWritableFile.
class PosixWritableFile : public WritableFile {
 public:
  PosixWritableFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~PosixWritableFile() override {
    if (fd_ >= 0) ::close(fd_);
  }

  absl::Status Append(std::string_view data) override { return WriteAll(fd_, data, path_); }

  absl::Status WriteAt(uint64_t offset, std::string_view data) override {
    size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return ErrnoStatus(errno, "cannot write", path_);
      done += static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }

  absl::Status Sync() override {
    if (::fsync(fd_) != 0) return ErrnoStatus(errno, "cannot fsync", path_);
    return absl::OkStatus();
  }

  absl::Status Close() override {
    const int fd = std::exchange(fd_, -1);
    if (fd >= 0 && ::close(fd) != 0) return ErrnoStatus(errno, "cannot close", path_);
    return absl::OkStatus();
  }

 private:
  const std::string path_;
  int fd_;
};

class PosixFileSystem : public FileSystem {
 public:
  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path, mode_t mode) override {
    // A fresh file (never a leftover one reopened), so it has `mode` from the start.
    ::unlink(path.c_str());
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) return ErrnoStatus(errno, "cannot create", path);
    return std::make_unique<PosixWritableFile>(path, fd);
  }

  absl::Status Rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) return ErrnoStatus(errno, "cannot rename to", to);
    return absl::OkStatus();
  }

  absl::Status Remove(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) return ErrnoStatus(errno, "cannot delete", path);
    return absl::OkStatus();
  }

  absl::Status SyncDirectory(const std::string& dir) override {
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return ErrnoStatus(errno, "cannot open directory", dir);
    FdCloser dcloser{dfd};
    if (::fsync(dfd) != 0) return ErrnoStatus(errno, "cannot fsync directory", dir);
    return absl::OkStatus();
  }
};

}  // namespace

FileSystem* FileSystem::Default() {
  static PosixFileSystem* const fs = new PosixFileSystem();  // never destroyed: usable during exit
  return fs;
}

absl::Status WriteFileAtomic(const std::string& path, std::string_view data, mode_t mode, FileSystem* fs) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> writer, AtomicFileWriter::Create(path, mode, fs));
  SEEDLING_RETURN_IF_ERROR(writer->Append(data));
  return writer->Commit();
}

absl::StatusOr<std::unique_ptr<AtomicFileWriter>> AtomicFileWriter::Create(const std::string& path, mode_t mode,
                                                                           FileSystem* fs) {
  if (fs == nullptr) fs = FileSystem::Default();
  std::string tmp = StrCat(path, ".tmp.", ::getpid());
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, fs->NewWritableFile(tmp, mode));
  return std::unique_ptr<AtomicFileWriter>(new AtomicFileWriter(fs, path, std::move(tmp), std::move(file)));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (file_ != nullptr) (void)Fail(absl::OkStatus());
}

absl::Status AtomicFileWriter::Fail(absl::Status error) {
  file_.reset();
  (void)fs_->Remove(tmp_path_);  // best effort: RecoverAfterCrash-style cleanups remove leftovers
  return error;
}

absl::Status AtomicFileWriter::Append(std::string_view data) {
  if (file_ == nullptr) return absl::FailedPreconditionError(StrCat("writer for '", path_, "' is closed"));
  if (absl::Status st = file_->Append(data); !st.ok()) return Fail(std::move(st));
  bytes_written_ += data.size();
  return absl::OkStatus();
}

absl::Status AtomicFileWriter::WriteAt(uint64_t offset, std::string_view data) {
  if (file_ == nullptr) return absl::FailedPreconditionError(StrCat("writer for '", path_, "' is closed"));
  if (offset > bytes_written_ || data.size() > bytes_written_ - offset) {
    return absl::InvalidArgumentError(StrCat("cannot overwrite [", offset, ", ", offset + data.size(), ") of '",
                                             tmp_path_, "': only ", bytes_written_, " bytes were written"));
  }
  if (absl::Status st = file_->WriteAt(offset, data); !st.ok()) return Fail(std::move(st));
  return absl::OkStatus();
}

absl::Status AtomicFileWriter::Commit() {
  if (file_ == nullptr) return absl::FailedPreconditionError(StrCat("writer for '", path_, "' is closed"));
  absl::Status st = file_->Sync();
  if (absl::Status closed = file_->Close(); st.ok()) st = std::move(closed);
  if (st.ok()) st = fs_->Rename(tmp_path_, path_);
  if (!st.ok()) return Fail(std::move(st));
  file_.reset();
  std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  return fs_->SyncDirectory(dir.empty() ? "." : dir.string());
}

absl::Status FsyncDirectory(const std::string& dir) { return FileSystem::Default()->SyncDirectory(dir); }

absl::StatusOr<std::string> FileSha256Hex(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "cannot open", path);
  FdCloser closer{fd};
  Sha256Hasher sha;
  std::string buf(size_t{1} << 20, '\0');
  while (true) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus(errno, "cannot read", path);
    if (n == 0) break;
    sha.Update(buf.data(), static_cast<size_t>(n));
  }
  return HexOf(sha.Finish());
}

absl::Status MakeDirs(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return ErrnoStatus(ec.value(), "cannot create directory", dir);
  if (!std::filesystem::is_directory(dir)) {
    return absl::FailedPreconditionError(StrCat("'", dir, "' exists and is not a directory"));
  }
  return absl::OkStatus();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

absl::StatusOr<std::shared_ptr<MappedFile>> MappedFile::Open(const std::string& path, Mode mode) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "cannot open", path);
  FdCloser closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoStatus(errno, "cannot stat", path);
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(StrCat("'", path, "' is not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  uint8_t* data = nullptr;
  if (size > 0) {
    const int prot = mode == Mode::kReadOnly ? PROT_READ : (PROT_READ | PROT_WRITE);
    void* p = ::mmap(nullptr, size, prot, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return ErrnoStatus(errno, "cannot mmap", path);
    data = static_cast<uint8_t*>(p);
  }
  return std::shared_ptr<MappedFile>(new MappedFile(path, data, size, mode));
}

std::shared_ptr<MappedFile> MappedFile::FromBytes(std::string name, std::string bytes) {
  return std::shared_ptr<MappedFile>(new MappedFile(std::move(name), std::move(bytes)));
}

void MappedFile::Release(const uint8_t* p, size_t n) const {
  if (!mapped_ || data_ == nullptr || p < data_ || p + n > data_ + size_) return;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (mapped_ && data_ != nullptr) ::munmap(data_, size_);
}

std::string JoinPath(std::string_view a, std::string_view b) {
  if (a.empty()) return std::string(b);
  if (b.empty()) return std::string(a);
  if (a.back() == '/' && b.front() == '/') return StrCat(a, b.substr(1));
  if (a.back() == '/' || b.front() == '/') return StrCat(a, b);
  return StrCat(a, "/", b);
}

}  // namespace seedling
