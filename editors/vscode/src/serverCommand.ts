// Finding the command that starts granite-lsp.
import * as fs from 'fs';
import * as path from 'path';
import * as vscode from 'vscode';
import { SECTION, expandHome } from './config';

export interface ServerCommand {
  command: string;
  args: string[];
  /** How the command was found, for the log. */
  origin: string;
}

const EXE = process.platform === 'win32' ? 'granite-lsp.exe' : 'granite-lsp';
const VENV_BIN = process.platform === 'win32' ? 'Scripts' : 'bin';

function isExecutable(file: string): boolean {
  try {
    const st = fs.statSync(file);
    if (!st.isFile()) {
      return false;
    }
    if (process.platform === 'win32') {
      return true;
    }
    fs.accessSync(file, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function onPath(exe: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, exe))) {
      return path.join(dir, exe);
    }
  }
  return undefined;
}

function resolveVariables(value: string): string {
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath ?? '';
  return expandHome(value.replace(/\$\{workspaceFolder\}/g, folder).replace(/\$\{userHome\}/g, process.env.HOME ?? ''));
}

/**
 * The server command, in this order:
 *  1. `granite.serverPath`;
 *  2. `granite.pythonPath` → `<python> -m granite_lsp`;
 *  3. `granite-lsp` next to the Python extension's selected interpreter (its venv's bin/);
 *  4. `granite-lsp` on PATH;
 *  5. `granite-lsp` in a `.venv` / `venv` of a workspace folder.
 * `granite.serverArgs` (default `--stdio`) follows the executable.
 */
export function resolveServerCommand(): ServerCommand | undefined {
  const cfg = vscode.workspace.getConfiguration(SECTION);
  const args = (cfg.get<string[]>('serverArgs') ?? ['--stdio']).map(resolveVariables);

  const serverPath = resolveVariables((cfg.get<string>('serverPath') ?? '').trim());
  if (serverPath) {
    return { command: serverPath, args, origin: 'granite.serverPath' };
  }
  const pythonPath = resolveVariables((cfg.get<string>('pythonPath') ?? '').trim());
  if (pythonPath) {
    return { command: pythonPath, args: ['-m', 'granite_lsp', ...args], origin: 'granite.pythonPath' };
  }
  const interpreter = pythonExtensionInterpreter();
  if (interpreter) {
    // The API gives the interpreter's file, or an environment's folder (conda prefixes).
    for (const candidate of [path.join(path.dirname(interpreter), EXE), path.join(interpreter, VENV_BIN, EXE)]) {
      if (isExecutable(candidate)) {
        return { command: candidate, args, origin: `the Python extension's interpreter (${interpreter})` };
      }
    }
  }
  const found = onPath(EXE);
  if (found) {
    return { command: found, args, origin: 'PATH' };
  }
  for (const folder of vscode.workspace.workspaceFolders ?? []) {
    if (folder.uri.scheme !== 'file') {
      continue;
    }
    for (const venv of ['.venv', 'venv']) {
      const candidate = path.join(folder.uri.fsPath, venv, VENV_BIN, EXE);
      if (isExecutable(candidate)) {
        return { command: candidate, args, origin: `workspace ${venv}` };
      }
    }
  }
  return undefined;
}

/**
 * `granite-lsp download [model]` run with the server's own executable (or `<python> -m granite_lsp`),
 * without the server's arguments.
 */
export function downloadCommand(model?: string): ServerCommand | undefined {
  return subcommand(['download', ...(model ? [model] : [])]);
}

/** `granite-lsp doctor` with the model/device/dtype the extension asks for (the same report as in a terminal). */
export function doctorCommand(settings: { model?: string; device?: string; dtype?: string }): ServerCommand | undefined {
  const extra: string[] = [];
  for (const key of ['model', 'device', 'dtype'] as const) {
    if (settings[key]) {
      extra.push(`--${key}`, String(settings[key]));
    }
  }
  return subcommand(['doctor', ...extra]);
}

function subcommand(args: string[]): ServerCommand | undefined {
  const cmd = resolveServerCommand();
  if (!cmd) {
    return undefined;
  }
  const moduleRun = cmd.origin === 'granite.pythonPath' ? ['-m', 'granite_lsp'] : [];
  return { command: cmd.command, args: [...moduleRun, ...args], origin: cmd.origin };
}

/** The environments API of the Python extension (ms-python.python), the part used here. */
interface PythonExtensionApi {
  environments?: { getActiveEnvironmentPath(resource?: vscode.Uri): { path: string } | undefined };
}

/**
 * The interpreter selected in the Python extension for the active file's folder (or the first
 * workspace folder), when that extension is installed and active; undefined otherwise.
 */
export function pythonExtensionInterpreter(): string | undefined {
  const ext = vscode.extensions.getExtension<PythonExtensionApi>('ms-python.python');
  if (!ext?.isActive) {
    return undefined;
  }
  try {
    const resource = vscode.window.activeTextEditor?.document.uri ?? vscode.workspace.workspaceFolders?.[0]?.uri;
    const env = ext.exports?.environments?.getActiveEnvironmentPath(resource);
    return env?.path && path.isAbsolute(env.path) ? env.path : undefined;
  } catch {
    return undefined;
  }
}
