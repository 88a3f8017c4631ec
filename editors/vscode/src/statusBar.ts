// The status bar item: server state, model, device and the last completion latency.
import * as path from 'path';
import * as vscode from 'vscode';

export type ServerState = 'stopped' | 'starting' | 'loading' | 'ready' | 'error' | 'missing';

/** `granite/status` notification from the server. */
export interface StatusParams {
  state: 'loading' | 'ready' | 'error';
  model?: string;
  device?: string;
  dtype?: string;
  message?: string;
}

export class GraniteStatusBar implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;
  private state: ServerState = 'stopped';
  private enabled = true;
  private model: string | undefined;
  private device: string | undefined;
  private dtype: string | undefined;
  private message: string | undefined;
  private progress: string | undefined;
  private latencyMs: number | undefined;
  private snoozedUntil: number | undefined;
  private languageOff: string | undefined;

  constructor() {
    this.item = vscode.window.createStatusBarItem('granite.status', vscode.StatusBarAlignment.Right, 100);
    this.item.name = 'Granite';
    this.item.command = 'granite.showMenu';
    this.render();
    this.item.show();
  }

  /** Snoozed until a time, or completions off for the active editor's language. */
  setScope(scope: { snoozedUntil?: number; languageOff?: string }): void {
    this.snoozedUntil = scope.snoozedUntil;
    this.languageOff = scope.languageOff;
    this.render();
  }

  setEnabled(enabled: boolean): void {
    this.enabled = enabled;
    this.render();
  }

  setState(state: ServerState, message?: string): void {
    this.state = state;
    this.message = message;
    if (state !== 'loading') {
      this.progress = undefined;
    }
    this.render();
  }

  /** A `granite/status` notification. */
  onStatus(params: StatusParams): void {
    if (!params || typeof params !== 'object') {
      return;
    }
    if (params.model) {
      this.model = params.model;
    }
    if (params.device) {
      this.device = params.device;
    }
    if (params.dtype) {
      this.dtype = params.dtype;
    }
    if (params.state === 'loading' || params.state === 'ready' || params.state === 'error') {
      if (params.state !== 'ready') {
        this.latencyMs = undefined;
      }
      this.setState(params.state, params.message);
    }
  }

  /** Work-done progress while the model loads ("42%", "downloading…"). */
  onProgress(text: string | undefined): void {
    this.progress = text;
    this.render();
  }

  onLatency(ms: number): void {
    this.latencyMs = ms;
    this.render();
  }

  get current(): ServerState {
    return this.state;
  }

  private modelLabel(): string {
    if (!this.model) {
      return '';
    }
    const trimmed = this.model.replace(/[\\/]+$/, '');
    return trimmed.includes('/') && !trimmed.startsWith('/') && !/^[a-zA-Z]:/.test(trimmed) && !trimmed.startsWith('.')
      ? trimmed.split('/').pop() ?? trimmed // hub id: owner/name → name
      : path.basename(trimmed);
  }

  private render(): void {
    const item = this.item;
    const model = this.modelLabel();
    const details = [
      this.model ? `Model: ${this.model}` : undefined,
      this.device ? `Device: ${this.device}` : undefined,
      this.dtype ? `Dtype: ${this.dtype}` : undefined,
      this.latencyMs !== undefined ? `Last completion: ${Math.round(this.latencyMs)} ms` : undefined,
      this.message ? `${this.message}` : undefined,
    ].filter((x): x is string => !!x);
    item.backgroundColor = undefined;
    switch (this.state) {
      case 'stopped':
        item.text = '$(circle-slash) Granite: stopped';
        break;
      case 'missing':
        item.text = '$(warning) Granite: server not found';
        item.backgroundColor = new vscode.ThemeColor('statusBarItem.warningBackground');
        break;
      case 'starting':
        item.text = '$(loading~spin) Granite: starting…';
        break;
      case 'loading':
        item.text = `$(loading~spin) Granite: loading…${this.progress ? ' ' + this.progress : ''}`;
        break;
      case 'error':
        item.text = '$(error) Granite: error';
        item.backgroundColor = new vscode.ThemeColor('statusBarItem.errorBackground');
        break;
      case 'ready': {
        const parts = [model, this.device].filter((x) => !!x).join(' · ');
        const latency = this.latencyMs !== undefined ? ` · ${Math.round(this.latencyMs)} ms` : '';
        item.text = `$(sparkle) Granite${parts ? ' ' + parts : ''}${latency}`;
        break;
      }
    }
    if (!this.enabled) {
      item.text = `$(circle-slash) Granite (disabled)${this.state === 'ready' && model ? ' ' + model : ''}`;
      item.backgroundColor = undefined;
    } else if (this.snoozedUntil !== undefined) {
      const until = new Date(this.snoozedUntil);
      item.text = `$(clock) Granite: snoozed until ${until.getHours()}:${String(until.getMinutes()).padStart(2, '0')}`;
      item.backgroundColor = undefined;
    } else if (this.languageOff !== undefined && this.state !== 'error' && this.state !== 'missing') {
      item.text = `$(circle-slash) Granite: off for ${this.languageOff}`;
      item.backgroundColor = undefined;
    }
    const tooltip = new vscode.MarkdownString(undefined, true);
    tooltip.appendMarkdown(`**Granite** — ${this.enabled ? 'completions enabled' : 'completions disabled'}, server ${this.state}\n\n`);
    for (const line of details) {
      tooltip.appendText(line);
      tooltip.appendMarkdown('  \n');
    }
    tooltip.appendMarkdown('\nClick for the menu: enable/disable, per language, snooze, download the model.');
    item.tooltip = tooltip;
    item.accessibilityInformation = { label: item.text.replace(/\$\([^)]*\)\s*/g, ''), role: 'button' };
  }

  dispose(): void {
    this.item.dispose();
  }
}
