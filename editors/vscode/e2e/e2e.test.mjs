// End-to-end test: the Granite extension in real VS Code (code-server), driven
// through Chromium by Playwright, against the real granite-lsp server and the
// tiny fixture model.
//
//   bash editors/vscode/e2e/setup.sh     # once: apt packages, npm installs, .vsix
//   bash editors/vscode/e2e/run.sh       # this test
//
// Environment:
//   GRANITE_E2E_SERVER    server executable (default <repo>/.venv/bin/granite-lsp)
//   GRANITE_E2E_ARGS      its arguments, JSON array (default ["--stdio","--model","<repo>/model/tiny"])
//   GRANITE_E2E_SERVER_CMD  the whole server command line as a JSON array (overrides the two above)
//   GRANITE_E2E_FIXTURES  fixtures JSON (default <repo>/model/tiny/fixtures.json)
//   GRANITE_E2E_FAKE=1    use fake-server.mjs + fake-fixtures.json instead (tests the harness)
//   GRANITE_E2E_CASES     how many fixtures to drive, from the first (default 2; "all").
//                         The first half run with granite.streaming off and are triggered
//                         with Alt+\; the second half turn streaming on in the Settings
//                         editor, trigger with Alt+\, then type the first character of
//                         the suggestion.
//   GRANITE_E2E_TRIGGER   force one mode for all cases: invoke | type | invoke-type
//   GRANITE_E2E_READY_TIMEOUT_S  how long to wait for the model to load (default 600)
//   GRANITE_E2E_KEEP=1    keep the temporary directory
//   GRANITE_E2E_HUB       URL of a stand-in Hugging Face hub (tests/hub_standin.py) serving the tiny
//                         model as GRANITE_E2E_HUB_MODEL: runs the "Download model" test instead (the
//                         server starts with that id and an empty Hugging Face cache)
//   CHROMIUM              browser executable (default /usr/bin/chromium)
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const EXT_DIR = path.resolve(HERE, '..');
const REPO = path.resolve(EXT_DIR, '..', '..');
const ARTIFACTS = path.join(REPO, 'artifacts');
const VSIX = path.join(EXT_DIR, 'granite-vscode.vsix');
const CODE_SERVER = path.join(HERE, 'node_modules', 'code-server', 'out', 'node', 'entry.js');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const FAKE = process.env.GRANITE_E2E_FAKE === '1';
const READY_TIMEOUT = Number(process.env.GRANITE_E2E_READY_TIMEOUT_S || 600) * 1000;
const GHOST_TIMEOUT = Number(process.env.GRANITE_E2E_GHOST_TIMEOUT_S || 120) * 1000;
const N_CASES = process.env.GRANITE_E2E_CASES === 'all' ? Infinity : Number(process.env.GRANITE_E2E_CASES || 2);

const SERVER_CMD = process.env.GRANITE_E2E_SERVER_CMD ? JSON.parse(process.env.GRANITE_E2E_SERVER_CMD) : undefined;
const SERVER = FAKE
  ? process.execPath
  : SERVER_CMD?.[0] || process.env.GRANITE_E2E_SERVER || path.join(REPO, '.venv', 'bin', 'granite-lsp');
const FIXTURES = FAKE
  ? path.join(HERE, 'fake-fixtures.json')
  : process.env.GRANITE_E2E_FIXTURES || path.join(REPO, 'model', 'tiny', 'fixtures.json');

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'granite-vscode-e2e-'));
const dirs = {
  home: path.join(tmp, 'home'),
  data: path.join(tmp, 'data'),
  exts: path.join(tmp, 'extensions'),
  ws: path.join(tmp, 'workspace'),
};
const fakeLog = path.join(tmp, 'fake-server.jsonl');
const HUB = process.env.GRANITE_E2E_HUB || '';
const HUB_MODEL = process.env.GRANITE_E2E_HUB_MODEL || 'ibm-granite/granite-4.0-h-350m-base';
const SERVER_ARGS = HUB
  ? ['--stdio', '--model', HUB_MODEL, '--device', 'cpu', '--dtype', 'float32']
  : FAKE
  ? [path.join(HERE, 'fake-server.mjs'), '--stdio', '--fixtures', FIXTURES, '--log', fakeLog, '--delay', '1500']
  : SERVER_CMD
    ? SERVER_CMD.slice(1)
    : process.env.GRANITE_E2E_ARGS
      ? JSON.parse(process.env.GRANITE_E2E_ARGS)
      : ['--stdio', '--model', path.join(REPO, 'model', 'tiny')];

