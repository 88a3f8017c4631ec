// Streaming suggestions: show a suggestion while the server is still generating it.
//
// The server sends `granite/partialCompletion` notifications ({uri, version,
// position, requestId, text, done}) while it answers a
// `textDocument/inlineCompletion` request. VS Code only shows what an inline
// completion provider returns, once, so:
//
//  * the request to the server is decoupled from VS Code's provider call: one
//    request per (document, version, position) runs under our own cancellation
//    token, and provider calls for the same key attach to it;
//  * a provider call returns as soon as there is a partial text newer than the
//    last one returned (as an insertion at the cursor), or the final result;
//  * when a partial arrives while no provider call is waiting, we ask VS Code to
//    ask again, which attaches a new provider call that returns the newest
//    partial at once. VS Code does not ask a provider again for the same
//    position and document version while it shows that provider's answer
//    (`editor.action.inlineSuggest.trigger` alone is a no-op then), so the host
//    hides the suggestion first (`editor.action.inlineSuggest.hide`) and then
//    triggers;
//  * when the final result arrives after a partial was shown, we trigger once
//    more so that VS Code gets the final items (with their range and command).
//
// The request is cancelled when VS Code asks for another key (typing, moving the
// cursor) or when VS Code cancelled its call and did not come back within a
// grace period. Nothing here imports `vscode`, so it can be unit-tested in Node.

export interface Pos {
  line: number;
  character: number;
}

export interface PartialCompletionParams {
  uri: string;
  version?: number | null;
  position: Pos;
  requestId?: number | string;
  text: string;
  done?: boolean;
}

export interface TokenLike {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

export interface TokenSourceLike {
  readonly token: TokenLike;
  cancel(): void;
  dispose(): void;
}

export interface StreamingHost<R> {
  /** A new cancellation token source (vscode.CancellationTokenSource). */
  newTokenSource(): TokenSourceLike;
  /** The result to give VS Code for a partial text at a position. */
  partialResult(text: string, position: Pos): R;
  /** Whether the active editor shows this document at this version with the cursor at `position`. */
  isActiveAt(uri: string, version: number, position: Pos): boolean;
  /** Re-trigger inline suggestions in the active editor. */
  trigger(): void;
  /**
   * The suggestion text a final result shows as a plain insertion at `position`
   * (first item, empty range at the position), if any.
   */
  textOf?(result: R | null | undefined, position: Pos): string | undefined;
  /**
   * What is left of suggestion `prev` at a new document version and position when
   * the user typed its beginning (VS Code keeps showing that rest), if that is
   * what happened.
   */
  carryOver?(prev: Shown, uri: string, version: number, position: Pos): string | undefined;
  /** Called once per completed (not cancelled) request with its time to the final result, in ms. */
  onFinal?(ms: number, result: R | null | undefined): void;
  /** Grace period (ms) before a request whose VS Code call was cancelled is cancelled too. */
  graceMs?: number;
  /** How long (ms) to wait for VS Code to answer a trigger before triggering again. */
  triggerRetryMs?: number;
  log?(message: string): void;
}

/** A suggestion text last returned to VS Code. */
export interface Shown {
  uri: string;
  version: number;
  position: Pos;
  text: string;
}

interface InFlight<R> {
  key: string;
  uri: string;
  version: number;
  position: Pos;
  cts: TokenSourceLike;
  started: number;
  final?: { value: R | null | undefined };
  partial?: string;
  partialSeq: number;
  shownSeq: number;
  waiters: Set<() => void>;
  attached: number;
  /**
   * The rest of the previous suggestion that VS Code still shows because the user
   * typed its start: partials that are a prefix of it would only shorten it.
   */
  baseline?: string;
  /** When we last asked VS Code to ask again (0: no trigger outstanding). */
  triggeredAt: number;
  /** Triggers in a row that VS Code did not answer with a provider call. */
  unansweredTriggers: number;
  /** Whether a provider call returned the final result. */
  finalReturned: boolean;
}

/** A trigger that VS Code did not answer with a provider call within this time is repeated. */
const TRIGGER_RETRY_MS = 1000;
/**
 * Unanswered triggers in a row before giving up. VS Code drops a trigger while it is
 * busy (for instance still rendering the previous partial), so one is not enough, but
 * a request the editor really ignores must not trigger forever.
 */
const MAX_UNANSWERED_TRIGGERS = 5;

export function keyOf(uri: string, version: number, position: Pos): string {
  return `${uri}#${version}@${position.line}:${position.character}`;
}

export class StreamingCompletions<R> {
  private current: InFlight<R> | undefined;
  private lastShown: Shown | undefined;

  constructor(private readonly host: StreamingHost<R>) {}

  /** The provider call (middleware): `next` sends the real request. */
  async provide(
    uri: string,
    version: number,
    position: Pos,
    token: TokenLike,
    next: (token: TokenLike) => PromiseLike<R | null | undefined> | R | null | undefined,
  ): Promise<R | null | undefined> {
    const key = keyOf(uri, version, position);
    let f = this.current;
    if (!f || f.key !== key || (f.final === undefined && f.cts.token.isCancellationRequested)) {
      this.cancelCurrent();
      f = this.start(key, uri, version, position, next);
    }
    const flight = f;
    flight.triggeredAt = 0;
    flight.unansweredTriggers = 0;
    flight.attached++;
    let wake: (() => void) | undefined;
    const cancelSub = token.onCancellationRequested(() => {
      wake?.();
    });
    try {
      for (;;) {
        if (token.isCancellationRequested || (this.current !== flight && flight.final === undefined)) {
          return undefined;
        }
        if (flight.final) {
          flight.shownSeq = flight.partialSeq;
          flight.finalReturned = true;
          this.remember(flight, this.host.textOf?.(flight.final.value, flight.position));
          return flight.final.value;
        }
        if (flight.partial && flight.partialSeq > flight.shownSeq) {
          flight.shownSeq = flight.partialSeq;
          this.remember(flight, flight.partial);
          return this.host.partialResult(flight.partial, flight.position);
        }
        await new Promise<void>((resolve) => {
          wake = resolve;
          flight.waiters.add(resolve);
        });
        if (wake) {
          flight.waiters.delete(wake);
        }
        wake = undefined;
      }
    } finally {
      cancelSub.dispose();
      flight.attached--;
      if (token.isCancellationRequested && flight.final === undefined) {
        this.scheduleAbandonCheck(flight);
      }
    }
  }

