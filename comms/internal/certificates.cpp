// CreateCertificates, CreateClientCertificate and PublicKeySha256 (declared in comms/tls.h), with
// the OpenSSL 3 API: EC P-256 keys, X509v3 certificates with random serials, SHA-256 signatures.

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/internal/openssl_util.h"
#include "comms/tls.h"

namespace seedling::comms {
namespace {

using internal::OpenSslErrors;

enum class CertKind { kCa, kServer, kClient };

struct CertSpec {
  CertKind kind;
  std::string common_name;
  std::vector<std::string> server_names;  // kServer: subjectAltName entries
  int validity_days;
};

struct Issued {
  internal::X509Ptr cert;
  internal::EvpPkeyPtr key;
};

absl::Status OpenSslFailure(std::string_view what) { return absl::InternalError(StrCat(what, ": ", OpenSslErrors())); }

absl::Status AddExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  internal::X509ExtensionPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (ext == nullptr || X509_add_ext(cert, ext.get(), -1) != 1) {
    return OpenSslFailure(StrCat("cannot add the extension ", OBJ_nid2sn(nid), " = ", value));
  }
  return absl::OkStatus();
}

// subjectAltName with an IP entry for each address and a DNS entry for each other name.
absl::Status AddSubjectAltNames(X509* cert, const std::vector<std::string>& names) {
  internal::GeneralNamesPtr general_names(sk_GENERAL_NAME_new_null());
  if (general_names == nullptr) return OpenSslFailure("sk_GENERAL_NAME_new_null");
  for (const std::string& name : names) {
    internal::GeneralNamePtr entry(GENERAL_NAME_new());
    if (entry == nullptr) return OpenSslFailure("GENERAL_NAME_new");
    if (ASN1_OCTET_STRING* ip = a2i_IPADDRESS(name.c_str())) {
      GENERAL_NAME_set0_value(entry.get(), GEN_IPADD, ip);
    } else {
      ERR_clear_error();  // a2i_IPADDRESS complains about names that are not addresses
      internal::Asn1Ia5StringPtr dns(ASN1_IA5STRING_new());
      if (dns == nullptr || ASN1_STRING_set(dns.get(), name.data(), static_cast<int>(name.size())) != 1) {
        return OpenSslFailure("ASN1_STRING_set");
      }
      GENERAL_NAME_set0_value(entry.get(), GEN_DNS, dns.release());
    }
    if (sk_GENERAL_NAME_push(general_names.get(), entry.get()) == 0) return OpenSslFailure("sk_GENERAL_NAME_push");
    entry.release();  // owned by the stack now
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, general_names.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    return OpenSslFailure("cannot add subjectAltName");
  }
  return absl::OkStatus();
}

absl::Status SetRandomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1) return OpenSslFailure("RAND_bytes");
  bytes[0] &= 0x7f;  // positive, at most 127 bits (RFC 5280: at most 20 octets)
  bytes[0] |= 0x40;  // and not shorter, so that every serial has the same length
  internal::BignumPtr bn(BN_bin2bn(bytes, sizeof(bytes), nullptr));
  if (bn == nullptr || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert)) == nullptr) {
    return OpenSslFailure("cannot set the serial number");
  }
  return absl::OkStatus();
}