const env = {
  ...process.env,
  HOME: dirs.home,
  XDG_CONFIG_HOME: path.join(dirs.home, '.config'),
  XDG_DATA_HOME: path.join(dirs.home, '.local', 'share'),
  XDG_CACHE_HOME: path.join(dirs.home, '.cache'),
  XDG_STATE_HOME: path.join(dirs.home, '.local', 'state'),
  // The kernels the test suite already built (the server's default cache, before HOME moved): an
  // empty cache would compile them again here, a minute or more on 2 cores.
  GRANITE_LSP_KERNEL_CACHE:
    process.env.GRANITE_LSP_KERNEL_CACHE ||
    path.join(process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'granite-lsp', 'kernels'),
  // The model must already be on disk: never let the server reach for the hub.
  HF_HUB_OFFLINE: '1',
  TRANSFORMERS_OFFLINE: '1',
  HF_HOME: process.env.HF_HOME || path.join(os.homedir(), '.cache', 'huggingface'),
};
if (HUB) {
  // No model anywhere: an empty Hugging Face cache, and the hub is the stand-in on 127.0.0.1.
  delete env.HF_HUB_OFFLINE;
  delete env.TRANSFORMERS_OFFLINE;
  env.HF_HOME = path.join(tmp, 'hf-empty');
  env.HF_ENDPOINT = HUB;
  env.HF_HUB_DISABLE_TELEMETRY = '1';
}
delete env.VSCODE_IPC_HOOK_CLI;

let codeServer;
let codeServerOut = '';
let browser;
let page;
let baseUrl;

