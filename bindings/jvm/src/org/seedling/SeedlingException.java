package org.seedling;

/** An error from the Seedling SDK, with the SDK's own message (for example "UNAUTHENTICATED: ..."). */
public class SeedlingException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  public SeedlingException(String message) {
    super(message);
  }
}
