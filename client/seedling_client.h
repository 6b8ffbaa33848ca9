/* Seedling on-device SDK: the C interface for mobile apps (JNI, Swift, ...).
 *
 *   seedling_client* c = seedling_client_create(config_json, err, sizeof err);
 *   seedling_client_set_conditions(c, charging, unmetered, idle, battery);
 *   seedling_client_add_example(c, "{\"text\": \"...\"}");      or seedling_client_set_data_path(c, path);
 *   seedling_run_result r;
 *   if (seedling_client_run_once(c, &r) != 0) puts(seedling_client_last_error(c));
 *   ... r.outcome, r.retry_after_seconds ...
 *   seedling_client_destroy(c);
 *
 * The config is a JSON object with the keys of seedling::client::ClientConfig (client/client.h): host,
 * port, ca_file, device_id, token, state_dir, model_dir, data_path, memory_budget ("600M"), weights
 * ("q4_0"; default: as the server's task says), weight_cache_dir ...
 * Functions return 0 on success and -1 on error (the message is in seedling_client_last_error). run_once
 * blocks; seedling_client_cancel may be called from any other thread and makes it return soon with
 * SEEDLING_OUTCOME_CANCELLED (called while no run_once runs, it cancels the next one; one cancel stops
 * one run). The progress callback is called on the thread running run_once.
 */
#ifndef SEEDLING_CLIENT_H_
#define SEEDLING_CLIENT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The functions libseedling_client.so exports (it hides every other symbol). */
#if defined(__GNUC__)
#define SEEDLING_API __attribute__((visibility("default")))
#else
#define SEEDLING_API
#endif

typedef struct seedling_client seedling_client;

typedef enum {
  SEEDLING_OUTCOME_UPLOADED = 0,    /* an update was acknowledged by the server */
  SEEDLING_OUTCOME_RETRY_LATER = 1, /* no task now: call again after retry_after_seconds */
  SEEDLING_OUTCOME_DECLINED = 2,    /* a task did not fit the memory budget (or method / model) */
  SEEDLING_OUTCOME_CANCELLED = 3,   /* seedling_client_cancel was called; progress is saved */
  SEEDLING_OUTCOME_DROPPED = 4,     /* the round closed or was aborted before the upload (a straggler), or the
                                       server refused the update: it is discarded; call again */
} seedling_outcome;

typedef struct {
  seedling_outcome outcome;
  uint32_t retry_after_seconds;
  uint64_t round_id;
  double loss_start;
  double loss_end;
  uint64_t update_bytes;
} seedling_run_result;

/* phase: "connecting", "syncing", "training", "uploading". */
typedef void (*seedling_progress_fn)(const char* phase, int64_t done, int64_t total, void* user);

/* Returns NULL on error, with the message copied into err (if err_len > 0). */
SEEDLING_API seedling_client* seedling_client_create(const char* config_json, char* err, size_t err_len);
SEEDLING_API void seedling_client_destroy(seedling_client* client);

SEEDLING_API int seedling_client_set_conditions(seedling_client* client, int charging, int unmetered, int idle,
                                                float battery);
SEEDLING_API int seedling_client_set_data_path(seedling_client* client, const char* path);
SEEDLING_API int seedling_client_add_example(seedling_client* client, const char* json_row);
SEEDLING_API void seedling_client_set_progress(seedling_client* client, seedling_progress_fn fn, void* user);

SEEDLING_API int seedling_client_run_once(seedling_client* client, seedling_run_result* result);
SEEDLING_API void seedling_client_cancel(seedling_client* client);

/* The last error of this client ("" if none). Valid until the next call on the same client. */
SEEDLING_API const char* seedling_client_last_error(const seedling_client* client);

#ifdef __cplusplus
}
#endif

#endif /* SEEDLING_CLIENT_H_ */
