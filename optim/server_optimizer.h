#pragma once

// Server optimizers of federated learning, as pure math on flat fp32 spans (no LibTorch): the step
// a server takes with the round's mean client change Δ̄ (a pseudo-gradient with the sign of an
// update: it is added).
//
// clang-format off
//   kSgd       θ ← θ + η Δ̄                                   (FedAvg: McMahan et al. 2017, η = 1)
//   kMomentum  m ← μ m + Δ̄;  θ ← θ + η m                     (FedAvgM: Hsu et al. 2019)
//   kAdagrad   m ← β1 m + (1−β1) Δ̄;  v ← v + Δ̄²              (FedAdagrad)
//   kAdam      m ← β1 m + (1−β1) Δ̄;  v ← β2 v + (1−β2) Δ̄²    (FedAdam)
//   kYogi      m ← β1 m + (1−β1) Δ̄;  v ← v − (1−β2) Δ̄² sign(v − Δ̄²)   (FedYogi)
//              and for the three adaptive ones θ ← θ + η m / (√v + τ)
// clang-format on
//
// The adaptive rules are Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2,
// without bias correction. Its initialization is m_{−1} = 0 and v_{−1} ≥ τ²; we take v_{−1} = τ²,
// the smallest value the algorithm allows (docs/methods.md, "Server optimizers", notes that the google-research code
// starts the Adagrad / Yogi accumulators at 0 instead). sign(0) = 0 for Yogi.
//
// Arithmetic: every element is computed in double from the fp32 inputs and rounded once to fp32
// when stored (θ, m and v each), so the result does not depend on how the vector is split.

#include <span>
#include <string_view>

#include "absl/status/status.h"

namespace seedling::optim {

enum class ServerOptimizerKind { kSgd, kMomentum, kAdagrad, kAdam, kYogi };

struct ServerOptimizerOptions {
  ServerOptimizerKind kind = ServerOptimizerKind::kSgd;
  double lr = 1.0;        // η, server learning rate (> 0 for validation; the step itself accepts any sign)
  double momentum = 0.9;  // μ of kMomentum, in [0, 1)
  double beta1 = 0.9;     // first-moment decay of the adaptive kinds, in [0, 1)
  double beta2 = 0.99;    // second-moment decay of kAdam / kYogi, in [0, 1)
  double tau = 1e-3;      // adaptivity τ (> 0; Reddi et al. recommend ≥ 1e-3)
};

// InvalidArgument naming the first field out of range.
absl::Status ValidateServerOptimizerOptions(const ServerOptimizerOptions& options);

// Whether the kind keeps a first-moment / momentum buffer (`m`) and a second-moment buffer (`v`).
bool UsesFirstMoment(ServerOptimizerKind kind);   // kMomentum, kAdagrad, kAdam, kYogi
bool UsesSecondMoment(ServerOptimizerKind kind);  // kAdagrad, kAdam, kYogi

// v_{−1} = τ² (see above); m_{−1} = 0.
float InitialSecondMoment(const ServerOptimizerOptions& options);

// The optimizer's state: `m` is the momentum (kMomentum) or the first moment, `v` the second
// moment. A span the kind does not use may be empty.
struct ServerOptimizerState {
  std::span<float> m;
  std::span<float> v;
};

// One server step in place: updates `state` and `params` from `delta` (Δ̄). Every span the kind uses
// must have params.size() elements (checked: aborts otherwise, a programming error). Returns Σ_i
// (θ_new,i − θ_old,i)², the squared L2 norm of the applied change, computed in double from the fp32
// values.
double ServerOptimizerStep(const ServerOptimizerOptions& options, std::span<const float> delta, std::span<float> params,
                           ServerOptimizerState state);

std::string_view ServerOptimizerName(ServerOptimizerKind kind);

}  // namespace seedling::optim
