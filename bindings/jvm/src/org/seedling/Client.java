package org.seedling;

/**
 * The Seedling on-device SDK for the JVM (Android apps): a thin layer over the C interface
 * (client/seedling_client.h) through libseedling_jni.so, which links libseedling_client.so.
 *
 * <pre>
 * try (Client client = Client.create(configJson)) {
 *   client.setConditions(true, true, true, 0.9f);
 *   client.addExample("{\"text\": \"...\"}");
 *   Outcome outcome = client.runOnce();   // blocks; cancel() from another thread
 * }
 * </pre>
 *
 * Errors are {@link SeedlingException}s carrying the SDK's message. {@link #runOnce()} runs one at a time;
 * {@link #cancel()} may be called from any thread (while no run is in progress it cancels the next one, as
 * in C). {@link #close()} cancels a run in progress, waits for it to return, then frees the native client;
 * calls after close throw IllegalStateException.
 */
public final class Client implements AutoCloseable {
  static {
    System.loadLibrary("seedling_jni");
  }

  private final Object lifetime = new Object(); // guards handle
  private final Object runs = new Object(); // held while a run uses the handle
  private long handle;

  private Client(long handle) {
    this.handle = handle;
  }

  /** A client from the JSON config of seedling_client_create (client/client_config.h's keys). */
  public static Client create(String configJson) {
    if (configJson == null) throw new NullPointerException("configJson");
    return new Client(nativeCreate(configJson)); // throws SeedlingException with the SDK's message
  }

  /** The device's run conditions, checked before each run (battery in [0, 1]). */
  public void setConditions(boolean charging, boolean unmetered, boolean idle, float battery) {
    synchronized (lifetime) {
      check(nativeSetConditions(open(), charging, unmetered, idle, battery));
    }
  }

  /** Appends one JSON row ({"text": ...} or an instruction row) to the client's own examples. */
  public void addExample(String jsonRow) {
    if (jsonRow == null) throw new NullPointerException("jsonRow");
    synchronized (lifetime) {
      check(nativeAddExample(open(), jsonRow));
    }
  }

  /** Trains on the JSON-lines file at path instead of the added examples. */
  public void setDataPath(String path) {
    if (path == null) throw new NullPointerException("path");
    synchronized (lifetime) {
      check(nativeSetDataPath(open(), path));
    }
  }

  /** One step of the protocol (check in, train, upload); blocks until it is done or cancelled. */
  public Outcome runOnce() {
    synchronized (runs) {
      long h;
      synchronized (lifetime) {
        h = open();
      }
      long[] counts = new long[4];
      double[] losses = new double[2];
      check(nativeRunOnce(h, counts, losses));
      return new Outcome(Outcome.Kind.values()[(int) counts[0]], counts[1], counts[2], losses[0], losses[1], counts[3]);
    }
  }

  /** Makes a running runOnce return CANCELLED soon (or the next one, if none runs). Any thread. */
  public void cancel() {
    synchronized (lifetime) {
      if (handle != 0) nativeCancel(handle);
    }
  }

  @Override
  public void close() {
    synchronized (lifetime) {
      if (handle == 0) return;
      nativeCancel(handle);
    }
    synchronized (runs) {
      synchronized (lifetime) {
        if (handle != 0) nativeDestroy(handle);
        handle = 0;
      }
    }
  }

  private long open() {
    if (handle == 0) throw new IllegalStateException("the client is closed");
    return handle;
  }

  // A failed native call left its message in seedling_client_last_error.
  private void check(int rc) {
    if (rc != 0) throw new SeedlingException(nativeLastError(handle));
  }

  private static native long nativeCreate(String configJson);

  private static native void nativeDestroy(long handle);

  private static native int nativeSetConditions(long handle, boolean charging, boolean unmetered, boolean idle,
      float battery);

  private static native int nativeAddExample(long handle, String jsonRow);

  private static native int nativeSetDataPath(long handle, String path);

  private static native int nativeRunOnce(long handle, long[] counts, double[] losses);

  private static native void nativeCancel(long handle);

  private static native String nativeLastError(long handle);
}