const t0 = Date.now();
const stamp = () => `[e2e +${((Date.now() - t0) / 1000).toFixed(1)}s]`;
const say = (...a) => console.log(stamp(), ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitFor(what, fn, timeoutMs, intervalMs = 250) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) {
      throw new Error(`timed out after ${Math.round(timeoutMs / 1000)}s waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await sleep(intervalMs);
  }
}

function offsetAt(text, line, character) {
  let off = 0;
  for (let l = 0; l < line; l++) {
    const nl = text.indexOf('\n', off);
    assert.ok(nl >= 0, `fixture line ${line} is past the end of the text`);
    off = nl + 1;
  }
  return off + character;
}

/** Files whose name matches `re` under `dir`, recursively. */
function findFiles(dir, re, out = []) {
  let entries = [];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of entries) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) findFiles(p, re, out);
    else if (re.test(e.name)) out.push(p);
  }
  return out;
}

function tail(text, n = 6000) {
  return text.length > n ? '…' + text.slice(-n) : text;
}

/** The extension's output channels ("Granite", "Granite Trace") as written by the extension host. */
function extensionLogs() {
  return findFiles(tmp, /Granite.*\.log$/).map((f) => ({ file: f, text: fs.readFileSync(f, 'utf8') }));
}

async function dumpDiagnostics(label) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  console.log(`\n========== diagnostics (${label}) ==========`);
  if (page) {
    const shot = path.join(ARTIFACTS, 'vscode-e2e-failure.png');
    await page.screenshot({ path: shot }).catch(() => {});
    console.log(`screenshot: ${shot}`);
    const statusBar = await page
      .locator('.statusbar-item')
      .allInnerTexts()
      .catch(() => []);
    console.log(`status bar: ${JSON.stringify(statusBar.filter((s) => s.trim()))}`);
    const notes = await page
      .locator('.notification-toast')
      .allInnerTexts()
      .catch(() => []);
    if (notes.length) console.log(`notifications: ${JSON.stringify(notes)}`);
    const ghosts = await page
      .evaluate(() =>
        [...document.querySelectorAll('[class*="ghost"]')].map((e) => {
          const chain = [];
          for (let p = e.parentElement; p && chain.length < 4; p = p.parentElement) chain.push(`${p.tagName}.${String(p.className).replace(/ /g, '.')}`);
          return `<${e.tagName} class="${e.className}"> ${JSON.stringify(e.textContent)} in ${chain.join(' < ')}`;
        }),
      )
      .catch(() => []);
    if (ghosts.length) console.log(`ghost-text elements:\n  ${ghosts.join('\n  ')}`);
  }
  for (const { file, text } of extensionLogs()) {
    console.log(`---------- ${path.relative(tmp, file)} ----------\n${tail(text, 12000)}`);
  }
  const exthost = findFiles(tmp, /^(exthost|remoteexthost)\.log$/);
  for (const f of exthost) {
    console.log(`---------- ${path.relative(tmp, f)} ----------\n${tail(fs.readFileSync(f, 'utf8'), 4000)}`);
  }
  if (FAKE && fs.existsSync(fakeLog)) {
    console.log(`---------- fake server log ----------\n${tail(fs.readFileSync(fakeLog, 'utf8'), 4000)}`);
  }
  console.log(`---------- code-server output ----------\n${tail(codeServerOut, 4000)}`);
  console.log(`temporary directory kept: ${tmp}`);
  process.env.GRANITE_E2E_KEEP = '1';
}

function codeServerArgs(extra) {
  return [
    CODE_SERVER,
    '--user-data-dir',
    dirs.data,
    '--extensions-dir',
    dirs.exts,
    '--disable-telemetry',
    '--disable-update-check',
    ...extra,
  ];
}

function writeUserSettings() {
  const settings = {
    // the extension under test
    'granite.serverPath': SERVER,
    'granite.serverArgs': SERVER_ARGS,
    'granite.device': 'cpu',
    'granite.streaming': false,
    'granite.trace.server': 'verbose',
    // a quiet workbench
    'workbench.startupEditor': 'none',
    'workbench.tips.enabled': false,
    'workbench.enableExperiments': false,
    'workbench.welcomePage.walkthroughs.openOnInstall': false,
    'workbench.secondarySideBar.defaultVisibility': 'hidden',
    'security.workspace.trust.enabled': false,
    'telemetry.telemetryLevel': 'off',
    'update.mode': 'none',
    'extensions.autoCheckUpdates': false,
    'extensions.autoUpdate': false,
    'extensions.ignoreRecommendations': true,
    'chat.commandCenter.enabled': false,
    'git.enabled': false,
    'window.restoreWindows': 'none',
    // the editor must insert exactly what the test types and accepts
    'editor.quickSuggestions': { other: 'off', comments: 'off', strings: 'off' },
    'editor.suggestOnTriggerCharacters': false,
    'editor.wordBasedSuggestions': 'off',
    'editor.parameterHints.enabled': false,
    'editor.autoClosingBrackets': 'never',
    'editor.autoClosingQuotes': 'never',
    'editor.autoSurround': 'never',
    'editor.autoIndent': 'none',
    'editor.formatOnType': false,
    'editor.formatOnSave': false,
    'editor.inlineSuggest.enabled': true,
    'editor.accessibilitySupport': 'off',
    'files.insertFinalNewline': false,
    'files.trimTrailingWhitespace': false,
    'files.trimFinalNewlines': false,
    'files.autoSave': 'off',
  };
  const file = path.join(dirs.data, 'User', 'settings.json');
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(settings, null, 2));
  return file;
}

/** Sets a boolean user setting in the Settings editor, as a user would. */
async function setBooleanSetting(key, value) {
  await page.keyboard.press('Control+Shift+P');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 15_000 });
  await input.fill('>Preferences: Open User Settings');
  await waitFor(
    'the "Preferences: Open User Settings" command',
    async () => /Open User Settings$/m.test(await page.locator('.quick-input-list .monaco-list-row').first().innerText()),
    15_000,
  );
  await page.keyboard.press('Enter');
  // The Settings editor opens with its search box focused.
  await page.locator('.settings-editor .settings-body').waitFor({ timeout: 30_000 });
  await sleep(1000);
  await page.keyboard.press('Control+A');
  await page.keyboard.type(key, { delay: 10 });
  const checkbox = page.locator('.settings-editor .setting-item-bool .setting-value-checkbox').first();
  await checkbox.waitFor({ timeout: 30_000 });
  const checked = (await checkbox.getAttribute('aria-checked')) === 'true';
  if (checked !== value) await checkbox.click();
  await waitFor(`${key} to be ${value} in the Settings editor`, async () => (await checkbox.getAttribute('aria-checked')) === String(value), 10_000);
  await page.keyboard.press('Control+Shift+P');
  await input.waitFor({ state: 'visible', timeout: 15_000 });
  await input.fill('>View: Close All Editors');
  await sleep(300);
  await page.keyboard.press('Enter');
  await input.waitFor({ state: 'hidden', timeout: 15_000 }).catch(() => {});
}

before(async () => {
  assert.ok(fs.existsSync(CODE_SERVER), `code-server is not installed (${CODE_SERVER}); run editors/vscode/e2e/setup.sh`);
  assert.ok(fs.existsSync(VSIX), `${VSIX} is missing; run editors/vscode/e2e/setup.sh (or npm run package in editors/vscode)`);
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing; run editors/vscode/e2e/setup.sh`);
  assert.ok(fs.existsSync(SERVER), `server ${SERVER} is missing`);
  assert.ok(fs.existsSync(FIXTURES), `fixtures ${FIXTURES} are missing`);
  for (const d of Object.values(dirs)) fs.mkdirSync(d, { recursive: true });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  for (const f of fs.readdirSync(ARTIFACTS)) {
    if (/^vscode-(ghost-text|e2e-)/.test(f)) fs.rmSync(path.join(ARTIFACTS, f), { force: true });
  }
  say(`temporary directory ${tmp}`);
  say(`server: ${SERVER} ${SERVER_ARGS.join(' ')}`);

  // Install the extension from the .vsix, as a user would.
  const inst = spawnSync(process.execPath, codeServerArgs(['--install-extension', VSIX, '--force']), {
    env,
    encoding: 'utf8',
    timeout: 120_000,
  });
  assert.equal(inst.status, 0, `code-server --install-extension failed:\n${inst.stdout}\n${inst.stderr}`);
  const installed = fs.readdirSync(dirs.exts).filter((d) => d.startsWith('granite-lsp.granite-vscode'));
  assert.ok(installed.length === 1, `extension not in ${dirs.exts}: ${fs.readdirSync(dirs.exts)}\n${inst.stdout}`);
  say(`installed ${installed[0]}`);
  writeUserSettings();

  const port = await freePort();
  baseUrl = `http://127.0.0.1:${port}`;
  codeServer = spawn(
    process.execPath,
    codeServerArgs([
      '--auth',
      'none',
      '--bind-addr',
      `127.0.0.1:${port}`,
      '--disable-workspace-trust',
      '--disable-getting-started-override',
      '--ignore-last-opened',
      dirs.ws,
    ]),
    { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true },
  );
  const collect = (b) => {
    codeServerOut += b.toString();
    if (codeServerOut.length > 200_000) codeServerOut = codeServerOut.slice(-100_000);
  };
  codeServer.stdout.on('data', collect);
  codeServer.stderr.on('data', collect);
  codeServer.on('exit', (code, sig) => say(`code-server exited (${code ?? sig})`));
  // Never leave code-server (and the extension host and granite-lsp under it) behind.
  process.on('exit', () => {
    try {
      if (codeServer.exitCode === null) process.kill(-codeServer.pid, 'SIGKILL');
    } catch {
      // gone
    }
  });
  for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => process.exit(130));
  await waitFor(
    'code-server to listen',
    async () => {
      if (codeServer.exitCode !== null) throw new Error(`code-server exited:\n${codeServerOut}`);
      const r = await fetch(`${baseUrl}/healthz`);
      return r.ok;
    },
    60_000,
    300,
  );
  say(`code-server listening on ${baseUrl}`);

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  page = await context.newPage();
  page.on('pageerror', (err) => say(`page error: ${err.message}`));
});

