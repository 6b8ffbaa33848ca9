#include "model/internal/spm_library.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <vector>

#include "base/strings.h"

namespace seedling::model::internal {
namespace {

std::vector<std::string> Candidates() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("SEEDLING_SPM_SHIM"); env != nullptr && env[0] != '\0') out.push_back(env);
  char exe[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    exe[n] = '\0';
    const std::filesystem::path dir = std::filesystem::path(exe).parent_path();
    out.push_back((dir / "libseedling_spm_shim.so").string());
    out.push_back((dir / ".." / "lib" / "libseedling_spm_shim.so").string());
  }
  // Next to the shared library holding this code (libseedling_client.so in an app's native library folder).
  Dl_info self;
  if (::dladdr(reinterpret_cast<const void*>(&Candidates), &self) != 0 && self.dli_fname != nullptr) {
    out.push_back((std::filesystem::path(self.dli_fname).parent_path() / "libseedling_spm_shim.so").string());
  }
#ifdef SEEDLING_SPM_SHIM_BUILD_PATH
  out.push_back(SEEDLING_SPM_SHIM_BUILD_PATH);
#endif
#ifdef SEEDLING_SPM_SHIM_INSTALL_PATH
  out.push_back(SEEDLING_SPM_SHIM_INSTALL_PATH);
#endif
  return out;
}

absl::StatusOr<const SpmLibrary*> Open() {
  std::string tried;
  for (const std::string& path : Candidates()) {
    if (!std::filesystem::exists(path)) {
      tried += StrCat(tried.empty() ? "" : ", ", path);
      continue;
    }
    // RTLD_LOCAL | RTLD_DEEPBIND: SentencePiece binds to its bundled protobuf and exports nothing globally.
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (handle == nullptr) {
      return absl::FailedPreconditionError(StrCat("cannot load ", path, ": ", ::dlerror()));
    }
    auto version = reinterpret_cast<decltype(&seedling_spm_abi_version)>(::dlsym(handle, "seedling_spm_abi_version"));
    if (version == nullptr || version() != SEEDLING_SPM_ABI_VERSION) {
      return absl::FailedPreconditionError(StrCat(path, " has a different ABI version than this build"));
    }
    auto* lib = new SpmLibrary();  // lives for the process, like the dlopen handle
    lib->path = path;
    bool ok = true;
    auto bind = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(handle, name));
      ok = ok && fn != nullptr;
    };
    bind(lib->load, "seedling_spm_load");
    bind(lib->free, "seedling_spm_free");
    bind(lib->encode, "seedling_spm_encode");
    bind(lib->decode, "seedling_spm_decode");
    bind(lib->free_buffer, "seedling_spm_free_buffer");
    bind(lib->piece_size, "seedling_spm_piece_size");
    bind(lib->id_to_piece, "seedling_spm_id_to_piece");
    bind(lib->piece_to_id, "seedling_spm_piece_to_id");
    bind(lib->piece_type, "seedling_spm_piece_type");
    bind(lib->piece_score, "seedling_spm_piece_score");
    bind(lib->bos_id, "seedling_spm_bos_id");
    bind(lib->eos_id, "seedling_spm_eos_id");
    bind(lib->unk_id, "seedling_spm_unk_id");
    if (!ok) {
      delete lib;
      return absl::FailedPreconditionError(StrCat(path, " lacks some seedling_spm_* functions"));
    }
    return lib;
  }
  return absl::NotFoundError(StrCat("tokenizer.model support needs libseedling_spm_shim.so; looked at: ", tried,
                                    " (set SEEDLING_SPM_SHIM to its path)"));
}

}  // namespace

absl::StatusOr<const SpmLibrary*> OpenSpmLibrary() {
  static std::once_flag once;
  static absl::StatusOr<const SpmLibrary*>* result = nullptr;  // set once, then read-only
  std::call_once(once, [] { result = new absl::StatusOr<const SpmLibrary*>(Open()); });
  return *result;
}

}  // namespace seedling::model::internal
