-- :checkhealth granite_lsp
local M = {}

local health = vim.health

local function version_string()
  local v = vim.version()
  return ('%d.%d.%d%s'):format(v.major, v.minor, v.patch, v.prerelease and ('-' .. tostring(v.prerelease)) or '')
end

function M.check()
  health.start('granite_lsp: Neovim')
  if vim.fn.has('nvim-0.10') == 1 then
    health.ok('Neovim ' .. version_string())
  else
    health.error('Neovim ' .. version_string() .. ' is too old', { 'granite_lsp needs Neovim 0.10 or newer' })
    return
  end
  local gl = require('granite_lsp')
  local native = type(vim.lsp.inline_completion) == 'table'
  if native then
    health.ok('vim.lsp.inline_completion is available (Neovim 0.12+)')
  else
    health.info('vim.lsp.inline_completion is not available: the plugin draws suggestions itself')
  end
  if not gl.config then
    health.warn('require("granite_lsp").setup() has not been called')
    return
  end
  health.info('renderer: ' .. (gl.uses_native() and 'native' or 'fallback'))

  health.start('granite_lsp: server')
  local cmd = gl.config.cmd or {}
  local exe = cmd[1]
  if not exe or vim.fn.executable(exe) ~= 1 then
    health.error(('server executable %q not found'):format(tostring(exe)), {
      'install it from its repository (it is not on PyPI): pipx install /path/to/granite-lsp'
        .. ' (or uv tool install /path/to/granite-lsp), so that granite-lsp is on $PATH',
      'or set cmd = { "/path/to/venv/bin/granite-lsp", "--stdio" } in setup()',
    })
  else
    health.ok(('server executable: %s'):format(vim.fn.exepath(exe)))
    local ok, res = pcall(function()
      return vim.system({ exe, '--version' }, { text = true }):wait(15000)
    end)
    if ok and res and res.code == 0 then
      health.ok('version: ' .. vim.trim((res.stdout or '') .. (res.stderr or '')))
    else
      health.warn(('`%s --version` failed: %s'):format(exe, ok and vim.trim((res and res.stderr) or '') or tostring(res)))
    end
  end

  if exe and vim.fn.executable(exe) == 1 then
    -- The same report as `granite-lsp doctor` in a terminal (it may compile the CPU kernels once).
    local cmd = gl.doctor_cmd()
    local ok, res = pcall(function()
      return vim.system(cmd, { text = true }):wait(240000)
    end)
    if ok and res then
      health.start('granite_lsp: granite-lsp doctor')
      for line in vim.gsplit(vim.trim(res.stdout or ''), '\n', { plain = true }) do
        if line:find('NOT FOUND', 1, true) or line:find('unusable', 1, true) then
          health.error(line)
        elseif line ~= '' then
          health.info(line)
        end
      end
      if res.code ~= 0 then
        health.error(('`%s` reports a problem (exit code %d)'):format(table.concat(cmd, ' '), res.code))
      end
    else
      health.warn('granite-lsp doctor failed: ' .. tostring(res))
    end
  end

  local opts = gl.server_options()
  health.info('server options: ' .. (next(opts) and vim.inspect(opts, { newline = ' ', indent = '' }) or '(server defaults)'))

  local clients = gl.get_clients()
  if #clients == 0 then
    health.info('no granite-lsp client is running (open a file of a configured filetype to start one)')
    return
  end
  for _, client in ipairs(clients) do
    local st = gl.status[client.id]
    if not st then
      health.warn(('client %d: no granite/status received yet'):format(client.id))
    elseif st.state == 'ready' then
      health.ok(('client %d: ready: model %s on %s (%s)'):format(client.id, tostring(st.model), tostring(st.device), tostring(st.dtype)))
    elseif st.state == 'loading' then
      health.info(('client %d: loading %s'):format(client.id, tostring(st.model)))
    else
      health.error(('client %d: %s'):format(client.id, tostring(st.message or st.state)))
    end
    local caps = client.server_capabilities or {}
    if caps.inlineCompletionProvider then
      health.ok('server offers textDocument/inlineCompletion')
    else
      health.error('server does not offer textDocument/inlineCompletion')
    end
  end
  local stats, err = gl.stats(nil, 2000)
  if stats then
    health.ok('granite/stats: ' .. vim.inspect(stats, { newline = ' ', indent = '' }))
  else
    health.warn('granite/stats: ' .. tostring(err))
  end
end

return M
