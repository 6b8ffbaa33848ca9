#include "server/preflight.h"

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <memory>

#include "base/file.h"
#include "base/openssl.h"
#include "base/status.h"
#include "base/strings.h"
#include "server/dp_budget.h"
#include "server/strategy_stack.h"

namespace seedling::server {
namespace {

using BioPtr = std::unique_ptr<BIO, OpenSslDeleter<&BIO_free>>;
using X509Ptr = std::unique_ptr<X509, OpenSslDeleter<&X509_free>>;

// Never prompts: an encrypted key is refused here as it is by serve, which has no one to ask.
int NoPassword(char*, int, int, void*) { return 0; }

// The contents of `path`; `key` names the server.toml key in errors.
absl::StatusOr<std::string> ReadPemFile(const std::string& path, std::string_view key) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return Annotate(text.status(), StrCat("[server] ", key));
  return text;
}

// A read-only BIO over `pem`, which must outlive it.
BioPtr MemoryBio(const std::string& pem) { return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()))); }

// The first certificate of a PEM file (the leaf of a chain, or a CA).
absl::StatusOr<X509Ptr> ReadCertificate(const std::string& path, std::string_view key) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string pem, ReadPemFile(path, key));
  const BioPtr bio = MemoryBio(pem);
  X509Ptr cert(bio == nullptr ? nullptr : PEM_read_bio_X509(bio.get(), nullptr, &NoPassword, nullptr));
  if (cert == nullptr) {
    return absl::InvalidArgumentError(
        StrCat("[server] ", key, " '", path, "' holds no PEM certificate (", OpenSslErrors(), ")"));
  }
  return cert;
}

absl::StatusOr<EvpPkeyPtr> ReadPrivateKey(const std::string& path) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string pem, ReadPemFile(path, "key_file"));
  const BioPtr bio = MemoryBio(pem);
  EvpPkeyPtr key(bio == nullptr ? nullptr : PEM_read_bio_PrivateKey(bio.get(), nullptr, &NoPassword, nullptr));
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        StrCat("[server] key_file '", path, "' holds no unencrypted PEM private key (", OpenSslErrors(), ")"));
  }
  return key;
}

// What TlsServer::Start loads: the certificate, its private key (which must match it), the client CA.
absl::Status CheckTlsFiles(const ServerConfig& config) {
  SEEDLING_ASSIGN_OR_RETURN(X509Ptr cert, ReadCertificate(config.cert_file, "cert_file"));
  SEEDLING_ASSIGN_OR_RETURN(EvpPkeyPtr key, ReadPrivateKey(config.key_file));
  if (EVP_PKEY_eq(X509_get0_pubkey(cert.get()), key.get()) != 1) {
    OpenSslErrors();  // drain the queue: the mismatch is the whole story
    return absl::InvalidArgumentError(
        StrCat("[server] key_file '", config.key_file, "' does not match the certificate '", config.cert_file, "'"));
  }
  if (!config.client_ca_file.empty()) {
    SEEDLING_RETURN_IF_ERROR(ReadCertificate(config.client_ca_file, "client_ca_file").status());
  }
  return absl::OkStatus();
}

// state_dir, or the nearest ancestor that exists (where serve's MakeDirs would start), must be a directory
// this process may write. Returns whether state_dir already holds a state database.
absl::StatusOr<bool> CheckStateDir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path existing = fs::absolute(dir, ec);
  if (ec) return absl::InvalidArgumentError(StrCat("[server] state_dir '", dir, "': ", ec.message()));
  while (!fs::exists(existing, ec) && existing.has_parent_path() && existing != existing.parent_path()) {
    existing = existing.parent_path();
  }
  if (!fs::is_directory(existing, ec)) {
    return absl::FailedPreconditionError(
        StrCat("[server] state_dir '", dir, "': '", existing.string(), "' exists and is not a directory"));
  }
  if (::access(existing.c_str(), W_OK | X_OK) != 0) {
    return ErrnoStatus(errno, StrCat("[server] state_dir '", dir, "': cannot write to"), existing.string());
  }
  return FileExists(JoinPath(dir, "state.db"));
}

// What Coordinator::Create builds from the config before it serves: the adapter's shapes from the base
// model's config, the strategy stack for them, and the DP accountant.
absl::Status CheckModelAndStrategy(const ServerConfig& config, PreflightReport& report) {
  SEEDLING_ASSIGN_OR_RETURN(const BaseAdapter base, MakeBaseAdapter(config));
  report.model_id = base.model_id;
  report.adapter_parameters = base.adapter->numel();
  absl::StatusOr<std::unique_ptr<Strategy>> strategy =
      MakeServerStrategy(config, report.adapter_parameters, /*version=*/0, /*check_only=*/true);
  if (!strategy.ok()) return Annotate(strategy.status(), "[strategy]");
  report.strategy = (*strategy)->name();
  if (config.privacy.dp) {
    absl::StatusOr<DpBudget> budget = DpBudget::Create(config.privacy, {});
    if (!budget.ok()) return Annotate(budget.status(), "[privacy]");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PreflightReport> CheckServerConfig(const ServerConfig& config) {
  PreflightReport report;
  SEEDLING_RETURN_IF_ERROR(config.Validate());
  SEEDLING_RETURN_IF_ERROR(CheckTlsFiles(config));
  SEEDLING_ASSIGN_OR_RETURN(report.state_exists, CheckStateDir(config.state_dir));
  SEEDLING_RETURN_IF_ERROR(CheckModelAndStrategy(config, report));
  return report;
}

}  // namespace seedling::server
