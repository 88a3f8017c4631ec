-- Headless check of downloading the model from the error (tests/e2e/test_nvim_commands.py): the server
-- starts with no model, the plugin shows the error, :GraniteDownload fetches the model (a stand-in hub
-- on 127.0.0.1), the server loads it and answers a completion. Writes what it saw as JSON to
-- $GRANITE_DAYONE_OUT and quits.
local out = {}
local gl = require('granite_lsp')
local work = os.getenv('GRANITE_DAYONE_WORK')
local notes = {}
local notify = vim.notify
vim.notify = function(msg, level, opts)
  notes[#notes + 1] = tostring(msg)
  return notify(msg, level, opts)
end

local function finish()
  out.notes = notes
  local f = assert(io.open(os.getenv('GRANITE_DAYONE_OUT'), 'w'))
  f:write(vim.json.encode(out))
  f:close()
  vim.cmd('qa!')
end

local ok, err = pcall(function()
  vim.cmd('edit ' .. work .. '/a.py')
  local a = vim.api.nvim_get_current_buf()
  out.error_seen = vim.wait(60000, function()
    return (gl.get_status(a) or {}).state == 'error'
  end, 100)
  out.error_message = (gl.get_status(a) or {}).message
  vim.cmd('GraniteDownload')
  out.ready = vim.wait(120000, function()
    return (gl.get_status(a) or {}).state == 'ready'
  end, 100)
  local client = gl.get_clients(a)[1]
  local line, character = tonumber(os.getenv('GRANITE_DAYONE_LINE')), tonumber(os.getenv('GRANITE_DAYONE_CHARACTER'))
  local res = client:request_sync('textDocument/inlineCompletion', {
    textDocument = { uri = vim.uri_from_bufnr(a) },
    position = { line = line, character = character },
    context = { triggerKind = 1 },
  }, 60000, a)
  local items = res and res.result and (res.result.items or res.result) or {}
  out.completion = items[1] and items[1].insertText or vim.NIL
end)
if not ok then
  out.error = tostring(err)
end
finish()
