#include "optim/server_optimizer.h"

#include <cmath>

#include "base/check.h"
#include "base/strings.h"

namespace seedling::optim {
namespace {

bool InUnitInterval(double x) { return x >= 0.0 && x < 1.0; }

double Sign(double x) { return static_cast<double>((x > 0.0) - (x < 0.0)); }

}  // namespace

absl::Status ValidateServerOptimizerOptions(const ServerOptimizerOptions& options) {
  if (!(options.lr > 0.0) || !std::isfinite(options.lr)) {
    return absl::InvalidArgumentError(StrCat("server lr must be finite and > 0, got ", options.lr));
  }
  if (options.kind == ServerOptimizerKind::kMomentum && !InUnitInterval(options.momentum)) {
    return absl::InvalidArgumentError(StrCat("server momentum must be in [0, 1), got ", options.momentum));
  }
  if (UsesSecondMoment(options.kind)) {
    if (!InUnitInterval(options.beta1)) {
      return absl::InvalidArgumentError(StrCat("beta1 must be in [0, 1), got ", options.beta1));
    }
    if (!InUnitInterval(options.beta2)) {
      return absl::InvalidArgumentError(StrCat("beta2 must be in [0, 1), got ", options.beta2));
    }
    // τ² must be a positive fp32 so that √v + τ > 0 from the first step.
    if (!(options.tau > 0.0) || !std::isfinite(options.tau) || !(InitialSecondMoment(options) > 0.0f)) {
      return absl::InvalidArgumentError(StrCat("tau must be finite and > 0 with tau² > 0 in fp32, got ", options.tau));
    }
  }
  return absl::OkStatus();
}

bool UsesFirstMoment(ServerOptimizerKind kind) { return kind != ServerOptimizerKind::kSgd; }

bool UsesSecondMoment(ServerOptimizerKind kind) {
  return kind == ServerOptimizerKind::kAdagrad || kind == ServerOptimizerKind::kAdam ||
         kind == ServerOptimizerKind::kYogi;
}

float InitialSecondMoment(const ServerOptimizerOptions& options) {
  return static_cast<float>(options.tau * options.tau);
}

double ServerOptimizerStep(const ServerOptimizerOptions& options, std::span<const float> delta, std::span<float> params,
                           ServerOptimizerState state) {
  const size_t n = params.size();
  SEEDLING_CHECK(delta.size() == n, "delta and params differ in length");
  if (UsesFirstMoment(options.kind)) SEEDLING_CHECK(state.m.size() == n, "m and params differ in length");
  if (UsesSecondMoment(options.kind)) SEEDLING_CHECK(state.v.size() == n, "v and params differ in length");

  const double lr = options.lr;
  const double b1 = options.beta1;
  const double b2 = options.beta2;
  const double tau = options.tau;
  double change2 = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = delta[i];
    double step = 0.0;  // what is added to θ_i
    switch (options.kind) {
      case ServerOptimizerKind::kSgd:
        // FedAvg: θ ← θ + η Δ̄.
        step = lr * d;
        break;
      case ServerOptimizerKind::kMomentum: {
        // Hsu et al. 2019: m ← μ m + Δ̄;  θ ← θ + η m.
        const float m = static_cast<float>(options.momentum * static_cast<double>(state.m[i]) + d);
        state.m[i] = m;
        step = lr * static_cast<double>(m);
        break;
      }
      case ServerOptimizerKind::kAdagrad:
      case ServerOptimizerKind::kAdam:
      case ServerOptimizerKind::kYogi: {
        // Reddi et al. 2021, Alg. 2, line "m_t": m_t = β1 m_{t−1} + (1 − β1) Δ_t.
        const float m = static_cast<float>(b1 * static_cast<double>(state.m[i]) + (1.0 - b1) * d);
        // Alg. 2, line "v_t", one of three.
        const double v_prev = state.v[i];
        const double d2 = d * d;
        double v_next = 0.0;
        if (options.kind == ServerOptimizerKind::kAdagrad) {
          v_next = v_prev + d2;
        } else if (options.kind == ServerOptimizerKind::kAdam) {
          v_next = b2 * v_prev + (1.0 - b2) * d2;
        } else {
          v_next = v_prev - (1.0 - b2) * d2 * Sign(v_prev - d2);
        }
        const float v = static_cast<float>(v_next);
        state.m[i] = m;
        state.v[i] = v;
        // Alg. 2, last line: x_{t+1} = x_t + η m_t / (√v_t + τ)  (no bias correction).
        step = lr * static_cast<double>(m) / (std::sqrt(static_cast<double>(v)) + tau);
        break;
      }
    }
    const float before = params[i];
    const float after = static_cast<float>(static_cast<double>(before) + step);
    params[i] = after;
    const double c = static_cast<double>(after) - static_cast<double>(before);
    change2 += c * c;
  }
  return change2;
}

std::string_view ServerOptimizerName(ServerOptimizerKind kind) {
  switch (kind) {
    case ServerOptimizerKind::kSgd:
      return "sgd";
    case ServerOptimizerKind::kMomentum:
      return "momentum";
    case ServerOptimizerKind::kAdagrad:
      return "adagrad";
    case ServerOptimizerKind::kAdam:
      return "adam";
    case ServerOptimizerKind::kYogi:
      return "yogi";
  }
  return "unknown";
}

}  // namespace seedling::optim
