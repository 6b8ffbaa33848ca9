#pragma once

// OpenSSL glue for comms: one owning pointer type per OpenSSL handle (the shared ones in base/openssl.h)
// (docs/contributing.md, "Ownership and concurrency"), the error queue as text, and the public-key fingerprint used for
// pinning. Internal to comms.

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "base/openssl.h"

namespace seedling::comms::internal {

using ::seedling::EvpPkeyPtr;
using ::seedling::OpenSslDeleter;
using ::seedling::OpenSslErrors;

using SslCtxPtr = std::unique_ptr<SSL_CTX, OpenSslDeleter<&SSL_CTX_free>>;
using SslPtr = std::unique_ptr<SSL, OpenSslDeleter<&SSL_free>>;
using BioPtr = std::unique_ptr<BIO, OpenSslDeleter<&BIO_free_all>>;
using BignumPtr = std::unique_ptr<BIGNUM, OpenSslDeleter<&BN_free>>;
using X509Ptr = std::unique_ptr<X509, OpenSslDeleter<&X509_free>>;
using X509NamePtr = std::unique_ptr<X509_NAME, OpenSslDeleter<&X509_NAME_free>>;
using X509ExtensionPtr = std::unique_ptr<X509_EXTENSION, OpenSslDeleter<&X509_EXTENSION_free>>;
using GeneralNamesPtr = std::unique_ptr<GENERAL_NAMES, OpenSslDeleter<&GENERAL_NAMES_free>>;
using GeneralNamePtr = std::unique_ptr<GENERAL_NAME, OpenSslDeleter<&GENERAL_NAME_free>>;
using Asn1OctetStringPtr = std::unique_ptr<ASN1_OCTET_STRING, OpenSslDeleter<&ASN1_OCTET_STRING_free>>;
using Asn1Ia5StringPtr = std::unique_ptr<ASN1_IA5STRING, OpenSslDeleter<&ASN1_IA5STRING_free>>;

// Hex SHA-256 of the certificate's SubjectPublicKeyInfo (DER). Internal if OpenSSL fails.
absl::StatusOr<std::string> SubjectPublicKeySha256(X509* cert);

// The subject's first commonName, "" if it has none.
std::string SubjectCommonName(X509* cert);

// Parses the first PEM certificate in `pem`; InvalidArgument naming `what` if there is none.
absl::StatusOr<X509Ptr> ParsePemCertificate(std::string_view pem, std::string_view what);

}  // namespace seedling::comms::internal
