#include "base/file.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "base/memory.h"
#include "base/sha256.h"
#include "tests/fault_file_system.h"

namespace seedling {
namespace {

std::string TempDir() {
  std::string dir = std::filesystem::temp_directory_path() / ("seedling_file_test_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  return dir;
}

TEST_CASE("WriteFileAtomic replaces the contents and leaves no temporary file", "[base][file]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "a.txt");
  REQUIRE(WriteFileAtomic(path, "first").ok());
  REQUIRE(WriteFileAtomic(path, "second").ok());
  auto got = ReadFile(path);
  REQUIRE(got.ok());
  CHECK(*got == "second");
  int entries = 0;
  for (auto& e : std::filesystem::directory_iterator(dir)) {
    (void)e;
    ++entries;
  }
  CHECK(entries == 1);
  std::filesystem::remove_all(dir);
}

TEST_CASE("WriteFileAtomic gives the file its mode from creation on, even over a stale temporary", "[base][file]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "key.pem");
  // A temporary left by a crashed writer with wider permissions must not be reused.
  const std::string stale = path + ".tmp." + std::to_string(getpid());
  REQUIRE(WriteFileAtomic(stale, "leftover").ok());
  std::filesystem::permissions(stale, std::filesystem::perms(0644));
  REQUIRE(WriteFileAtomic(path, "secret", 0600).ok());
  CHECK((std::filesystem::status(path).permissions() & std::filesystem::perms::all) == std::filesystem::perms(0600));
  CHECK(*ReadFile(path) == "secret");
  CHECK_FALSE(std::filesystem::exists(stale));
  CHECK(FsyncDirectory(dir).ok());
  CHECK(FsyncDirectory(JoinPath(dir, "missing")).code() == absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

TEST_CASE("FileSha256Hex streams a file larger than its buffer and matches Sha256Hex", "[base][file]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "big.bin");
  std::string data(3 * (size_t{1} << 20) + 17, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 131 + (i >> 12));
  REQUIRE(WriteFileAtomic(path, data).ok());
  auto hex = FileSha256Hex(path);
  REQUIRE(hex.ok());
  CHECK(*hex == Sha256Hex(data));
  CHECK(FileSha256Hex(JoinPath(dir, "missing")).status().code() == absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

TEST_CASE("An uncommitted AtomicFileWriter leaves the old file untouched", "[base][file]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "b.bin");
  REQUIRE(WriteFileAtomic(path, "old").ok());
  {
    auto w = AtomicFileWriter::Create(path);
    REQUIRE(w.ok());
    REQUIRE((*w)->Append("new contents").ok());
  }  // destroyed without Commit
  CHECK(*ReadFile(path) == "old");
  std::filesystem::remove_all(dir);
}

TEST_CASE("A failed write, fsync or rename leaves the old file and no temporary file", "[base][file]") {
  using Op = testing::FaultFileSystem::Op;
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "faulty.bin");
  REQUIRE(WriteFileAtomic(path, "old").ok());
  for (Op op : {Op::kWrite, Op::kSync, Op::kRename}) {
    testing::FaultFileSystem fs;
    fs.FailNext(op, "faulty.bin", 1, op == Op::kWrite ? ENOSPC : EIO);
    const absl::Status st = WriteFileAtomic(path, "new", 0644, &fs);
    CHECK(fs.injected() == 1);
    CHECK(st.code() == (op == Op::kWrite ? absl::StatusCode::kResourceExhausted : absl::StatusCode::kInternal));
    CHECK(*ReadFile(path) == "old");
    size_t entries = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir))
      entries += e.path().filename() == "faulty.bin" ? 0 : 1;
    CHECK(entries == 0);
  }
  // A failed directory fsync comes after the rename: the caller hears of it, and the new file is in place.
  testing::FaultFileSystem fs;
  fs.FailNext(Op::kSyncDirectory, dir);
  CHECK_FALSE(WriteFileAtomic(path, "new", 0644, &fs).ok());
  CHECK(*ReadFile(path) == "new");
  std::filesystem::remove_all(dir);
}

TEST_CASE("ReadFile and MappedFile report a missing file as NotFound", "[base][file]") {
  CHECK(ReadFile("/nonexistent/seedling").status().code() == absl::StatusCode::kNotFound);
  CHECK(MappedFile::Open("/nonexistent/seedling").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("MappedFile copy-on-write never changes the file", "[base][file]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "c.bin");
  REQUIRE(WriteFileAtomic(path, "abcdef").ok());
  {
    auto m = MappedFile::Open(path, MappedFile::Mode::kCopyOnWrite);
    REQUIRE(m.ok());
    REQUIRE((*m)->size() == 6);
    CHECK(std::memcmp((*m)->data(), "abcdef", 6) == 0);
    (*m)->mutable_data()[0] = 'X';
    CHECK((*m)->data()[0] == 'X');
  }
  CHECK(*ReadFile(path) == "abcdef");
  std::filesystem::remove_all(dir);
}

TEST_CASE("MappedFile::FromBytes holds the bytes, and Release leaves them intact", "[base][file]") {
  const std::string bytes(3 * 4096, 'q');
  auto m = MappedFile::FromBytes("in-memory", bytes);
  REQUIRE(m->size() == bytes.size());
  CHECK(m->path() == "in-memory");
  CHECK(m->mode() == MappedFile::Mode::kReadOnly);
  // Release on a real mapping drops pages (they read back from the file); on heap memory that would
  // zero them, so it must do nothing here.
  m->Release(m->data(), m->size());
  CHECK(std::string(reinterpret_cast<const char*>(m->data()), m->size()) == bytes);
  CHECK(MappedFile::FromBytes("empty", "")->size() == 0);
}

TEST_CASE("ParseByteSize reads binary units and refuses more than 1 PiB", "[base][memory]") {
  CHECK(*ParseByteSize("512M") == 512LL << 20);
  CHECK(*ParseByteSize("1.5G") == 3LL << 29);
  CHECK(*ParseByteSize("800MiB") == 800LL << 20);
  CHECK(*ParseByteSize("4096") == 4096);
  CHECK(*ParseByteSize(" 2 gb ") == 2LL << 30);
  CHECK(*ParseByteSize("1024G") == 1024LL << 30);
  CHECK(ParseByteSize("lots").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ParseByteSize("-1M").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ParseByteSize("5X").status().code() == absl::StatusCode::kInvalidArgument);
  // Beyond int64 the conversion itself would be undefined: refused with the bound.
  CHECK(ParseByteSize("1e30G").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ParseByteSize("1025T").status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Peak RSS grows when memory is touched", "[base][memory]") {
  const int64_t before = PeakRssBytes();
  REQUIRE(before > 0);
  std::vector<char> big(64 << 20);
  std::memset(big.data(), 1, big.size());
  CHECK(PeakRssBytes() >= before + (48 << 20));
  CHECK(big[12345] == 1);
}

TEST_CASE("The heap allocator is the system's unless tcmalloc is linked in", "[base][memory]") {
  // The tests link no allocator (tests/apps/cli_test.sh checks the programs, which link tcmalloc).
  const bool preloaded = std::getenv("LD_PRELOAD") != nullptr &&
                         std::string(std::getenv("LD_PRELOAD")).find("tcmalloc") != std::string::npos;
  CHECK(CurrentHeapAllocator() == (preloaded ? HeapAllocator::kTcmalloc : HeapAllocator::kSystem));
  CHECK(std::string(HeapAllocatorName(HeapAllocator::kTcmalloc)) == "tcmalloc");
  CHECK(std::string(HeapAllocatorName(HeapAllocator::kSystem)) == "system");
}

TEST_CASE("ForEachLine streams lines, caps what it holds, and agrees with ForEachLineIn", "[base][file]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "lines.txt");
  // Lines across the 64 KiB read buffer, an empty line, an over-long line and no final newline.
  const std::string text = "a\n\n" + std::string(70000, 'x') + "\n" + std::string(200000, 'y') + "\nlast";
  REQUIRE(WriteFileAtomic(path, text).ok());
  struct Seen {
    int64_t number;
    std::string text;
    int64_t bytes;
    bool too_long;
    bool operator==(const Seen&) const = default;
  };
  auto collect = [](std::vector<Seen>& out) {
    return [&out](const Line& l) {
      out.push_back({l.number, std::string(l.text), l.bytes, l.too_long});
      return absl::OkStatus();
    };
  };
  std::vector<Seen> streamed, in_memory;
  REQUIRE(ForEachLine(path, 100000, collect(streamed)).ok());
  REQUIRE(ForEachLineIn(text, 100000, collect(in_memory)).ok());
  REQUIRE(streamed.size() == 5);
  CHECK(streamed == in_memory);
  CHECK(streamed[0].text == "a");
  CHECK(streamed[1].text.empty());
  CHECK(streamed[2].text == std::string(70000, 'x'));
  CHECK(streamed[3].too_long);
  CHECK(streamed[3].text.empty());
  CHECK(streamed[3].bytes == 200000);
  CHECK(streamed[4].text == "last");
  CHECK(streamed[4].number == 5);
  // The callback's error stops the walk.
  int calls = 0;
  const absl::Status stop = ForEachLine(path, 100, [&](const Line&) {
    ++calls;
    return absl::CancelledError("enough");
  });
  CHECK(stop.code() == absl::StatusCode::kCancelled);
  CHECK(calls == 1);
  CHECK(ForEachLine(JoinPath(dir, "missing"), 10, collect(streamed)).code() == absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace seedling
