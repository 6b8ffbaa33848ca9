import org.seedling.Client;
import org.seedling.Outcome;
import org.seedling.SeedlingException;

/**
 * Host-JVM checks of org.seedling.Client (tests/apps/federation_cli_test.sh, case client-jvm, runs them):
 *   ClientTest bad-config            a bad config throws SeedlingException with the SDK's message
 *   ClientTest cancel CONFIG         cancel() from another thread stops a running runOnce (CANCELLED), a cancel
 *                                    before a run cancels that run, and a closed client refuses calls
 *   ClientTest round CONFIG          runOnce until an update is uploaded; prints "round N: uploaded B bytes"
 * Exits 0 when every check holds, 1 (with the reason) otherwise.
 */
public final class ClientTest {
  private static void require(boolean ok, String what) {
    if (!ok) {
      System.err.println("FAIL: " + what);
      System.exit(1);
    }
  }

  private static void badConfig() {
    String[][] cases = {
      {"not json", "not valid JSON"},
      {"{\"state_dir\": \"/tmp/x\", \"model_dir\": \"/tmp/y\"}", "device_id is required"},
      {"{\"device_id\": \"d\", \"state_dir\": \"/tmp/x\", \"model_dir\": \"/tmp/y\", \"port\": \"80\"}", "'port'"},
    };
    for (String[] c : cases) {
      try {
        Client.create(c[0]).close();
        require(false, "create accepted " + c[0]);
      } catch (SeedlingException e) {
        require(e.getMessage() != null && e.getMessage().contains(c[1]),
            "the message for " + c[0] + " lacks '" + c[1] + "': " + e.getMessage());
      }
    }
    System.out.println("bad-config: ok");
  }

  private static void cancel(String config) throws Exception {
    Client client = Client.create(config);
    try {
      client.setConditions(true, true, true, 0.9f);
      client.cancel(); // no run in progress: the next one is cancelled without connecting
      require(client.runOnce().kind == Outcome.Kind.CANCELLED, "a cancel before runOnce did not cancel it");

      Outcome[] got = new Outcome[1];
      Throwable[] error = new Throwable[1];
      Thread runner = new Thread(() -> {
        try {
          got[0] = client.runOnce();
        } catch (Throwable t) {
          error[0] = t;
        }
      });
      runner.start();
      Thread.sleep(3000); // the round trains for thousands of steps: the run is well under way
      require(runner.isAlive(), "runOnce returned before the cancel: " + got[0] + " " + error[0]);
      long cancelled = System.nanoTime();
      client.cancel();
      runner.join(60_000);
      require(!runner.isAlive(), "runOnce did not return within 60 s of cancel()");
      require(error[0] == null, "runOnce threw " + error[0]);
      require(got[0].kind == Outcome.Kind.CANCELLED, "runOnce returned " + got[0] + " after cancel()");
      System.out.printf("cancel: ok (returned %.1f s after cancel())%n", (System.nanoTime() - cancelled) / 1e9);
    } finally {
      client.close();
    }
    client.close(); // a second close does nothing
    try {
      client.runOnce();
      require(false, "runOnce on a closed client did not throw");
    } catch (IllegalStateException expected) {
      // closed
    }
  }

  private static void round(String config) throws Exception {
    try (Client client = Client.create(config)) {
      client.setConditions(true, true, true, 0.9f);
      for (int attempt = 0; attempt < 60; ++attempt) {
        Outcome o = client.runOnce();
        if (o.kind == Outcome.Kind.UPLOADED) {
          require(o.updateBytes > 0 && o.roundId > 0, "an upload without bytes or round: " + o);
          System.out.println("round " + o.roundId + ": uploaded " + o.updateBytes + " bytes, loss " + o.lossStart
              + " -> " + o.lossEnd);
          return;
        }
        require(o.kind == Outcome.Kind.RETRY_LATER || o.kind == Outcome.Kind.DROPPED, "unexpected outcome " + o);
        Thread.sleep(Math.min(o.retryAfterSeconds, 2) * 1000 + 100);
      }
      require(false, "no upload after 60 attempts");
    }
  }

  public static void main(String[] args) throws Exception {
    require(args.length >= 1, "usage: ClientTest bad-config | cancel CONFIG | round CONFIG");
    switch (args[0]) {
      case "bad-config" -> badConfig();
      case "cancel" -> cancel(args[1]);
      case "round" -> round(args[1]);
      default -> require(false, "unknown mode " + args[0]);
    }
  }
}
