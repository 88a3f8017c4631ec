// Reading the `granite.*` settings and turning them into what the server gets:
// initializationOptions at start, `workspace/didChangeConfiguration` later.
import * as vscode from 'vscode';

export const SECTION = 'granite';

/** Settings the server understands; sent flat and camelCase, the same keys both ways. */
export interface ServerSettings {
  model?: string;
  device?: 'auto' | 'cpu' | 'cuda' | 'mps';
  dtype?: 'auto' | 'float32' | 'bfloat16' | 'float16';
  quantize?: 'none' | 'int8';
  maxTokens?: number;
  prefixTokens?: number;
  suffixTokens?: number;
  debounceMs?: number;
  maxLines?: number;
  candidates?: number;
  typingCandidates?: number;
  streaming?: boolean;
}

const STRING_KEYS = ['model', 'device', 'dtype', 'quantize'] as const;
const NUMBER_KEYS = [
  'maxTokens',
  'prefixTokens',
  'suffixTokens',
  'debounceMs',
  'maxLines',
  'candidates',
  'typingCandidates',
] as const;

/** Settings whose change needs a new server process (or a new document selector). */
export const RESTART_KEYS = ['serverPath', 'pythonPath', 'serverArgs', 'enabledLanguages', 'exclude'] as const;

/** Whether the user set `key` anywhere (user, workspace or folder settings), as opposed to its default. */
function isSet(cfg: vscode.WorkspaceConfiguration, key: string): boolean {
  const info = cfg.inspect(key);
  return (
    info !== undefined &&
    (info.globalValue !== undefined ||
      info.workspaceValue !== undefined ||
      info.workspaceFolderValue !== undefined ||
      info.globalLanguageValue !== undefined ||
      info.workspaceLanguageValue !== undefined ||
      info.workspaceFolderLanguageValue !== undefined)
  );
}

/**
 * The server's settings. Only settings the user set are sent (and unset values
 * such as an empty model or an empty number are left out), so that the server
 * keeps its own defaults and what it got on its command line (`--model`,
 * `--device`...). `streaming` is always sent: the extension decides it.
 */
export function serverSettings(cfg: vscode.WorkspaceConfiguration = vscode.workspace.getConfiguration(SECTION)): ServerSettings {
  const out: Record<string, unknown> = {};
  for (const key of STRING_KEYS) {
    const value = cfg.get<string>(key);
    if (isSet(cfg, key) && typeof value === 'string' && value.trim() !== '') {
      out[key] = key === 'model' ? expandHome(value.trim()) : value;
    }
  }
  for (const key of NUMBER_KEYS) {
    const value = cfg.get<number | null>(key);
    if (typeof value === 'number' && Number.isFinite(value) && value >= 0) {
      out[key] = Math.trunc(value);
    }
  }
  out.streaming = cfg.get<boolean>('streaming', false);
  return out as ServerSettings;
}

export function isEnabled(): boolean {
  return vscode.workspace.getConfiguration(SECTION).get<boolean>('enable', true);
}

export function streamingEnabled(): boolean {
  return vscode.workspace.getConfiguration(SECTION).get<boolean>('streaming', false);
}

/**
 * The document selector: every language (`*`) or the listed language ids, for
 * files on disk and untitled documents (not output panes, git diffs, settings...).
 */
export function documentSelector(): { scheme: string; language?: string }[] {
  const langs = vscode.workspace.getConfiguration(SECTION).get<string[]>('enabledLanguages', ['*']);
  const schemes = ['file', 'untitled'];
  const list = Array.isArray(langs) && langs.length > 0 ? langs : ['*'];
  if (list.includes('*')) {
    return schemes.map((scheme) => ({ scheme }));
  }
  const out: { scheme: string; language: string }[] = [];
  for (const language of list) {
    for (const scheme of schemes) {
      out.push({ scheme, language });
    }
  }
  return out;
}

export function expandHome(p: string): string {
  if (p === '~' || p.startsWith('~/')) {
    const home = process.env.HOME ?? process.env.USERPROFILE ?? '';
    return home + p.slice(1);
  }
  return p;
}

/** Updates `granite.enable` in the user settings, and in the workspace's when it is set there. */
export async function setEnabled(value: boolean): Promise<void> {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const info = cfg.inspect<boolean>('enable');
  if (info?.workspaceValue !== undefined) {
    await cfg.update('enable', value, vscode.ConfigurationTarget.Workspace);
  }
  await cfg.update('enable', value, vscode.ConfigurationTarget.Global);
}

/** Languages switched off from the status bar menu (`granite.disabledLanguages`): no restart needed. */
export function disabledLanguages(): string[] {
  const list = vscode.workspace.getConfiguration(SECTION).get<string[]>('disabledLanguages', []);
  return Array.isArray(list) ? list.filter((x) => typeof x === 'string') : [];
}

/** Turns completions for `languageId` off or on (user settings). */
export async function setLanguageDisabled(languageId: string, disabled: boolean): Promise<void> {
  const list = disabledLanguages().filter((x) => x !== languageId);
  if (disabled) {
    list.push(languageId);
  }
  await vscode.workspace.getConfiguration(SECTION).update('disabledLanguages', list, vscode.ConfigurationTarget.Global);
}

// `granite.exclude` as document-filter globs. A pattern without a slash names a file in any
// folder (`*.pem` becomes `**/*.pem`), as in .gitignore.
export function excludePatterns(): string[] {
  const list = vscode.workspace.getConfiguration(SECTION).get<string[]>('exclude', []);
  return (Array.isArray(list) ? list : [])
    .filter((x) => typeof x === 'string' && x.trim() !== '')
    .map((p) => (p.includes('/') ? p : `**/${p}`));
}

/** Whether `document` matches a `granite.exclude` glob: then nothing of it is sent and nothing is asked. */
export function isExcluded(document: vscode.TextDocument, patterns: string[] = excludePatterns()): boolean {
  return patterns.some((pattern) => vscode.languages.match({ pattern }, document) > 0);
}
