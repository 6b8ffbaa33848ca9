#include "comms/internal/openssl_util.h"

#include <openssl/err.h>
#include <openssl/pem.h>

#include "base/sha256.h"
#include "base/strings.h"

namespace seedling::comms::internal {

absl::StatusOr<std::string> SubjectPublicKeySha256(X509* cert) {
  unsigned char* der = nullptr;
  const int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert), &der);
  if (len <= 0) return absl::InternalError(StrCat("cannot encode the public key: ", OpenSslErrors()));
  std::string hex = Sha256Hex(std::string_view(reinterpret_cast<const char*>(der), static_cast<size_t>(len)));
  OPENSSL_free(der);
  return hex;
}

std::string SubjectCommonName(X509* cert) {
  X509_NAME* name = X509_get_subject_name(cert);
  if (name == nullptr) return "";
  const int index = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (index < 0) return "";
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, index));
  unsigned char* utf8 = nullptr;
  const int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len < 0) return "";
  std::string out(reinterpret_cast<const char*>(utf8), static_cast<size_t>(len));
  OPENSSL_free(utf8);
  return out;
}

absl::StatusOr<X509Ptr> ParsePemCertificate(std::string_view pem, std::string_view what) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return absl::InternalError(StrCat("BIO_new_mem_buf: ", OpenSslErrors()));
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) {
    return absl::InvalidArgumentError(StrCat(what, " holds no PEM certificate: ", OpenSslErrors()));
  }
  return cert;
}

}  // namespace seedling::comms::internal
