// privacy epsilon / noise-for / ftrl: the RDP accountant and DP-FTRL's zCDP (privacy/accountant.h) from the command
// line.

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
  int64_t tree_restart_rounds = -1;
  int64_t participations = 1;
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

  CLI::App* ftrl = privacy->add_subcommand(
      "ftrl", "Print {\"rho\", \"epsilon\", \"epsilon_delta_1e-10\"}: DP-FTRL (tree aggregation) after T rounds, zCDP");
  ftrl->add_option("--steps", f->steps, "Number of rounds, >= 0")->required();
  ftrl->add_option("--tree-restart-rounds", f->tree_restart_rounds, "Rounds per tree R, >= 1")->required();
  ftrl->add_option("--noise-multiplier", f->noise_multiplier, "Node noise std / clip norm (sigma), >= 0")->required();
  ftrl->add_option("--participations", f->participations, "Rounds of one tree a device may join (k), >= 1")
      ->capture_default_str();
  ftrl->add_option("--delta", f->delta, "Delta of the reported epsilon, in (0, 1)")->required();
  ftrl->callback([f, &action] {
    action = [f]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(double rho, privacy::TreeAggregationZcdp(f->steps, f->tree_restart_rounds,
                                                                         f->noise_multiplier, f->participations));
      SEEDLING_ASSIGN_OR_RETURN(double epsilon, privacy::EpsilonFromZcdp(rho, f->delta));
      SEEDLING_ASSIGN_OR_RETURN(double epsilon_report, privacy::EpsilonFromZcdp(rho, 1e-10));
      std::cout << nlohmann::json{{"rho", Number(rho)},
                                  {"epsilon", Number(epsilon)},
                                  {"epsilon_delta_1e-10", Number(epsilon_report)}}
                       .dump()
                << std::endl;
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
