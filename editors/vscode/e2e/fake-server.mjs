#!/usr/bin/env node
// A stand-in for granite-lsp that answers from a fixtures file, for testing the
// extension and the e2e harness without a model:
//
//   node fake-server.mjs --stdio --fixtures FILE [--log FILE] [--delay MS]
//
// It speaks just enough LSP: initialize (inlineCompletionProvider, incremental
// sync, executeCommandProvider granite.accepted), work-done progress and
// granite/status while "loading", textDocument/inlineCompletion answered with
// the fixture's middle (or what is left of it when the user typed its start),
// granite/partialCompletion notifications when the client asked for them and
// streaming is on, and granite/stats. Every message it gets is appended to
// --log as one JSON line.
import fs from 'node:fs';

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(name);
  return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
};
const fixturesFile = opt('--fixtures');
const logFile = opt('--log');
const loadDelay = Number(opt('--delay', '300'));
const fixtures = fixturesFile ? JSON.parse(fs.readFileSync(fixturesFile, 'utf8')) : [];

const docs = new Map(); // uri -> {text, version}
let settings = { streaming: true };
let partialCapable = false;
let ready = false;
let accepted = 0;
let requests = 0;

function log(obj) {
  if (logFile) {
    fs.appendFileSync(logFile, JSON.stringify({ t: Date.now(), ...obj }) + '\n');
  }
}

function send(msg) {
  const body = Buffer.from(JSON.stringify({ jsonrpc: '2.0', ...msg }), 'utf8');
  process.stdout.write(`Content-Length: ${body.length}\r\n\r\n`);
  process.stdout.write(body);
}
const notify = (method, params) => send({ method, params });
let nextId = 1;
const request = (method, params) => send({ id: `fake-${nextId++}`, method, params });

function offsetAt(text, pos) {
  let off = 0;
  for (let line = 0; line < pos.line; line++) {
    const nl = text.indexOf('\n', off);
    if (nl < 0) return text.length;
    off = nl + 1;
  }
  return Math.min(off + pos.character, text.length);
}

function applyChange(text, change) {
  if (!change.range) return change.text;
  const start = offsetAt(text, change.range.start);
  const end = offsetAt(text, change.range.end);
  return text.slice(0, start) + change.text + text.slice(end);
}

