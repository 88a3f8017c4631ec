import * as vscode from 'vscode';
import { LanguageClient } from 'vscode-languageclient/node';

/** Quiet time before the cursor's place is sent: arrow keys and scrolling come in bursts. */
const FOCUS_DEBOUNCE_MS = 150;

/**
 * `granite/focus` (README, "Custom protocol"): tells the server which document the user looks at and where
 * the cursor is, on editor focus and on cursor moves by keyboard, mouse or command (not on typing, which
 * sends its own requests), so that it can work ahead of the next request.
 */
export function sendFocus(client: LanguageClient, excluded: (document: vscode.TextDocument) => boolean): vscode.Disposable {
  let timer: NodeJS.Timeout | undefined;
  const schedule = (editor: vscode.TextEditor | undefined): void => {
    if (timer) {
      clearTimeout(timer);
    }
    if (!editor || excluded(editor.document)) {
      return;
    }
    timer = setTimeout(() => {
      if (!client.isRunning()) {
        return;
      }
      const p = editor.selection.active;
      const params = {
        textDocument: { uri: client.code2ProtocolConverter.asUri(editor.document.uri) },
        position: { line: p.line, character: p.character },
      };
      void client.sendNotification('granite/focus', params).catch(() => undefined);
    }, FOCUS_DEBOUNCE_MS);
  };
  const subscriptions = [
    vscode.window.onDidChangeActiveTextEditor(schedule),
    vscode.window.onDidChangeTextEditorSelection((e) => {
      if (e.kind !== undefined) {
        schedule(e.textEditor);
      }
    }),
  ];
  schedule(vscode.window.activeTextEditor);
  return vscode.Disposable.from(...subscriptions, { dispose: () => timer && clearTimeout(timer) });
}
