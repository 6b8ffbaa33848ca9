package org.seedling;

/** What one {@link Client#runOnce()} did: the C interface's seedling_run_result. */
public final class Outcome {
  /** seedling_outcome, in the C interface's order. */
  public enum Kind {
    /** An update was acknowledged by the server. */
    UPLOADED,
    /** No task now: call again after {@link #retryAfterSeconds}. */
    RETRY_LATER,
    /** A task did not fit the memory budget (or the method or model). */
    DECLINED,
    /** {@link Client#cancel()} was called; progress is saved. */
    CANCELLED,
    /** The round closed before the upload, or the server refused the update: call again. */
    DROPPED
  }

  public final Kind kind;
  public final long retryAfterSeconds;
  public final long roundId;
  public final double lossStart;
  public final double lossEnd;
  public final long updateBytes;

  Outcome(Kind kind, long retryAfterSeconds, long roundId, double lossStart, double lossEnd, long updateBytes) {
    this.kind = kind;
    this.retryAfterSeconds = retryAfterSeconds;
    this.roundId = roundId;
    this.lossStart = lossStart;
    this.lossEnd = lossEnd;
    this.updateBytes = updateBytes;
  }

  @Override
  public String toString() {
    return kind + " (round " + roundId + ", loss " + lossStart + " -> " + lossEnd + ", " + updateBytes
        + " bytes, retry after " + retryAfterSeconds + " s)";
  }
}
