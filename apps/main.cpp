// The `seedling` command line. See README.md for the commands.

#include <CLI/CLI.hpp>
#include <cstdio>
#include <thread>

#include "apps/commands.h"
#include "base/logging.h"
#include "base/version.h"
#include "model/runtime.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
  CLI::App app("Seedling: federated fine-tuning of small LLMs on phones", "seedling");
  app.require_subcommand(1);
  app.set_version_flag("--version", seedling::kVersionString);
  int threads = 0;
  std::string log_level = "warn";
  app.add_option("--threads", threads, "CPU threads for matrix multiplies (0 = all cores)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")->capture_default_str();

  seedling::apps::Action action;
  seedling::apps::RegisterModelCommands(app, action);
  seedling::apps::RegisterTokenizeCommands(app, action);
  seedling::apps::RegisterFinetuneCommands(app, action);
  seedling::apps::RegisterServerCommands(app, action);
  seedling::apps::RegisterBenchCommands(app, action);
  seedling::apps::RegisterSimulateCommands(app, action);
  seedling::apps::RegisterPrivacyCommands(app, action);

  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return std::string("seedling: error: ") + e.what() + "\nRun with --help for more information.\n";
  });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help and --version exit 0; usage errors 2
  }
  if (absl::Status st = seedling::InitLogging(log_level); !st.ok()) {
    std::fprintf(stderr, "seedling: error: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  const std::string compute = seedling::model::ConfigureCompute({threads});
  spdlog::info("compute: {}", compute);
  if (!action) return 0;
  const absl::Status st = action();
  if (!st.ok()) {
    std::fprintf(stderr, "seedling: error: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
