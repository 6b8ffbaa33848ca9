#pragma once

// Logging goes through spdlog. Call InitLogging once from main(); library code logs with spdlog::info(...)
// etc. Never log secrets (tokens, keys): log their SHA-256 prefix or nothing.

#include <string_view>

#include "absl/status/status.h"

namespace seedling {

// Sets up spdlog's default logger to write to stderr with a "[time] [level] message" pattern at `level`
// ("trace", "debug", "info", "warn", "error", "off"). InvalidArgument for an unknown level.
absl::Status InitLogging(std::string_view level);

}  // namespace seedling