after(async () => {
  await browser?.close().catch(() => {});
  if (codeServer && codeServer.exitCode === null) {
    try {
      process.kill(-codeServer.pid, 'SIGTERM'); // its process group: the server, extension host, granite-lsp
    } catch {
      codeServer.kill('SIGTERM');
    }
    await sleep(1000);
    try {
      process.kill(-codeServer.pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  // Copy the LSP trace (the exact messages VS Code and the server exchanged) next to the screenshot.
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  for (const { file, text } of extensionLogs()) {
    const name = /Trace/.test(path.basename(file)) ? 'vscode-e2e-lsp-trace.log' : 'vscode-e2e-granite.log';
    if (text) fs.writeFileSync(path.join(ARTIFACTS, name), text);
  }
  if (process.env.GRANITE_E2E_KEEP !== '1') {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

/** The text of the Granite status bar item. */
async function graniteStatus() {
  const texts = await page.locator('.statusbar-item').allInnerTexts();
  return texts.map((s) => s.trim()).find((s) => s.startsWith('Granite')) ?? '';
}

/** Ghost text on screen: the inline part on the cursor line, then the lines below it. */
async function ghostText() {
  return page.evaluate(() => {
    const editor = document.querySelector('.editor-instance .monaco-editor, .monaco-editor');
    if (!editor) return '';
    const inline = [...editor.querySelectorAll('.view-lines .ghost-text-decoration')].map((e) => e.textContent).join('');
    // Lines after the first: VS Code 1.100 renders them in a view zone,
    // ".suggest-preview-text > .view-line" (spans ".ghost-text"); other versions
    // use ".ghost-text-decoration-preview" decorations.
    const below = [...editor.querySelectorAll('.suggest-preview-text .view-line')].map((e) => e.textContent);
    const preview = [...editor.querySelectorAll('.ghost-text-decoration-preview')].map((e) => e.textContent);
    return [inline, ...(below.length ? below : preview)].join('\n').replace(/\u00a0/g, ' ');
  });
}

const norm = (s) => s.replace(/\u00a0/g, ' ').replace(/\s+/g, ' ').trim();

async function openFile(rel) {
  // Quick Open (Ctrl+P), type the name, Enter.
  await page.locator('.monaco-workbench').click({ position: { x: 700, y: 400 } }).catch(() => {});
  await page.keyboard.press('Control+P');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 30_000 });
  await input.fill(rel);
  await waitFor(
    `quick open to list ${rel}`,
    async () => (await page.locator('.quick-input-list .monaco-list-row').first().innerText()).includes(path.basename(rel)),
    30_000,
  );
  await page.keyboard.press('Enter');
  await page.locator(`.tab[data-resource-name="${path.basename(rel)}"], .tab:has-text("${path.basename(rel)}")`).first()
    .waitFor({ timeout: 30_000 });
  await page.locator('.editor-instance .monaco-editor .view-lines').first().waitFor({ timeout: 30_000 });
}

async function gotoPosition(line, character) {
  // Go to Line/Column: VS Code columns are 1-based UTF-16 offsets, like LSP characters + 1.
  await page.keyboard.press('Control+G');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 15_000 });
  await input.fill(`:${line + 1}:${character + 1}`);
  await sleep(200);
  await page.keyboard.press('Enter');
  await input.waitFor({ state: 'hidden', timeout: 15_000 });
}

/** Waits for the ghost text to read `want` (whitespace-normalized); Alt+\ every few seconds while none shows. */
async function waitForGhost(index, want, { retrigger }) {
  const wantAll = norm(want);
  const wantFirst = norm(want.split('\n')[0]);
  let lastTrigger = retrigger ? 0 : Date.now();
  let triggers = 0;
  let seen = '';
  const states = new Set();
  await waitFor(
    `ghost text ${JSON.stringify(want)}`,
    async () => {
      seen = await ghostText();
      if (seen) states.add(seen);
      if (norm(seen) === wantAll) {
        // Stable? (a request still running could replace it)
        await sleep(500);
        seen = await ghostText();
        return norm(seen) === wantAll;
      }
      if (!seen && Date.now() - lastTrigger > (retrigger ? 6000 : 15000)) {
        // Nothing shown: ask again. VS Code does not ask a provider twice for the same
        // document version and position, so change the version first (type a space and
        // delete it), then Alt+\ (Trigger Inline Suggestion).
        lastTrigger = Date.now();
        if (triggers++ > 0) {
          say(`case ${index}: no ghost text yet, asking again`);
          await page.keyboard.type(' ');
          await page.keyboard.press('Backspace');
        }
        await page.keyboard.press('Alt+Backslash');
      }
      return false;
    },
    GHOST_TIMEOUT,
    150,
  ).catch((err) => {
    err.message += `\nlast ghost text seen: ${JSON.stringify(seen)}`;
    if (seen && norm(seen).startsWith(wantFirst)) err.message += ' (its first line matches)';
    throw err;
  });
  say(`case ${index}: ghost text ${JSON.stringify(seen)}${states.size > 1 ? ` (grew through ${states.size} states)` : ''}`);
  return seen;
}

const caseFile = (fx, index) => `case${index}-${path.basename(fx.file || `fixture${index}.txt`)}`;

async function runFixture(fx, index, { trigger }) {
  const rel = caseFile(fx, index);
  const file = path.join(dirs.ws, rel);
  const off = offsetAt(fx.text, fx.line, fx.character);
  const expected = fx.text.slice(0, off) + fx.middle + fx.text.slice(off);
  say(`case ${index}: ${rel} at ${fx.line}:${fx.character}, trigger=${trigger}, middle=${JSON.stringify(fx.middle)}`);

  await openFile(rel);
  await gotoPosition(fx.line, fx.character);

  // Modes: "invoke": Alt+\ (Trigger Inline Suggestion); "type": type the first
  // character of the middle (VS Code asks automatically); "invoke-type": Alt+\,
  // then type the first character of the shown suggestion, which must keep it.
  const first = fx.middle.slice(0, 1);
  const typeable = first !== '' && !/\s/.test(first);
  let typed = '';
  if (trigger === 'type' && typeable) {
    typed = first;
    await page.keyboard.type(typed, { delay: 50 });
  }
  let seen = await waitForGhost(index, fx.middle.slice(typed.length), { retrigger: !typed });
  if (trigger === 'invoke-type' && typeable) {
    typed = first;
    await page.keyboard.type(typed, { delay: 50 });
    seen = await waitForGhost(index, fx.middle.slice(typed.length), { retrigger: false });
  }
  void seen;

  if (index === 0) {
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, 'vscode-ghost-text.png') });
    say(`screenshot ${path.join(ARTIFACTS, 'vscode-ghost-text.png')}`);
  } else {
    await page.screenshot({ path: path.join(ARTIFACTS, `vscode-ghost-text-${index}.png`) });
  }

  await page.keyboard.press('Tab');
  await sleep(300);
  await page.keyboard.press('Control+S');
  let onDisk = '';
  await waitFor(
    `${rel} on disk to equal the text with the middle inserted`,
    () => {
      onDisk = fs.readFileSync(file, 'utf8');
      return onDisk === expected;
    },
    15_000,
  ).catch((err) => {
    err.message += `\nexpected: ${JSON.stringify(expected)}\non disk:  ${JSON.stringify(onDisk)}`;
    throw err;
  });
  say(`case ${index}: accepted and saved`);
  // Close the editor so the next case starts clean.
  await page.keyboard.press('Control+Shift+P');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 15_000 });
  await input.fill('>View: Close All Editors');
  await sleep(300);
  await page.keyboard.press('Enter');
  await input.waitFor({ state: 'hidden', timeout: 15_000 }).catch(() => {});
}

