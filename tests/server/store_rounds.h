#pragma once

// Rounds written straight into a Store, for tests that need committed history without running a coordinator.

#include <catch2/catch.hpp>
#include <cstdint>

#include "server/store.h"

namespace seedling::server::testing {

// A lora-bp round (target 1, min_reports 1) created and moved to aggregating, ready for WriteCheckpoint and
// CommitRound; returns its id.
inline uint64_t AggregatingRound(Store& store) {
  RoundRecord f;
  f.method = "lora-bp";
  f.config_json = "{}";
  f.target = 1;
  f.min_reports = 1;
  auto created = store.CreateRound(f);
  REQUIRE(created.ok());
  const uint64_t id = created->round_id;
  REQUIRE(store.SetRoundState(id, RoundState::kCollecting, 1).ok());
  REQUIRE(store.SetRoundState(id, RoundState::kAggregating, 2).ok());
  return id;
}

}  // namespace seedling::server::testing