  /** A `granite/partialCompletion` notification. */
  onPartial(params: PartialCompletionParams): void {
    const f = this.current;
    if (!f || f.final || !params || typeof params.text !== 'string') {
      return;
    }
    if (params.uri !== f.uri || !params.position) {
      return;
    }
    if (params.position.line !== f.position.line || params.position.character !== f.position.character) {
      return;
    }
    if (typeof params.version === 'number' && params.version !== f.version) {
      return;
    }
    if (params.text === '' || params.text === f.partial) {
      return;
    }
    if (f.baseline !== undefined && f.baseline.startsWith(params.text)) {
      return; // VS Code already shows at least this much
    }
    f.partial = params.text;
    f.partialSeq++;
    if (f.waiters.size > 0) {
      this.wakeAll(f);
    } else if (!params.done) {
      this.maybeTrigger(f);
    }
  }

  /** Cancels the running request (document closed, completions disabled, client stopping). */
  reset(): void {
    this.cancelCurrent();
    this.lastShown = undefined;
  }

  private start(
    key: string,
    uri: string,
    version: number,
    position: Pos,
    next: (token: TokenLike) => PromiseLike<R | null | undefined> | R | null | undefined,
  ): InFlight<R> {
    const f: InFlight<R> = {
      key,
      uri,
      version,
      position: { line: position.line, character: position.character },
      cts: this.host.newTokenSource(),
      started: Date.now(),
      partialSeq: 0,
      shownSeq: 0,
      waiters: new Set(),
      attached: 0,
      triggeredAt: 0,
      unansweredTriggers: 0,
      finalReturned: false,
    };
    const prev = this.lastShown;
    if (prev && this.host.carryOver) {
      const rest = this.host.carryOver(prev, uri, version, position);
      if (rest) {
        f.baseline = rest;
      }
    }
    this.current = f;
    const settle = (value: R | null | undefined, ok: boolean) => {
      if (f.final) {
        return;
      }
      f.final = { value };
      if (ok && !f.cts.token.isCancellationRequested) {
        this.host.onFinal?.(Date.now() - f.started, value);
      }
      if (f.waiters.size > 0) {
        this.wakeAll(f);
      } else if (f.shownSeq > 0 && this.current === f && !f.cts.token.isCancellationRequested) {
        // A partial is on screen: let VS Code fetch the final items.
        this.maybeTrigger(f);
      }
    };
    Promise.resolve()
      .then(() => next(f.cts.token))
      .then(
        (value) => settle(value, true),
        (err) => {
          this.host.log?.(`inline completion request failed: ${err instanceof Error ? err.message : String(err)}`);
          settle(undefined, false);
        },
      );
    return f;
  }

  private remember(f: InFlight<R>, text: string | undefined): void {
    this.lastShown = text ? { uri: f.uri, version: f.version, position: f.position, text } : undefined;
  }

  private wakeAll(f: InFlight<R>): void {
    const waiters = [...f.waiters];
    f.waiters.clear();
    for (const w of waiters) {
      w();
    }
  }

  private maybeTrigger(f: InFlight<R>): void {
    const retryMs = this.host.triggerRetryMs ?? TRIGGER_RETRY_MS;
    if (this.current !== f || (f.triggeredAt !== 0 && Date.now() - f.triggeredAt < retryMs)) {
      return;
    }
    if (!this.host.isActiveAt(f.uri, f.version, f.position)) {
      return;
    }
    const at = Date.now();
    f.triggeredAt = at;
    f.unansweredTriggers++;
    this.host.trigger();
    // VS Code may drop the trigger; if no provider call came and something is still
    // unshown (a newer partial, or the final result after a partial), ask again.
    setTimeout(() => {
      if (this.current !== f || f.triggeredAt !== at || f.unansweredTriggers >= MAX_UNANSWERED_TRIGGERS) {
        return;
      }
      const unshown = f.final ? !f.finalReturned && f.shownSeq > 0 : f.partialSeq > f.shownSeq;
      if (unshown && !f.cts.token.isCancellationRequested) {
        this.host.log?.(`trigger at ${f.key} was not answered; triggering again`);
        f.triggeredAt = 0;
        this.maybeTrigger(f);
      }
    }, retryMs);
  }

  private scheduleAbandonCheck(f: InFlight<R>): void {
    const grace = this.host.graceMs ?? 1000;
    setTimeout(() => {
      if (this.current === f && f.final === undefined && f.attached === 0 && f.triggeredAt === 0) {
        this.host.log?.(`cancelling abandoned request at ${f.key}`);
        this.cancelCurrent();
      }
    }, grace);
  }

  private cancelCurrent(): void {
    const f = this.current;
    this.current = undefined;
    if (!f) {
      return;
    }
    if (f.final === undefined) {
      f.cts.cancel();
    }
    f.cts.dispose();
    this.wakeAll(f);
  }
}
