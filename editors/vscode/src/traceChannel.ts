// The "Granite Trace" output channel.
//
// vscode-languageclient (9+) traces LSP messages only when its trace channel, a
// LogOutputChannel, is at log level Trace, which users set per channel in the
// Output view. So that `granite.trace.server` alone is enough, this channel
// reports level Trace whenever that setting is not "off", and writes to a plain
// output channel.
import * as vscode from 'vscode';
import { SECTION } from './config';

function traceSetting(): string {
  return vscode.workspace.getConfiguration(SECTION).get<string>('trace.server', 'off');
}

export function createTraceChannel(name: string): vscode.LogOutputChannel & vscode.Disposable {
  const channel = vscode.window.createOutputChannel(name);
  const levelChanged = new vscode.EventEmitter<vscode.LogLevel>();
  let level = traceSetting() === 'off' ? vscode.LogLevel.Off : vscode.LogLevel.Trace;
  const configSub = vscode.workspace.onDidChangeConfiguration((e) => {
    if (e.affectsConfiguration(`${SECTION}.trace.server`)) {
      const next = traceSetting() === 'off' ? vscode.LogLevel.Off : vscode.LogLevel.Trace;
      if (next !== level) {
        level = next;
        levelChanged.fire(level);
      }
    }
  });
  const write = (tag: string, message: string | Error, args: unknown[]) => {
    const text = message instanceof Error ? message.stack ?? message.message : message;
    const extra = args.length ? ' ' + args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' ') : '';
    channel.appendLine(`${new Date().toISOString()} [${tag}] ${text}${extra}`);
  };
  return {
    name: channel.name,
    get logLevel() {
      return level;
    },
    onDidChangeLogLevel: levelChanged.event,
    append: (value: string) => channel.append(value),
    appendLine: (value: string) => channel.appendLine(value),
    replace: (value: string) => channel.replace(value),
    clear: () => channel.clear(),
    show: (a?: unknown, b?: boolean) => (typeof a === 'boolean' ? channel.show(a) : channel.show(a as vscode.ViewColumn, b)),
    hide: () => channel.hide(),
    trace: (message: string, ...args: unknown[]) => write('trace', message, args),
    debug: (message: string, ...args: unknown[]) => write('debug', message, args),
    info: (message: string, ...args: unknown[]) => write('info', message, args),
    warn: (message: string, ...args: unknown[]) => write('warn', message, args),
    error: (message: string | Error, ...args: unknown[]) => write('error', message, args),
    dispose: () => {
      configSub.dispose();
      levelChanged.dispose();
      channel.dispose();
    },
  };
}
