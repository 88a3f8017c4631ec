// Unit tests of the streaming logic (out/streaming.js, no VS Code needed):
//   npm test
const assert = require('node:assert/strict');
const { test } = require('node:test');
const { StreamingCompletions } = require('../out/streaming.js');

class Source {
  constructor() {
    this.cancelled = false;
    this.listeners = [];
    const self = this;
    this.token = {
      get isCancellationRequested() {
        return self.cancelled;
      },
      onCancellationRequested(fn) {
        self.listeners.push(fn);
        return { dispose() {} };
      },
    };
  }
  cancel() {
    if (!this.cancelled) {
      this.cancelled = true;
      for (const fn of this.listeners) fn();
    }
  }
  dispose() {}
}

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const tick = () => sleep(5);
const POS = { line: 3, character: 4 };
const URI = 'file:///a.py';

function setup({ active = true } = {}) {
  const events = { triggers: 0, finals: [], requests: [] };
  const host = {
    newTokenSource: () => new Source(),
    partialResult: (text, position) => ({ partial: text, position }),
    isActiveAt: () => active,
    trigger: () => events.triggers++,
    onFinal: (ms, result) => events.finals.push(result),
    graceMs: 20,
    triggerRetryMs: 20,
  };
  const s = new StreamingCompletions(host);
  const request = () => {
    const d = deferred();
    const req = { d, token: undefined };
    events.requests.push(req);
    return (token) => {
      req.token = token;
      return d.promise;
    };
  };
  return { s, events, request };
}

test('without partials the provider call returns the final result', async () => {
  const { s, events, request } = setup();
  const vs = new Source();
  const p = s.provide(URI, 1, POS, vs.token, request());
  await tick();
  events.requests[0].d.resolve({ items: ['final'] });
  assert.deepEqual(await p, { items: ['final'] });
  assert.equal(events.triggers, 0);
  assert.deepEqual(events.finals, [{ items: ['final'] }]);
});

test('a partial answers a waiting call; later partials re-trigger; the final triggers once more', async () => {
  const { s, events, request } = setup();
  const next = request();
  const p1 = s.provide(URI, 1, POS, new Source().token, next);
  await tick();
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'ret', done: false });
  assert.deepEqual(await p1, { partial: 'ret', position: POS });
  // Nobody waiting: a new partial asks VS Code to ask again.
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'return a', done: false });
  assert.equal(events.triggers, 1);
  // VS Code asks again: the same request serves it, with the newest partial at once.
  const p2 = s.provide(URI, 1, POS, new Source().token, request());
  assert.deepEqual(await p2, { partial: 'return a', position: POS });
  assert.equal(events.requests.length, 2, 'the second next() is not called');
  assert.equal(events.requests[1].token, undefined);
  // The final result arrives with nobody waiting: trigger, and the next call gets it.
  events.requests[0].d.resolve({ items: ['return a + b'] });
  await tick();
  assert.equal(events.triggers, 2);
  const p3 = s.provide(URI, 1, POS, new Source().token, request());
  assert.deepEqual(await p3, { items: ['return a + b'] });
});

test('a trigger VS Code drops is repeated until a call comes, then not again', async () => {
  const { s, events, request } = setup();
  const p1 = s.provide(URI, 1, POS, new Source().token, request());
  await tick();
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'ret', done: false });
  assert.deepEqual(await p1, { partial: 'ret', position: POS });
  // The final result arrives after the partial; VS Code ignores the first triggers.
  events.requests[0].d.resolve({ items: ['return a'] });
  await sleep(70);
  assert.ok(events.triggers >= 2, `triggers: ${events.triggers}`);
  const p2 = s.provide(URI, 1, POS, new Source().token, request());
  assert.deepEqual(await p2, { items: ['return a'] });
  const after = events.triggers;
  await sleep(70);
  assert.equal(events.triggers, after, 'no trigger once the final result was returned');
});

test('an ignored trigger is repeated only a bounded number of times', async () => {
  const { s, events, request } = setup();
  const p1 = s.provide(URI, 1, POS, new Source().token, request());
  await tick();
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'ret', done: false });
  await p1;
  events.requests[0].d.resolve({ items: ['return a'] });
  await sleep(300);
  assert.ok(events.triggers >= 2 && events.triggers <= 5, `triggers: ${events.triggers}`);
});

