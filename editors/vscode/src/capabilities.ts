// What this client declares to the server about itself, decided apart from VS Code (unit-tested in
// test/capabilities.test.js without it).

/** The key of our streaming extension in `capabilities.experimental` (the server's STREAMING_CAPABILITY). */
export const PARTIAL_COMPLETION = 'granitePartialCompletion';

/**
 * The client's `experimental` capabilities with the partial-completion one declared exactly when the
 * extension shows partial suggestions (`granite.streaming` on). Declared while streaming was off, the
 * server took this client for one that shows partials: it sent none (the setting was off) and held back
 * the early first line it gives clients that do not stream, so a long suggestion showed only once it
 * was complete.
 */
export function experimentalCapabilities(existing: unknown, streaming: boolean): Record<string, unknown> {
  const experimental: Record<string, unknown> = {
    ...(existing !== null && typeof existing === 'object' ? (existing as Record<string, unknown>) : {}),
  };
  if (streaming) {
    experimental[PARTIAL_COMPLETION] = true;
  } else {
    delete experimental[PARTIAL_COMPLETION];
  }
  return experimental;
}