// A new key and a certificate for it, signed by (issuer_cert, issuer_key), or self-signed when they
// are null.
absl::StatusOr<Issued> Issue(const CertSpec& spec, X509* issuer_cert, EVP_PKEY* issuer_key) {
  Issued out;
  out.key.reset(EVP_EC_gen("P-256"));
  if (out.key == nullptr) return OpenSslFailure("cannot generate an EC P-256 key");
  out.cert.reset(X509_new());
  if (out.cert == nullptr) return OpenSslFailure("X509_new");
  X509* cert = out.cert.get();
  if (X509_set_version(cert, X509_VERSION_3) != 1) return OpenSslFailure("X509_set_version");
  SEEDLING_RETURN_IF_ERROR(SetRandomSerial(cert));
  // A little slack before now for clocks that lag.
  if (X509_gmtime_adj(X509_getm_notBefore(cert), -3600) == nullptr ||
      X509_time_adj_ex(X509_getm_notAfter(cert), spec.validity_days, 0, nullptr) == nullptr) {
    return OpenSslFailure("cannot set the validity");
  }
  internal::X509NamePtr name(X509_NAME_new());
  if (name == nullptr ||
      X509_NAME_add_entry_by_txt(name.get(), "O", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>("Seedling"), -1,
                                 -1, 0) != 1 ||
      X509_NAME_add_entry_by_txt(name.get(), "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(spec.common_name.data()),
                                 static_cast<int>(spec.common_name.size()), -1, 0) != 1) {
    return OpenSslFailure(StrCat("cannot build the subject name CN=", spec.common_name));
  }
  if (X509_set_subject_name(cert, name.get()) != 1 ||
      X509_set_issuer_name(cert, issuer_cert != nullptr ? X509_get_subject_name(issuer_cert) : name.get()) != 1 ||
      X509_set_pubkey(cert, out.key.get()) != 1) {
    return OpenSslFailure("cannot fill in the certificate");
  }
  X509* issuer = issuer_cert != nullptr ? issuer_cert : cert;
  SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_subject_key_identifier, "hash"));
  SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_authority_key_identifier, "keyid:always"));
  switch (spec.kind) {
    case CertKind::kCa:
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_basic_constraints, "critical,CA:TRUE"));
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_key_usage, "critical,keyCertSign,cRLSign"));
      break;
    case CertKind::kServer:
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_basic_constraints, "critical,CA:FALSE"));
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_key_usage, "critical,digitalSignature"));
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_ext_key_usage, "serverAuth"));
      SEEDLING_RETURN_IF_ERROR(AddSubjectAltNames(cert, spec.server_names));
      break;
    case CertKind::kClient:
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_basic_constraints, "critical,CA:FALSE"));
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_key_usage, "critical,digitalSignature"));
      SEEDLING_RETURN_IF_ERROR(AddExtension(cert, issuer, NID_ext_key_usage, "clientAuth"));
      break;
  }
  EVP_PKEY* signer = issuer_key != nullptr ? issuer_key : out.key.get();
  if (X509_sign(cert, signer, EVP_sha256()) <= 0) return OpenSslFailure("cannot sign the certificate");
  return out;
}

std::string BioContents(BIO* bio) {
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string();
}

absl::StatusOr<std::string> CertificatePem(X509* cert) {
  internal::BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509(bio.get(), cert) != 1) return OpenSslFailure("PEM_write_bio_X509");
  return BioContents(bio.get());
}

absl::StatusOr<std::string> PrivateKeyPem(EVP_PKEY* key) {
  internal::BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return OpenSslFailure("PEM_write_bio_PrivateKey");
  }
  return BioContents(bio.get());
}

absl::Status WriteIssued(const Issued& issued, const std::string& cert_path, const std::string& key_path) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string key_pem, PrivateKeyPem(issued.key.get()));
  SEEDLING_ASSIGN_OR_RETURN(const std::string cert_pem, CertificatePem(issued.cert.get()));
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(key_path, key_pem, 0600));
  return WriteFileAtomic(cert_path, cert_pem);
}