/**
 * An invoked request (Alt+\\) answers several candidates: Alt+] (Show Next Inline Suggestion) shows
 * another one, Alt+[ the first again; Escape hides it.
 */
const cycleFile = (fx) => 'cycle-' + path.basename(fx.file || 'fixture.txt');

async function checkCycling(fx) {
  const rel = cycleFile(fx);
  await openFile(rel);
  await gotoPosition(fx.line, fx.character);
  const first = norm(await waitForGhost('cycle', fx.middle, { retrigger: true }));
  let second = '';
  await page.keyboard.press('Alt+BracketRight');
  await waitFor(
    'Alt+] to show another suggestion',
    async () => {
      second = norm(await ghostText());
      return second !== '' && second !== first;
    },
    60_000,
    150,
  ).catch((err) => {
    err.message += `\nfirst: ${JSON.stringify(first)}, last seen: ${JSON.stringify(second)}`;
    throw err;
  });
  say(`cycling: Alt+] shows ${JSON.stringify(second)} after ${JSON.stringify(first)}`);
  await page.keyboard.press('Alt+BracketLeft');
  await waitFor('Alt+[ to show the first suggestion again', async () => norm(await ghostText()) === first, 30_000, 150);
  say('cycling: Alt+[ shows the first again');
  await page.keyboard.press('Escape');
  await runCommand('View: Close All Editors');
}

