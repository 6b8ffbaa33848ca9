#include "base/logging.h"

#include <string>

#include "base/strings.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace seedling {

absl::Status InitLogging(std::string_view level) {
  const std::string name(level);
  spdlog::level::level_enum lvl = spdlog::level::from_str(name);
  // from_str maps unknown names to "off"; only accept "off" when asked for.
  if (lvl == spdlog::level::off && name != "off") {
    return absl::InvalidArgumentError(
        StrCat("unknown log level '", name, "' (expected trace, debug, info, warn, error, off)"));
  }
  auto logger = spdlog::get("seedling");
  if (logger == nullptr) logger = spdlog::stderr_color_mt("seedling");
  logger->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
  logger->set_level(lvl);
  spdlog::set_default_logger(logger);
  return absl::OkStatus();
}

}  // namespace seedling