absl::Status RefuseExisting(const std::vector<std::string>& paths) {
  for (const std::string& path : paths) {
    if (FileExists(path)) {
      return absl::FailedPreconditionError(StrCat("'", path, "' already exists; refusing to overwrite it"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateDays(int days) {
  if (days < 1 || days > 36500) {
    return absl::InvalidArgumentError(StrCat("validity_days must be in [1, 36500], got ", days));
  }
  return absl::OkStatus();
}

absl::StatusOr<internal::EvpPkeyPtr> ReadPrivateKey(const std::string& path) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string pem, ReadFile(path));
  internal::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return OpenSslFailure("BIO_new_mem_buf");
  internal::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) {
    return absl::InvalidArgumentError(StrCat("'", path, "' holds no PEM private key: ", OpenSslErrors()));
  }
  return key;
}

}  // namespace

absl::Status CreateCertificates(const CertificateOptions& options) {
  if (options.dir.empty()) return absl::InvalidArgumentError("CertificateOptions: dir is required");
  if (options.server_names.empty()) return absl::InvalidArgumentError("CertificateOptions: server_names is empty");
  for (const std::string& name : options.server_names) {
    if (name.empty() || name.find_first_of(" \t\r\n,/") != std::string::npos) {
      return absl::InvalidArgumentError(StrCat("'", name, "' is not a usable server name"));
    }
  }
  SEEDLING_RETURN_IF_ERROR(ValidateDays(options.validity_days));
  SEEDLING_RETURN_IF_ERROR(MakeDirs(options.dir));
  const std::string ca_crt = JoinPath(options.dir, "ca.crt");
  const std::string ca_key = JoinPath(options.dir, "ca.key");
  const std::string server_crt = JoinPath(options.dir, "server.crt");
  const std::string server_key = JoinPath(options.dir, "server.key");
  if (!options.overwrite) SEEDLING_RETURN_IF_ERROR(RefuseExisting({ca_crt, ca_key, server_crt, server_key}));

  SEEDLING_ASSIGN_OR_RETURN(const Issued ca,
                            Issue({CertKind::kCa, "Seedling CA", {}, options.validity_days}, nullptr, nullptr));
  SEEDLING_ASSIGN_OR_RETURN(const Issued server,
                            Issue({CertKind::kServer, "Seedling server", options.server_names, options.validity_days},
                                  ca.cert.get(), ca.key.get()));
  SEEDLING_RETURN_IF_ERROR(WriteIssued(ca, ca_crt, ca_key));
  return WriteIssued(server, server_crt, server_key);
}

absl::Status CreateClientCertificate(const std::string& dir, const std::string& name, int validity_days) {
  // The name becomes a file name and the certificate's CN (at most 64 characters).
  if (name.empty() || name.size() > 64 || name[0] == '.' ||
      name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
          std::string::npos) {
    return absl::InvalidArgumentError(
        StrCat("client name '", name, "' must be 1-64 characters of [A-Za-z0-9._-], not starting with '.'"));
  }
  SEEDLING_RETURN_IF_ERROR(ValidateDays(validity_days));
  const std::string crt_path = JoinPath(dir, StrCat(name, ".crt"));
  const std::string key_path = JoinPath(dir, StrCat(name, ".key"));
  SEEDLING_RETURN_IF_ERROR(RefuseExisting({crt_path, key_path}));
  const std::string ca_crt = JoinPath(dir, "ca.crt");
  SEEDLING_ASSIGN_OR_RETURN(const std::string ca_pem, ReadFile(ca_crt));
  SEEDLING_ASSIGN_OR_RETURN(internal::X509Ptr ca_cert, internal::ParsePemCertificate(ca_pem, ca_crt));
  SEEDLING_ASSIGN_OR_RETURN(internal::EvpPkeyPtr ca_key, ReadPrivateKey(JoinPath(dir, "ca.key")));
  if (X509_check_private_key(ca_cert.get(), ca_key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(StrCat("the CA key in '", dir, "' does not match ca.crt"));
  }
  SEEDLING_ASSIGN_OR_RETURN(const Issued client,
                            Issue({CertKind::kClient, name, {}, validity_days}, ca_cert.get(), ca_key.get()));
  return WriteIssued(client, crt_path, key_path);
}

absl::StatusOr<std::string> PublicKeySha256(const std::string& cert_file) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string pem, ReadFile(cert_file));
  SEEDLING_ASSIGN_OR_RETURN(internal::X509Ptr cert, internal::ParsePemCertificate(pem, cert_file));
  return internal::SubjectPublicKeySha256(cert.get());
}

}  // namespace seedling::comms