const SECRET = 'MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu';

/**
 * The files the checks after the fixtures open. Written before the window opens: Quick Open's file index
 * may not list a file created while the window is up (a CI run waited 30 s for focus_jobs.py in vain).
 */
function writeCheckFiles() {
  fs.writeFileSync(path.join(dirs.ws, 'server-key.pem'), `-----BEGIN PRIVATE KEY-----\n${SECRET}\n`);
  fs.writeFileSync(path.join(dirs.ws, 'after_secret.py'), 'value = 1\n');
  const lines = [];
  for (let i = 0; i < 40; i++) lines.push(`def job_${i}(x):`, `    return x * ${i} + ${i % 7}`, '');
  fs.writeFileSync(path.join(dirs.ws, 'focus_jobs.py'), lines.join('\n'));
}

async function checkExcluded() {
  const trace = () =>
    extensionLogs()
      .filter(({ file }) => /Trace/.test(file))
      .map(({ text }) => text)
      .join('\n');
  await openFile('server-key.pem');
  await gotoPosition(1, 10);
  await page.keyboard.press('Alt+Backslash');
  await sleep(1500);
  await openFile('after_secret.py');
  await waitFor('the trace to show after_secret.py opened', () => trace().includes('after_secret.py'), 60_000, 500);
  const text = trace();
  assert.ok(!text.includes('server-key.pem'), 'an excluded file was named in the LSP traffic');
  assert.ok(!text.includes(SECRET), 'an excluded file\'s text reached the server');
  say('granite.exclude: server-key.pem never reached the server');
}

async function runCommand(title) {
  await page.keyboard.press('Control+Shift+P');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 15_000 });
  await input.fill(`>${title}`);
  await waitFor(
    `the "${title}" command`,
    async () => (await page.locator('.quick-input-list .monaco-list-row').first().innerText()).includes(title),
    15_000,
  );
  await page.keyboard.press('Enter');
}

/**
 * Numbers from the server's statistics (granite/stats), through "Granite: Show Server Statistics" and the
 * log: `patterns` maps a name to a regex whose first group is the number. `refocus` gives the editor the
 * keyboard back after the command: 'click' clicks into it (the cursor moves), 'keys' (Ctrl+1) does not.
 */
async function serverStats(patterns, refocus = 'click') {
  const seen = extensionLogs().map(({ text }) => text.split('stats: ').length).reduce((a, b) => a + b, 0);
  await runCommand('Granite: Show Server Statistics');
  let found;
  await waitFor(
    'the statistics in the log',
    () => {
      const logs = extensionLogs().map(({ text }) => text);
      if (logs.map((t) => t.split('stats: ').length).reduce((a, b) => a + b, 0) <= seen) return false;
      const last = logs.join('\n').split('stats: ').pop();
      found = Object.fromEntries(Object.entries(patterns).map(([name, re]) => [name, Number(re.exec(last)?.[1])]));
      return Object.values(found).every(Number.isFinite);
    },
    30_000,
    500,
  );
  if (refocus === 'keys') await page.keyboard.press('Control+1');
  else await page.locator('.editor-instance .monaco-editor .view-lines').first().click().catch(() => {});
  return found;
}

