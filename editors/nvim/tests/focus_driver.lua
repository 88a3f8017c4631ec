-- Headless check that the plugin tells the server where the user is (granite/focus) and that the
-- server's work ahead uses it (tests/e2e/test_nvim_focus.py): open a file, move the cursor in normal
-- mode like a user, wait until the server has brought the state for that place up to date, then ask
-- for a suggestion there. Writes what it saw as JSON to $GRANITE_FOCUS_OUT and quits.
--
-- The steps run in a coroutine that gives control back to Neovim's main loop between them (not
-- vim.wait): CursorMoved, which the plugin listens to, fires only from the main loop.
local out = {}
local gl = require('granite_lsp')

local function finish()
  local f = assert(io.open(os.getenv('GRANITE_FOCUS_OUT'), 'w'))
  f:write(vim.json.encode(out))
  f:close()
  vim.cmd('qa!')
end

local co
local function sleep(ms)
  vim.defer_fn(function()
    assert(coroutine.resume(co))
  end, ms)
  coroutine.yield()
end

local function wait_until(ms, cond)
  local deadline = vim.uv.now() + ms
  while vim.uv.now() < deadline do
    if cond() then
      return true
    end
    sleep(100)
  end
  return false
end

local function stats(client, buf)
  local res = client:request_sync('granite/stats', vim.empty_dict(), 10000, buf)
  return res and res.result or {}
end

co = coroutine.create(function()
  local ok, err = pcall(function()
    vim.cmd('edit ' .. os.getenv('GRANITE_FOCUS_FILE'))
    local buf = vim.api.nvim_get_current_buf()
    out.ready = wait_until(60000, function()
      return #gl.get_clients(buf) > 0 and (gl.get_status(buf) or {}).state == 'ready'
    end)
    local client = gl.get_clients(buf)[1]
    -- Whatever the attach itself set going (focus on the first line) finishes first.
    sleep(1500)
    out.before = stats(client, buf).background
    local before = out.before.completed or 0
    -- A user's jump: normal-mode keys, handled by the main loop as a person's would be.
    vim.api.nvim_feedkeys(os.getenv('GRANITE_FOCUS_LINE') .. 'G', 't', false)
    sleep(50)
    out.cursor = vim.api.nvim_win_get_cursor(0)
    out.completed = wait_until(60000, function()
      return ((stats(client, buf).background or {}).completed or 0) > before
    end)
    local after = stats(client, buf)
    out.after, out.after_cache = after.background, after.cache
    -- The request a user would make there: the place the focus carried.
    local params = vim.lsp.util.make_position_params(0, client.offset_encoding or 'utf-16')
    params.context = { triggerKind = 1 }
    local res = client:request_sync('textDocument/inlineCompletion', params, 60000, buf)
    out.answered = res ~= nil and res.err == nil
    out.stats = stats(client, buf)
  end)
  if not ok then
    out.error = tostring(err)
  end
  finish()
end)
assert(coroutine.resume(co))
