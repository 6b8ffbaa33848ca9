/* A device loop using only the C SDK header: check in, train when given a task, upload, obey retry-after.
 *
 *   client_c '<config json>' [rounds]
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "client/seedling_client.h"

static void on_progress(const char* phase, int64_t done, int64_t total, void* user) {
  (void)user;
  fprintf(stderr, "\r%s %lld/%lld   ", phase, (long long)done, (long long)total);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s '<config json>' [rounds]\n", argv[0]);
    return 2;
  }
  char err[512];
  seedling_client* client = seedling_client_create(argv[1], err, sizeof err);
  if (client == NULL) {
    fprintf(stderr, "create: %s\n", err);
    return 1;
  }
  seedling_client_set_conditions(client, /*charging=*/1, /*unmetered=*/1, /*idle=*/1, /*battery=*/0.9f);
  seedling_client_set_progress(client, on_progress, NULL);
  const int rounds = argc > 2 ? atoi(argv[2]) : 1;
  int uploaded = 0, attempts = 0;
  while (uploaded < rounds && attempts++ < 100) {
    seedling_run_result r;
    if (seedling_client_run_once(client, &r) != 0) {
      fprintf(stderr, "\nrun_once: %s\n", seedling_client_last_error(client));
      seedling_client_destroy(client);
      return 1;
    }
    if (r.outcome == SEEDLING_OUTCOME_UPLOADED) {
      ++uploaded;
      printf("round %llu: uploaded %llu bytes, loss %.4f -> %.4f\n", (unsigned long long)r.round_id,
             (unsigned long long)r.update_bytes, r.loss_start, r.loss_end);
    } else if (r.outcome == SEEDLING_OUTCOME_RETRY_LATER) {
      sleep(r.retry_after_seconds < 5 ? r.retry_after_seconds : 5);
    } else if (r.outcome == SEEDLING_OUTCOME_DROPPED) {
      printf("the round closed before the upload; checking in again\n");
    } else {
      printf("outcome %d\n", (int)r.outcome);
      break;
    }
  }
  seedling_client_destroy(client);
  return uploaded == rounds ? 0 : 1;
}
