-- Headless check of the day-one commands against a real granite-lsp (tests/e2e/test_nvim_commands.py):
-- :GraniteToggle, the statusline component, filetypes changed after setup(), :GraniteDownload.
-- Writes what it saw as JSON to $GRANITE_DAYONE_OUT and quits.
local out = {}
local gl = require('granite_lsp')
local work = os.getenv('GRANITE_DAYONE_WORK')

local function attached(buf)
  return #gl.get_clients(buf) > 0
end

local function finish()
  local f = assert(io.open(os.getenv('GRANITE_DAYONE_OUT'), 'w'))
  f:write(vim.json.encode(out))
  f:close()
  vim.cmd('qa!')
end

local ok, err = pcall(function()
  vim.cmd('edit ' .. work .. '/a.py')
  local a = vim.api.nvim_get_current_buf()
  out.attached = vim.wait(60000, function()
    return attached(a) and (gl.get_status(a) or {}).state == 'ready'
  end, 100)
  out.status_ready = gl.statusline(a)

  vim.cmd('GraniteToggle')
  out.after_toggle = { statusline = gl.statusline(a), enabled = gl.is_enabled(a) }
  vim.cmd('edit ' .. work .. '/b.py')
  local b = vim.api.nvim_get_current_buf()
  vim.wait(10000, function()
    return attached(b)
  end, 50)
  out.new_buffer_while_off = { attached = attached(b), enabled = gl.is_enabled(b) }
  vim.cmd('GraniteToggle on')
  out.after_toggle_on = { a = gl.is_enabled(a), b = gl.is_enabled(b), statusline = gl.statusline(b) }

  gl.set_filetypes({ 'lua' })
  vim.wait(5000, function()
    return not attached(a)
  end, 50)
  out.python_after_lua_only = { a = attached(a), statusline = gl.statusline(a) }
  vim.cmd('edit ' .. work .. '/c.lua')
  local c = vim.api.nvim_get_current_buf()
  out.lua_attached = vim.wait(10000, function()
    return attached(c)
  end, 50)
  gl.update({ filetypes = { 'python', 'lua' } })
  out.python_back = vim.wait(10000, function()
    return attached(a)
  end, 50)

  local done
  gl.download(os.getenv('GRANITE_DAYONE_MODEL'), function(success, path)
    done = { ok = success, path = path }
  end)
  vim.wait(60000, function()
    return done ~= nil
  end, 100)
  out.download = done
  out.download_cmd = gl.download_cmd('x/y')
  vim.cmd('checkhealth granite_lsp')
  out.health = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n')
end)
if not ok then
  out.error = tostring(err)
end
finish()