/** The server's request counter (granite/stats). */
async function serverRequests() {
  return (await serverStats({ requests: /"requests": (\d+)/ })).requests;
}

async function askAndCount(line, character) {
  await gotoPosition(line, character);
  await page.keyboard.press('Alt+Backslash');
  await sleep(2500);
  return serverRequests();
}

/**
 * granite/focus (issue 15): a jump with Go to Line (no typing, so no request) makes the server work ahead
 * there, and the request the user then makes at that place finds its prompt processed: the cache
 * processes no token for it. Statistics are read with the keyboard giving the editor back (a click would
 * move the cursor, which is itself a focus).
 */
async function checkFocus() {
  const patterns = {
    requests: /"requests": (\d+)/,
    completed: /"background": \{[^}]*"completed": (\d+)/,
    processed: /"cache": \{[^}]*"tokens_processed": (\d+)/,
  };
  const start = await serverStats(patterns, 'keys');
  await openFile('focus_jobs.py');
  await gotoPosition(100, 0);
  await sleep(4000);
  const ahead = await serverStats(patterns, 'keys');
  assert.ok(ahead.completed > start.completed, `no work ahead after the jump: ${JSON.stringify({ start, ahead })}`);
  assert.equal(ahead.requests, start.requests, 'a jump sent a completion request');
  await page.keyboard.press('Alt+Backslash');
  await sleep(2500);
  const asked = await serverStats(patterns, 'keys');
  assert.ok(asked.requests > ahead.requests, 'Alt+\\ sent no request');
  assert.equal(asked.processed, ahead.processed, 'the request after the worked-ahead jump processed prompt tokens');
  say(`granite/focus: work ahead after the jump (${ahead.completed - start.completed} done), the request there processed 0 tokens`);
}

async function checkToggles() {
  await openFile('after_secret.py');
  const start = await askAndCount(0, 9);
  await runCommand('Granite: Toggle Completions for This Language');
  await waitFor('the status bar to say off for python', async () => /off for python/.test(await graniteStatus()), 30_000);
  assert.equal(await askAndCount(0, 9), start, 'a request was sent for a language switched off');
  await runCommand('Granite: Toggle Completions for This Language');
  await waitFor('python back on', async () => !/off for python/.test(await graniteStatus()), 30_000);
  const back = await askAndCount(0, 9);
  assert.ok(back > start, 'no request after switching the language back on');
  say('per-language toggle: no request while off, requests again when on');

  await runCommand('Granite: Snooze Completions');
  await page.locator('.quick-input-list .monaco-list-row', { hasText: 'Snooze for 5 minutes' }).first().click();
  await waitFor('the status bar to say snoozed', async () => /snoozed until/.test(await graniteStatus()), 30_000);
  assert.equal(await askAndCount(0, 9), back, 'a request was sent while snoozed');
  await runCommand('Granite: Snooze Completions');
  await page.locator('.quick-input-list .monaco-list-row', { hasText: 'Resume now' }).first().click();
  await waitFor('the snooze to end', async () => !/snoozed/.test(await graniteStatus()), 30_000);
  assert.ok((await askAndCount(0, 9)) > back, 'no request after the snooze ended');
  say('snooze: no request while snoozed, requests again after');
}

