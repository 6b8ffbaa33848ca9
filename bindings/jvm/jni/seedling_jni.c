/* The JNI side of org.seedling.Client: each native method calls one function of the C interface
 * (client/seedling_client.h). Strings cross as modified UTF-8 from GetStringUTFChars, which equals UTF-8 for
 * every character outside U+0000 and the supplementary planes; the SDK reads JSON, where those are escaped. */
#include <jni.h>
#include <stdint.h>

#include "client/seedling_client.h"

static seedling_client* Handle(jlong handle) { return (seedling_client*)(intptr_t)handle; }

static void ThrowSeedling(JNIEnv* env, const char* message) {
  jclass cls = (*env)->FindClass(env, "org/seedling/SeedlingException");
  if (cls != NULL) (*env)->ThrowNew(env, cls, message);
}

JNIEXPORT jlong JNICALL Java_org_seedling_Client_nativeCreate(JNIEnv* env, jclass cls, jstring config) {
  (void)cls;
  const char* json = (*env)->GetStringUTFChars(env, config, NULL);
  if (json == NULL) return 0; /* OutOfMemoryError is pending */
  char err[1024] = "";
  seedling_client* client = seedling_client_create(json, err, sizeof err);
  (*env)->ReleaseStringUTFChars(env, config, json);
  if (client == NULL) ThrowSeedling(env, err);
  return (jlong)(intptr_t)client;
}

JNIEXPORT void JNICALL Java_org_seedling_Client_nativeDestroy(JNIEnv* env, jclass cls, jlong handle) {
  (void)env;
  (void)cls;
  seedling_client_destroy(Handle(handle));
}

JNIEXPORT jint JNICALL Java_org_seedling_Client_nativeSetConditions(JNIEnv* env, jclass cls, jlong handle,
                                                                    jboolean charging, jboolean unmetered,
                                                                    jboolean idle, jfloat battery) {
  (void)env;
  (void)cls;
  return seedling_client_set_conditions(Handle(handle), charging, unmetered, idle, battery);
}

/* Calls fn(client, text) with the string's bytes; -2 when the JVM could not provide them (an exception is
 * then pending, so the Java side's check never runs). */
static jint WithString(JNIEnv* env, jlong handle, jstring s, int (*fn)(seedling_client*, const char*)) {
  const char* text = (*env)->GetStringUTFChars(env, s, NULL);
  if (text == NULL) return -2;
  const int rc = fn(Handle(handle), text);
  (*env)->ReleaseStringUTFChars(env, s, text);
  return rc;
}

JNIEXPORT jint JNICALL Java_org_seedling_Client_nativeAddExample(JNIEnv* env, jclass cls, jlong handle, jstring row) {
  (void)cls;
  return WithString(env, handle, row, seedling_client_add_example);
}

JNIEXPORT jint JNICALL Java_org_seedling_Client_nativeSetDataPath(JNIEnv* env, jclass cls, jlong handle, jstring path) {
  (void)cls;
  return WithString(env, handle, path, seedling_client_set_data_path);
}

JNIEXPORT jint JNICALL Java_org_seedling_Client_nativeRunOnce(JNIEnv* env, jclass cls, jlong handle, jlongArray counts,
                                                              jdoubleArray losses) {
  (void)cls;
  seedling_run_result r;
  const int rc = seedling_client_run_once(Handle(handle), &r);
  if (rc != 0) return rc;
  const jlong c[4] = {(jlong)r.outcome, (jlong)r.retry_after_seconds, (jlong)r.round_id, (jlong)r.update_bytes};
  const jdouble l[2] = {r.loss_start, r.loss_end};
  (*env)->SetLongArrayRegion(env, counts, 0, 4, c);
  (*env)->SetDoubleArrayRegion(env, losses, 0, 2, l);
  return 0;
}

JNIEXPORT void JNICALL Java_org_seedling_Client_nativeCancel(JNIEnv* env, jclass cls, jlong handle) {
  (void)env;
  (void)cls;
  seedling_client_cancel(Handle(handle));
}

JNIEXPORT jstring JNICALL Java_org_seedling_Client_nativeLastError(JNIEnv* env, jclass cls, jlong handle) {
  (void)cls;
  return (*env)->NewStringUTF(env, seedling_client_last_error(Handle(handle)));
}