/** The fixture and the rest of its middle for this document and cursor, or undefined. */
function lookup(text, offset) {
  for (const f of fixtures) {
    const at = offsetAt(f.text, { line: f.line, character: f.character });
    const before = f.text.slice(0, at);
    const after = f.text.slice(at);
    if (!text.startsWith(before) || !text.endsWith(after)) continue;
    const typed = text.slice(before.length, text.length - after.length);
    if (offset !== before.length + typed.length) continue;
    if (!f.middle.startsWith(typed) || typed.length === f.middle.length) continue;
    return { fixture: f, middle: f.middle.slice(typed.length), lineRest: after.split('\n')[0] };
  }
  return undefined;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const cancelled = new Set();

async function inlineCompletion(id, params) {
  requests++;
  const doc = docs.get(params.textDocument.uri);
  if (!doc || !ready) return send({ id, result: { items: [] } });
  const offset = offsetAt(doc.text, params.position);
  const found = lookup(doc.text, offset);
  if (found === undefined) return send({ id, result: { items: [] } });
  const { middle, fixture, lineRest } = found;
  if (partialCapable && settings.streaming !== false) {
    const step = Math.max(1, Math.ceil(middle.length / 4));
    for (let n = step; n < middle.length; n += step) {
      await sleep(150);
      if (cancelled.has(id)) return send({ id, error: { code: -32800, message: 'cancelled' } });
      notify('granite/partialCompletion', {
        uri: params.textDocument.uri,
        version: doc.version,
        position: params.position,
        requestId: id,
        text: middle.slice(0, n),
        done: false,
      });
    }
    await sleep(150);
  }
  if (cancelled.has(id)) return send({ id, error: { code: -32800, message: 'cancelled' } });
  const command = { title: 'accepted', command: 'granite.accepted', arguments: [{ id: String(id) }] };
  // "replaceToLineEnd" fixtures answer the way a server that merges the suggestion
  // with the rest of the line would: the range runs to the end of the line and the
  // insert text ends with that text.
  const item = fixture.replaceToLineEnd
    ? {
        insertText: middle + lineRest,
        range: { start: params.position, end: { line: params.position.line, character: params.position.character + lineRest.length } },
        command,
      }
    : { insertText: middle, range: { start: params.position, end: params.position }, command };
  send({ id, result: { items: [item] } });
}

function handle(msg) {
  log({ in: msg });
  const { id, method, params } = msg;
  switch (method) {
    case 'initialize':
      partialCapable = !!params?.capabilities?.experimental?.granitePartialCompletion;
      settings = { ...settings, ...(params?.initializationOptions ?? {}) };
      return send({
        id,
        result: {
          capabilities: {
            textDocumentSync: { openClose: true, change: 2 },
            inlineCompletionProvider: {},
            executeCommandProvider: { commands: ['granite.accepted'] },
          },
          serverInfo: { name: 'granite-lsp (fake)', version: '0' },
        },
      });
    case 'initialized':
      request('window/workDoneProgress/create', { token: 'load' });
      notify('$/progress', { token: 'load', value: { kind: 'begin', title: 'Loading model', percentage: 0 } });
      notify('granite/status', { state: 'loading', model: settings.model ?? 'fake', device: 'cpu', dtype: 'float32' });
      setTimeout(() => {
        notify('$/progress', { token: 'load', value: { kind: 'report', percentage: 50, message: 'weights' } });
      }, loadDelay / 2);
      setTimeout(() => {
        ready = true;
        notify('$/progress', { token: 'load', value: { kind: 'end' } });
        notify('granite/status', { state: 'ready', model: settings.model ?? 'fake', device: 'cpu', dtype: 'float32' });
      }, loadDelay);
      return;
    case 'shutdown':
      return send({ id, result: null });
    case 'exit':
      process.exit(0);
      return;
    case 'textDocument/didOpen':
      docs.set(params.textDocument.uri, { text: params.textDocument.text, version: params.textDocument.version });
      return;
    case 'textDocument/didChange': {
      const doc = docs.get(params.textDocument.uri);
      if (!doc) return;
      for (const c of params.contentChanges) doc.text = applyChange(doc.text, c);
      doc.version = params.textDocument.version;
      return;
    }
    case 'textDocument/didClose':
      docs.delete(params.textDocument.uri);
      return;
    case 'workspace/didChangeConfiguration':
      settings = { ...settings, ...(params?.settings?.granite ?? {}) };
      return;
    case 'workspace/executeCommand':
      if (params.command === 'granite.accepted') accepted++;
      return send({ id, result: null });
    case 'textDocument/inlineCompletion':
      void inlineCompletion(id, params);
      return;
    case '$/cancelRequest':
      cancelled.add(params.id);
      return;
    case 'granite/stats':
      return send({ id, result: { requests, accepted } });
    default:
      if (id !== undefined && method) {
        return send({ id, error: { code: -32601, message: `unhandled ${method}` } });
      }
  }
}

let buf = Buffer.alloc(0);
process.stdin.on('data', (chunk) => {
  buf = Buffer.concat([buf, chunk]);
  for (;;) {
    const sep = buf.indexOf('\r\n\r\n');
    if (sep < 0) return;
    const m = /Content-Length: *(\d+)/i.exec(buf.subarray(0, sep).toString('ascii'));
    if (!m) throw new Error('bad header');
    const len = Number(m[1]);
    if (buf.length < sep + 4 + len) return;
    const body = buf.subarray(sep + 4, sep + 4 + len).toString('utf8');
    buf = buf.subarray(sep + 4 + len);
    handle(JSON.parse(body));
  }
});
process.stdin.on('end', () => process.exit(0));
