// Granite: inline (ghost-text) completions from granite-lsp.
import { spawn } from 'child_process';
import * as vscode from 'vscode';
import { sendFocus } from './focus';
import {
  CancellationToken,
  ClientCapabilities,
  DidChangeConfigurationNotification,
  FeatureState,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
  StaticFeature,
  TransportKind,
  WorkDoneProgressBegin,
  WorkDoneProgressEnd,
  WorkDoneProgressReport,
} from 'vscode-languageclient/node';
import {
  RESTART_KEYS,
  SECTION,
  disabledLanguages,
  documentSelector,
  isEnabled,
  isExcluded,
  serverSettings,
  setEnabled,
  setLanguageDisabled,
  streamingEnabled,
} from './config';
import { doctorCommand, downloadCommand, resolveServerCommand } from './serverCommand';
import { GraniteStatusBar, StatusParams } from './statusBar';
import { PartialCompletionParams, StreamingCompletions } from './streaming';
import { createTraceChannel } from './traceChannel';

const CLIENT_ID = 'granite';
const CLIENT_NAME = 'Granite';

type InlineResult = vscode.InlineCompletionItem[] | vscode.InlineCompletionList;

/** Announces that this client handles `granite/partialCompletion` notifications. */
class PartialCompletionCapability implements StaticFeature {
  fillClientCapabilities(capabilities: ClientCapabilities): void {
    const experimental = (capabilities.experimental ?? {}) as Record<string, unknown>;
    experimental.granitePartialCompletion = true;
    capabilities.experimental = experimental;
  }
  initialize(): void {}
  getState(): FeatureState {
    return { kind: 'static' };
  }
  clear(): void {}
}

