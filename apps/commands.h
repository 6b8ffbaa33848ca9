#pragma once

// Subcommands of the `seedling` binary. Each Register* function adds its subcommands to `app`; when one
// is chosen on the command line its callback stores the work to run in `action`, which main() runs
// after parsing (so errors print as one line and set the exit code in one place).

#include <CLI/CLI.hpp>
#include <functional>

#include "absl/status/status.h"

namespace seedling::apps {

using Action = std::function<absl::Status()>;

void RegisterModelCommands(CLI::App& app, Action& action);     // init-model, eval, generate
void RegisterBenchCommands(CLI::App& app, Action& action);     // bench forward, bench finetune
void RegisterFinetuneCommands(CLI::App& app, Action& action);  // finetune, export
void RegisterServerCommands(CLI::App& app, Action& action);    // serve, certs, devices, client
void RegisterSimulateCommands(CLI::App& app, Action& action);  // simulate
void RegisterPrivacyCommands(CLI::App& app, Action& action);   // privacy epsilon, privacy noise-for
void RegisterTokenizeCommands(CLI::App& app, Action& action);  // tokenize

}  // namespace seedling::apps