test('partials for another document, version or position are ignored', async () => {
  const { s, events, request } = setup();
  const p = s.provide(URI, 2, POS, new Source().token, request());
  await tick();
  s.onPartial({ uri: 'file:///b.py', version: 2, position: POS, text: 'x' });
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'x' });
  s.onPartial({ uri: URI, version: 2, position: { line: 3, character: 5 }, text: 'x' });
  assert.equal(events.triggers, 0);
  events.requests[0].d.resolve(null);
  assert.equal(await p, null);
});

test('no trigger when the editor moved on', async () => {
  const { s, events, request } = setup({ active: false });
  const p = s.provide(URI, 1, POS, new Source().token, request());
  await tick();
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'a' });
  await p;
  s.onPartial({ uri: URI, version: 1, position: POS, text: 'ab' });
  assert.equal(events.triggers, 0);
});

test('a call at another key cancels the running request', async () => {
  const { s, events, request } = setup();
  const vs1 = new Source();
  const p1 = s.provide(URI, 1, POS, vs1.token, request());
  await tick();
  const p2 = s.provide(URI, 2, { line: 3, character: 5 }, new Source().token, request());
  await tick();
  assert.equal(events.requests[0].token.isCancellationRequested, true);
  assert.equal(await p1, undefined);
  events.requests[1].d.resolve({ items: ['b'] });
  assert.deepEqual(await p2, { items: ['b'] });
});

/** A provider call that VS Code cancels right after it started: it resolves with nothing. */
async function abandonedCall(s, request) {
  const vs = new Source();
  const p = s.provide(URI, 1, POS, vs.token, request());
  await tick();
  vs.cancel();
  return p;
}

test('a request VS Code gave up on is cancelled after the grace period', async () => {
  const { s, events, request } = setup();
  assert.equal(await abandonedCall(s, request), undefined);
  assert.equal(events.requests[0].token.isCancellationRequested, false);
  await sleep(40);
  assert.equal(events.requests[0].token.isCancellationRequested, true);
});

test('a request re-attached within the grace period keeps running', async () => {
  const { s, events, request } = setup();
  await abandonedCall(s, request);
  const p2 = s.provide(URI, 1, POS, new Source().token, request());
  await sleep(40);
  assert.equal(events.requests[0].token.isCancellationRequested, false);
  events.requests[0].d.resolve({ items: ['x'] });
  assert.deepEqual(await p2, { items: ['x'] });
});

test('a failing request resolves waiting calls with nothing', async () => {
  const { s, events, request } = setup();
  const p = s.provide(URI, 1, POS, new Source().token, request());
  await tick();
  events.requests[0].d.resolve(Promise.reject(new Error('boom')));
  assert.equal(await p, undefined);
  assert.deepEqual(events.finals, []);
});

test('after typing the start of a shown suggestion, partials that would shorten it are not shown', async () => {
  const { events, request } = setup();
  const host2 = {
    newTokenSource: () => new Source(),
    partialResult: (text) => ({ partial: text }),
    isActiveAt: () => true,
    trigger: () => events.triggers++,
    textOf: (result) => result?.items?.[0],
    carryOver: (prev, uri, version, position) =>
      position.character === prev.position.character + 1 ? prev.text.slice(1) : undefined,
    graceMs: 20,
  };
  const t = new StreamingCompletions(host2);
  // A suggestion "return a" is shown at 3:4.
  const p1 = t.provide(URI, 1, POS, new Source().token, request());
  await tick();
  events.requests[0].d.resolve({ items: ['return a'] });
  assert.deepEqual(await p1, { items: ['return a'] });
  // The user types "r": a new request at 3:5; VS Code still shows "eturn a".
  const pos2 = { line: 3, character: 5 };
  const p2 = t.provide(URI, 2, pos2, new Source().token, request());
  await tick();
  t.onPartial({ uri: URI, version: 2, position: pos2, text: 'et' });
  t.onPartial({ uri: URI, version: 2, position: pos2, text: 'eturn' });
  await tick();
  assert.equal(events.triggers, 0);
  // A partial that goes beyond what is shown is shown.
  t.onPartial({ uri: URI, version: 2, position: pos2, text: 'eturn a +' });
  assert.deepEqual(await p2, { partial: 'eturn a +' });
  events.requests[1].d.resolve({ items: ['eturn a + b'] });
  await tick();
  assert.equal(events.triggers, 1);
});