test('ghost text from granite-lsp in VS Code (code-server), accepted with Tab', { timeout: READY_TIMEOUT + 15 * 60_000, skip: Boolean(HUB) }, async () => {
  const fixtures = JSON.parse(fs.readFileSync(FIXTURES, 'utf8'));
  assert.ok(Array.isArray(fixtures) && fixtures.length > 0, `no fixtures in ${FIXTURES}`);
  const n = Math.min(N_CASES, fixtures.length);
  // Written before the window opens, so Quick Open's file index has them all.
  for (let i = 0; i < n; i++) fs.writeFileSync(path.join(dirs.ws, caseFile(fixtures[i], i)), fixtures[i].text);
  const single = fixtures.find((f) => f.middle && !f.middle.includes('\n'));
  if (single) fs.writeFileSync(path.join(dirs.ws, cycleFile(single)), single.text);
  writeCheckFiles();
  try {
    await page.goto(`${baseUrl}/?folder=${encodeURIComponent(dirs.ws)}`, { waitUntil: 'domcontentloaded' });
    await page.locator('.monaco-workbench').waitFor({ timeout: 120_000 });
    say('workbench loaded');
    // The first document opens the language client (activation is onStartupFinished);
    // wait for the server to report its model ready.
    let status = '';
    await waitFor(
      'the Granite status bar item to show a ready server',
      async () => {
        status = await graniteStatus();
        if (/error|not found/i.test(status)) throw new Error(`server failed: ${status}`);
        return status.startsWith('Granite') && !/starting|loading|compiling|stopped|disabled/i.test(status) ? status : false;
      },
      READY_TIMEOUT,
      500,
    ).catch((err) => {
      err.message += `\nlast status bar text: ${JSON.stringify(status)}`;
      throw err;
    });
    say(`status bar: ${JSON.stringify(status)}`);

    // The first half of the cases run with granite.streaming off and are triggered with
    // Alt+\; the second half turn streaming on (in the Settings editor), trigger with
    // Alt+\ and then type the first character of the suggestion.
    let streaming = false;
    for (let i = 0; i < n; i++) {
      const second = i >= Math.ceil(n / 2);
      if (second !== streaming) {
        streaming = second;
        await setBooleanSetting('granite.streaming', streaming);
        await waitFor(
          `the extension to send granite.streaming=${streaming}`,
          () => extensionLogs().some(({ text }) => text.includes(`sending settings`) && text.includes(`"streaming":${streaming}`)),
          60_000,
          500,
        );
        say(`settings: granite.streaming=${streaming}`);
      }
      await runFixture(fixtures[i], i, { trigger: process.env.GRANITE_E2E_TRIGGER || (second ? 'invoke-type' : 'invoke') });
    }
    const finalStatus = await graniteStatus();
    say(`status bar: ${JSON.stringify(finalStatus)}`);
    assert.match(finalStatus, /\d+ ms/, 'the status bar shows the last completion latency');

    // Several candidates per invoked request: next/previous cycle through them.
    if (single && !FAKE) await checkCycling(single);

    // granite.exclude (default: *.pem, .env, ...): such a file is never sent to the server, and asking
    // for a suggestion in it sends no request. A file opened after it is sent: the trace is in order.
    await checkExcluded();
    // The status bar menu's per-language switch and snooze stop requests at once, without a restart.
    await checkToggles();
    // The cursor's place reaches the server, which works ahead of the next request there.
    if (!FAKE) await checkFocus();
  } catch (err) {
    await dumpDiagnostics(err.message.split('\n')[0]);
    throw err;
  }
});

test('no model: the error offers "Download model", which downloads it; then a completion', { timeout: READY_TIMEOUT + 10 * 60_000, skip: !HUB }, async () => {
  const fixtures = JSON.parse(fs.readFileSync(FIXTURES, 'utf8'));
  const fx = fixtures.find((f) => f.middle && !f.middle.includes('\n'));
  const rel = caseFile(fx, 0);
  fs.writeFileSync(path.join(dirs.ws, rel), fx.text);
  try {
    await page.goto(`${baseUrl}/?folder=${encodeURIComponent(dirs.ws)}`, { waitUntil: 'domcontentloaded' });
    await page.locator('.monaco-workbench').waitFor({ timeout: 120_000 });
    await openFile(rel);
    // The server starts, finds no model, and says so; the extension offers the download.
    const toast = page.locator('.notification-toast', { hasText: 'was not found' }).first();
    await toast.waitFor({ timeout: READY_TIMEOUT });
    const message = (await toast.innerText()).split('\n').find((l) => l.includes('was not found')) ?? '';
    say(`error: ${JSON.stringify(message.slice(0, 160))}`);
    assert.match(await graniteStatus(), /error|not found/i, 'the status bar shows the error');
    await toast.locator('.monaco-button', { hasText: 'Download model' }).first().click();
    say('clicked "Download model"');
    // granite-lsp download fetches it from the stand-in hub, then the server loads it.
    let status = '';
    await waitFor(
      'the server to load the downloaded model',
      async () => {
        status = await graniteStatus();
        return status.startsWith('Granite') && !/error|not found|starting|loading|compiling|stopped|disabled/i.test(status);
      },
      READY_TIMEOUT,
      500,
    ).catch((err) => {
      err.message += `\nlast status bar text: ${JSON.stringify(status)}`;
      throw err;
    });
    const snapshots = findFiles(env.HF_HOME, /^model\.safetensors$/);
    assert.ok(snapshots.length >= 1, `no model.safetensors under ${env.HF_HOME}`);
    say(`downloaded: ${snapshots[0]}; status bar: ${JSON.stringify(status)}`);
    await page.locator('.editor-instance .monaco-editor .view-lines').first().click();
    await gotoPosition(fx.line, fx.character);
    await waitForGhost(0, fx.middle, { retrigger: true });
    say('a completion from the downloaded model');
  } catch (err) {
    await dumpDiagnostics(err.message.split('\n')[0]);
    throw err;
  }
});
