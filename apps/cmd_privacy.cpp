// privacy epsilon / privacy noise-for: the RDP accountant of privacy/accountant.h from the command line.

#include <cmath>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "base/status.h"
#include "privacy/accountant.h"

namespace seedling::apps {
namespace {

struct PrivacyFlags {
  double sampling_rate = -1;
  double noise_multiplier = -1;
  double epsilon = -1;
  int64_t steps = -1;
  double delta = -1;
  std::string conversion = "balle2020";
};

void AddCommonOptions(CLI::App* cmd, PrivacyFlags& f) {
  cmd->add_option("--sampling-rate", f.sampling_rate, "Poisson sampling rate q per step, in [0, 1]")->required();
  cmd->add_option("--steps", f.steps, "Number of steps (rounds), >= 0")->required();
  cmd->add_option("--delta", f.delta, "Target delta, in (0, 1)")->required();
  cmd->add_option("--conversion", f.conversion, "RDP to (epsilon, delta): balle2020 or classic")->capture_default_str();
}

// JSON has no infinity: an unbounded ε (σ = 0) prints as null.
nlohmann::json Number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

}  // namespace

void RegisterPrivacyCommands(CLI::App& app, Action& action) {
  CLI::App* privacy = app.add_subcommand("privacy", "Differential-privacy accounting (RDP, subsampled Gaussian)");
  privacy->require_subcommand(1);
  auto f = std::make_shared<PrivacyFlags>();

  CLI::App* eps = privacy->add_subcommand(
      "epsilon", "Print {\"epsilon\", \"order\"} for T steps of the Poisson-subsampled Gaussian (null = unbounded)");
  AddCommonOptions(eps, *f);
  eps->add_option("--noise-multiplier", f->noise_multiplier, "Noise std / clip norm (sigma), >= 0")->required();
  eps->callback([f, &action] {
    action = [f]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(privacy::EpsilonConversion conversion, privacy::ParseEpsilonConversion(f->conversion));
      SEEDLING_ASSIGN_OR_RETURN(
          privacy::PrivacySpent spent,
          privacy::ComputeEpsilon(f->sampling_rate, f->noise_multiplier, f->steps, f->delta, conversion));
      std::cout << nlohmann::json{{"epsilon", Number(spent.epsilon)}, {"order", spent.order}}.dump() << std::endl;
      return absl::OkStatus();
    };
  });

  CLI::App* noise = privacy->add_subcommand(
      "noise-for", "Print {\"noise_multiplier\"}: the smallest sigma whose epsilon after T steps is <= the target");
  AddCommonOptions(noise, *f);
  noise->add_option("--epsilon", f->epsilon, "Target epsilon, > 0")->required();
  noise->callback([f, &action] {
    action = [f]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(privacy::EpsilonConversion conversion, privacy::ParseEpsilonConversion(f->conversion));
      SEEDLING_ASSIGN_OR_RETURN(double sigma,
                                privacy::NoiseForEpsilon(f->epsilon, f->sampling_rate, f->steps, f->delta, conversion));
      std::cout << nlohmann::json{{"noise_multiplier", sigma}}.dump() << std::endl;
      return absl::OkStatus();
    };
  });
}

}  // namespace seedling::apps