class GraniteExtension implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private clientDisposables: vscode.Disposable[] = [];
  private readonly disposables: vscode.Disposable[] = [];
  private readonly log: vscode.LogOutputChannel;
  private readonly traceLog: vscode.LogOutputChannel & vscode.Disposable;
  private readonly status: GraniteStatusBar;
  private readonly streaming: StreamingCompletions<InlineResult>;
  private enabled: boolean;
  /** Completions paused until this time (ms since the epoch), from the status bar menu. */
  private snoozedUntil = 0;
  private snoozeTimer: NodeJS.Timeout | undefined;
  /** The last missing-model message a "Download model" button was offered for (offered once). */
  private offeredDownload: string | undefined;
  private downloading = false;
  /** Serializes start/stop/restart. */
  private lifecycle: Promise<void> = Promise.resolve();

  constructor(readonly context: vscode.ExtensionContext) {
    this.log = vscode.window.createOutputChannel(CLIENT_NAME, { log: true });
    this.traceLog = createTraceChannel(`${CLIENT_NAME} Trace`);
    this.status = new GraniteStatusBar();
    this.enabled = isEnabled();
    this.status.setEnabled(this.enabled);
    this.streaming = new StreamingCompletions<InlineResult>({
      newTokenSource: () => new vscode.CancellationTokenSource(),
      partialResult: (text, position) => [
        new vscode.InlineCompletionItem(text, new vscode.Range(position.line, position.character, position.line, position.character)),
      ],
      isActiveAt: (uri, version, position) => {
        const editor = vscode.window.activeTextEditor;
        if (!editor || editor.document.uri.toString() !== uri || editor.document.version !== version) {
          return false;
        }
        const sel = editor.selection;
        return sel.isEmpty && sel.active.line === position.line && sel.active.character === position.character;
      },
      trigger: () => {
        // Hide, then trigger: VS Code does not re-query a provider for the position and
        // version of the suggestion it shows (see streaming.ts).
        void (async () => {
          await vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
          await vscode.commands.executeCommand('editor.action.inlineSuggest.trigger');
        })().catch((err) => this.log.debug(`re-trigger failed: ${err}`));
      },
      textOf: (result, position) => {
        const item = result ? (Array.isArray(result) ? result[0] : result.items[0]) : undefined;
        if (!item || typeof item.insertText !== 'string') {
          return undefined;
        }
        const r = item.range;
        if (r && !(r.isEmpty && r.start.line === position.line && r.start.character === position.character)) {
          return undefined;
        }
        return item.insertText;
      },
      carryOver: (prev, uri, version, position) => {
        // The user typed the start of the suggestion on its line: VS Code keeps showing the rest.
        if (prev.uri !== uri || version <= prev.version || position.line !== prev.position.line) {
          return undefined;
        }
        if (position.character <= prev.position.character) {
          return undefined;
        }
        const doc = vscode.workspace.textDocuments.find((d) => d.uri.toString() === uri);
        if (!doc || doc.version !== version) {
          return undefined;
        }
        const typed = doc.getText(new vscode.Range(prev.position.line, prev.position.character, position.line, position.character));
        return prev.text.startsWith(typed) && prev.text.length > typed.length ? prev.text.slice(typed.length) : undefined;
      },
      onFinal: (ms, result) => {
        if (hasItems(result)) {
          this.status.onLatency(ms);
        }
      },
      log: (message) => this.log.debug(message),
    });
    this.disposables.push(this.log, this.traceLog, this.status);
  }

  activate(): void {
    const reg = (id: string, fn: () => unknown) => this.disposables.push(vscode.commands.registerCommand(id, fn));
    reg('granite.enable', () => setEnabled(true));
    reg('granite.disable', () => setEnabled(false));
    reg('granite.toggle', () => setEnabled(!isEnabled()));
    reg('granite.restartServer', () => this.restart('restart command'));
    reg('granite.showLog', () => this.log.show(true));
    reg('granite.showStats', () => this.showStats());
    reg('granite.showMenu', () => this.showMenu());
    reg('granite.snooze', () => this.pickSnooze());
    reg('granite.toggleLanguage', () => this.toggleLanguage());
    reg('granite.downloadModel', () => this.downloadModel());
    reg('granite.showDoctor', () => this.showDoctor());

    this.disposables.push(
      vscode.workspace.onDidChangeConfiguration((e) => this.onConfigurationChanged(e)),
      vscode.workspace.onDidCloseTextDocument(() => this.streaming.reset()),
      vscode.window.onDidChangeActiveTextEditor(() => this.renderScope()),
    );
    this.renderScope();
    if (this.enabled) {
      void this.start();
    }
  }

  // -------------------------------------------------------------- client lifecycle

  private queue(job: () => Promise<void>): Promise<void> {
    this.lifecycle = this.lifecycle.then(job, job).catch((err) => {
      this.log.error(`${err instanceof Error ? err.stack ?? err.message : String(err)}`);
    });
    return this.lifecycle;
  }

  start(): Promise<void> {
    return this.queue(async () => {
      if (this.client) {
        return;
      }
      await this.startClient();
    });
  }

  restart(reason: string): Promise<void> {
    return this.queue(async () => {
      this.log.info(`restarting the server (${reason})`);
      await this.stopClient();
      if (this.enabled) {
        await this.startClient();
      }
    });
  }

  private async startClient(): Promise<void> {
    const cmd = resolveServerCommand();
    if (!cmd) {
      const msg =
        'granite-lsp was not found. Install it from its repository (it is not on PyPI): ' +
        '"pipx install /path/to/granite-lsp" or "uv tool install /path/to/granite-lsp"; ' +
        'or set "granite.serverPath" or "granite.pythonPath".';
      this.log.error(msg);
      this.status.setState('missing', msg);
      void vscode.window.showErrorMessage(msg, 'Open Settings').then((choice) => {
        if (choice) {
          void vscode.commands.executeCommand('workbench.action.openSettings', 'granite.');
        }
      });
      return;
    }
    this.log.info(`starting ${cmd.command} ${cmd.args.join(' ')} (from ${cmd.origin})`);
    this.status.setState('starting');

    const serverOptions: ServerOptions = {
      command: cmd.command,
      args: cmd.args,
      transport: TransportKind.stdio,
      options: { env: { ...process.env, PYTHONUNBUFFERED: '1' } },
    };
    const clientOptions: LanguageClientOptions = {
      documentSelector: documentSelector(),
      outputChannel: this.log,
      traceOutputChannel: this.traceLog,
      initializationOptions: () => serverSettings(),
      initializationFailedHandler: (error) => {
        this.log.error(`initialization failed: ${error instanceof Error ? error.message : String(error)}`);
        this.status.setState('error', 'initialization failed; see "Granite: Show Log"');
        return false;
      },
      middleware: {
        // granite.exclude: an excluded file's text never reaches the server (no didOpen, no changes).
        didOpen: (document, next) => (isExcluded(document) ? Promise.resolve() : next(document)),
        didChange: (event, next) => (isExcluded(event.document) ? Promise.resolve() : next(event)),
        didSave: (document, next) => (isExcluded(document) ? Promise.resolve() : next(document)),
        willSave: (event, next) => (isExcluded(event.document) ? Promise.resolve() : next(event)),
        willSaveWaitUntil: (event, next) => (isExcluded(event.document) ? Promise.resolve([]) : next(event)),
        didClose: (document, next) => (isExcluded(document) ? Promise.resolve() : next(document)),
        provideInlineCompletionItems: (document, position, context, token, next) =>
          this.provideInlineCompletionItems(document, position, context, token, next),
        handleWorkDoneProgress: (token, params, next) => {
          this.onWorkDoneProgress(params);
          next(token, params);
        },
      },
    };

    const client = new LanguageClient(CLIENT_ID, CLIENT_NAME, serverOptions, clientOptions);
    client.registerFeature(new PartialCompletionCapability());
    this.client = client;
    this.clientDisposables.push(
      client.onDidChangeState((e) => {
        this.log.debug(`client state ${State[e.oldState]} -> ${State[e.newState]}`);
        if (e.newState === State.Stopped && this.client === client) {
          this.streaming.reset();
          if (this.status.current !== 'error') {
            this.status.setState('stopped');
          }
        } else if (e.newState === State.Starting) {
          this.status.setState('starting');
        }
      }),
      client.onNotification('granite/status', (params: StatusParams) => {
        this.log.info(
          `status: ${params?.state}${params?.model ? ` model=${params.model}` : ''}${params?.device ? ` device=${params.device}` : ''}` +
            `${params?.dtype ? ` dtype=${params.dtype}` : ''}${params?.message ? ` — ${params.message}` : ''}`,
        );
        this.status.onStatus(params);
        this.offerDownload(params);
      }),
      client.onNotification('granite/partialCompletion', (params: PartialCompletionParams) => {
        if (this.enabled && streamingEnabled()) {
          this.streaming.onPartial(params);
        }
      }),
    );
    try {
      await client.start();
      this.log.info('language client ready');
      this.clientDisposables.push(sendFocus(client, (document) => isExcluded(document)));
      // No granite/status yet: the model is loading (or the server does not send status).
      if (this.status.current === 'starting') {
        this.status.setState('loading');
      }
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      this.log.error(`could not start the server: ${msg}`);
      this.status.setState('error', msg);
    }
  }

  private async stopClient(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    this.streaming.reset();
    for (const d of this.clientDisposables.splice(0)) {
      d.dispose();
    }
    if (client) {
      try {
        if (client.needsStop()) {
          await client.stop(5000);
        }
      } catch (err) {
        this.log.warn(`stopping the server: ${err instanceof Error ? err.message : String(err)}`);
      }
      try {
        await client.dispose(2000);
      } catch {
        // already stopped
      }
    }
    this.status.setState('stopped');
  }

  // -------------------------------------------------------------- completions

  private async provideInlineCompletionItems(
    document: vscode.TextDocument,
    position: vscode.Position,
    context: vscode.InlineCompletionContext,
    token: vscode.CancellationToken,
    next: (
      document: vscode.TextDocument,
      position: vscode.Position,
      context: vscode.InlineCompletionContext,
      token: CancellationToken,
    ) => vscode.ProviderResult<InlineResult>,
  ): Promise<InlineResult | null | undefined> {
    if (!this.enabled || this.isSnoozed() || disabledLanguages().includes(document.languageId) || isExcluded(document)) {
      return undefined;
    }
    if (streamingEnabled()) {
      return this.streaming.provide(document.uri.toString(), document.version, position, token, (t) =>
        Promise.resolve(next(document, position, context, t as CancellationToken)),
      );
    }
    const started = Date.now();
    const result = await next(document, position, context, token);
    if (!token.isCancellationRequested && hasItems(result)) {
      this.status.onLatency(Date.now() - started);
    }
    return result;
  }

  private onWorkDoneProgress(params: WorkDoneProgressBegin | WorkDoneProgressReport | WorkDoneProgressEnd): void {
    if (params.kind === 'end') {
      this.status.onProgress(undefined);
      return;
    }
    const parts: string[] = [];
    if (typeof params.percentage === 'number') {
      parts.push(`${Math.round(params.percentage)}%`);
    }
    if (params.message) {
      parts.push(params.message);
    }
    if (this.status.current === 'starting') {
      this.status.setState('loading');
    }
    this.status.onProgress(parts.length ? parts.join(' ') : undefined);
  }

  // -------------------------------------------------------------- settings

  private onConfigurationChanged(e: vscode.ConfigurationChangeEvent): void {
    if (!e.affectsConfiguration(SECTION)) {
      return;
    }
    if (e.affectsConfiguration(`${SECTION}.disabledLanguages`)) {
      this.streaming.reset();
      this.renderScope();
    }
    const enabled = isEnabled();
    if (enabled !== this.enabled) {
      this.enabled = enabled;
      this.status.setEnabled(enabled);
      this.log.info(`completions ${enabled ? 'enabled' : 'disabled'}`);
      if (!enabled) {
        this.streaming.reset();
      } else if (!this.client) {
        void this.start();
      }
    }
    if (RESTART_KEYS.some((key) => e.affectsConfiguration(`${SECTION}.${key}`))) {
      if (this.client || this.enabled) {
        void this.restart('server settings changed');
      }
      return;
    }
    const client = this.client;
    if (client && client.isRunning()) {
      const settings = serverSettings();
      this.log.info(`sending settings ${JSON.stringify(settings)}`);
      void client.sendNotification(DidChangeConfigurationNotification.type, { settings: { [SECTION]: settings } }).catch((err) => {
        this.log.warn(`didChangeConfiguration failed: ${err instanceof Error ? err.message : String(err)}`);
      });
    }
  }

  // -------------------------------------------------------------- status bar menu: snooze, per language

  private isSnoozed(): boolean {
    return Date.now() < this.snoozedUntil;
  }

  /** The status bar's view of the active editor: snoozed, or its language switched off. */
  private renderScope(): void {
    const language = vscode.window.activeTextEditor?.document.languageId;
    this.status.setScope({
      snoozedUntil: this.isSnoozed() ? this.snoozedUntil : undefined,
      languageOff: language !== undefined && disabledLanguages().includes(language) ? language : undefined,
    });
  }

  snooze(minutes: number): void {
    clearTimeout(this.snoozeTimer);
    this.snoozedUntil = minutes > 0 ? Date.now() + minutes * 60_000 : 0;
    this.streaming.reset();
    if (minutes > 0) {
      void vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
      this.snoozeTimer = setTimeout(() => this.renderScope(), minutes * 60_000 + 50);
    }
    this.log.info(minutes > 0 ? `snoozed for ${minutes} min` : 'snooze ended');
    this.renderScope();
  }

  private async pickSnooze(): Promise<void> {
    const choices = [5, 15, 30, 60].map((m) => ({ label: `Snooze for ${m} minutes`, minutes: m }));
    if (this.isSnoozed()) {
      choices.unshift({ label: 'Resume now', minutes: 0 });
    }
    const picked = await vscode.window.showQuickPick(choices, { title: 'Granite: snooze completions' });
    if (picked) {
      this.snooze(picked.minutes);
    }
  }

  private async toggleLanguage(languageId?: string): Promise<void> {
    const language = languageId ?? vscode.window.activeTextEditor?.document.languageId;
    if (!language) {
      return;
    }
    await setLanguageDisabled(language, !disabledLanguages().includes(language));
  }

  private async showMenu(): Promise<void> {
    const language = vscode.window.activeTextEditor?.document.languageId;
    type Item = vscode.QuickPickItem & { run: () => unknown };
    const items: Item[] = [
      {
        label: this.enabled ? '$(circle-slash) Disable completions' : '$(check) Enable completions',
        run: () => setEnabled(!this.enabled),
      },
    ];
    if (language) {
      const off = disabledLanguages().includes(language);
      items.push({
        label: off ? `$(check) Enable for ${language}` : `$(circle-slash) Disable for ${language}`,
        run: () => this.toggleLanguage(language),
      });
    }
    items.push(
      this.isSnoozed()
        ? { label: '$(play) Resume (end the snooze)', run: () => this.snooze(0) }
        : { label: '$(clock) Snooze…', run: () => this.pickSnooze() },
      { label: '$(cloud-download) Download model', run: () => this.downloadModel() },
      { label: '$(debug-restart) Restart server', run: () => this.restart('menu') },
      { label: '$(checklist) Doctor report', run: () => this.showDoctor() },
      { label: '$(output) Show log', run: () => this.log.show(true) },
    );
    const picked = await vscode.window.showQuickPick(items, { title: 'Granite' });
    await picked?.run();
  }

  // -------------------------------------------------------------- downloading the model

  /** On a "model was not found" error from the server: offer the download, once per message. */
  private offerDownload(params: StatusParams): void {
    const message = params?.message ?? '';
    if (params?.state !== 'error' || !message.includes('was not found') || this.offeredDownload === message) {
      return;
    }
    this.offeredDownload = message;
    const model = /Model '([^']+)' was not found/.exec(message)?.[1];
    void vscode.window.showErrorMessage(`Granite: ${message}`, 'Download model', 'Show Log').then((choice) => {
      if (choice === 'Download model') {
        void this.downloadModel(model);
      } else if (choice === 'Show Log') {
        this.log.show(true);
      }
    });
  }

  /**
   * Runs `granite-lsp download [model]` with the server's own executable, its progress in a
   * notification and the log; then asks the running server to load the model.
   */
  async downloadModel(model?: string): Promise<boolean> {
    const configured = vscode.workspace.getConfiguration(SECTION).get<string>('model', '').trim();
    const target = model ?? (configured || undefined);
    const cmd = downloadCommand(target);
    if (!cmd) {
      void vscode.window.showErrorMessage('granite-lsp was not found: install it first (see "Granite: Show Log").');
      return false;
    }
    if (this.downloading) {
      void vscode.window.showInformationMessage('Granite: a download is already running.');
      return false;
    }
    this.downloading = true;
    this.log.info(`downloading: ${cmd.command} ${cmd.args.join(' ')}`);
    try {
      const path = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Notification, title: `Granite: downloading ${target ?? 'the default model'}` },
        (progress) =>
          new Promise<string>((resolve, reject) => {
            const child = spawn(cmd.command, cmd.args, { env: { ...process.env, PYTHONUNBUFFERED: '1' } });
            let stdout = '';
            let last = '';
            child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
            child.stderr.on('data', (d: Buffer) => {
              const pieces = d.toString().split(/[\r\n]+/).filter((x) => x.trim());
              if (pieces.length) {
                last = pieces[pieces.length - 1];
                progress.report({ message: last.slice(0, 120) });
                this.log.debug(`download: ${last}`);
              }
            });
            child.on('error', reject);
            child.on('close', (code) =>
              code === 0 && stdout.trim() ? resolve(stdout.trim()) : reject(new Error(last || `exit code ${code}`)),
            );
          }),
      );
      this.log.info(`model downloaded to ${path}`);
      void vscode.window.showInformationMessage(`Granite: model downloaded to ${path}; loading it.`);
      this.offeredDownload = undefined;
      const client = this.client;
      if (client && client.isRunning()) {
        // A configuration change makes a server that has no model try to load it again.
        await client.sendNotification(DidChangeConfigurationNotification.type, { settings: { [SECTION]: serverSettings() } });
      } else if (this.enabled) {
        await this.restart('model downloaded');
      }
      return true;
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      this.log.error(`download failed: ${msg}`);
      void vscode.window.showErrorMessage(`Granite: download failed: ${msg}`);
      return false;
    } finally {
      this.downloading = false;
    }
  }

  /** `granite-lsp doctor` into the log: Python, torch, device, kernels, every place the model was looked for. */
  private async showDoctor(): Promise<void> {
    const cmd = doctorCommand(serverSettings());
    if (!cmd) {
      void vscode.window.showErrorMessage('granite-lsp was not found: install it first (see the README).');
      return;
    }
    this.log.info(`$ ${cmd.command} ${cmd.args.join(' ')}`);
    this.log.show(true);
    await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: 'Granite: running granite-lsp doctor' },
      () =>
        new Promise<void>((resolve) => {
          const child = spawn(cmd.command, cmd.args, { env: { ...process.env, PYTHONUNBUFFERED: '1' } });
          let out = '';
          child.stdout.on('data', (d: Buffer) => (out += d.toString()));
          child.stderr.on('data', (d: Buffer) => this.log.debug(`doctor: ${d.toString().trim()}`));
          child.on('error', (err) => {
            this.log.error(`granite-lsp doctor: ${err.message}`);
            resolve();
          });
          child.on('close', (code) => {
            for (const line of out.trimEnd().split('\n')) {
              this.log.info(`doctor: ${line}`);
            }
            if (code !== 0) {
              this.log.error(`granite-lsp doctor reports a problem (exit code ${code})`);
            }
            resolve();
          });
        }),
    );
  }

  private async showStats(): Promise<void> {
    const client = this.client;
    if (!client || !client.isRunning()) {
      void vscode.window.showWarningMessage('The Granite server is not running.');
      return;
    }
    try {
      const stats = await client.sendRequest('granite/stats', {});
      this.log.info(`stats: ${JSON.stringify(stats, null, 2)}`);
      this.log.show(true);
    } catch (err) {
      void vscode.window.showErrorMessage(`granite/stats failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  async dispose(): Promise<void> {
    clearTimeout(this.snoozeTimer);
    await this.queue(() => this.stopClient());
    for (const d of this.disposables.splice(0)) {
      d.dispose();
    }
  }
}

function hasItems(result: InlineResult | null | undefined): boolean {
  if (!result) {
    return false;
  }
  return Array.isArray(result) ? result.length > 0 : result.items.length > 0;
}

let extension: GraniteExtension | undefined;

export function activate(context: vscode.ExtensionContext): void {
  extension = new GraniteExtension(context);
  extension.activate();
}

export function deactivate(): Thenable<void> | undefined {
  const ext = extension;
  extension = undefined;
  return ext?.dispose();
}
