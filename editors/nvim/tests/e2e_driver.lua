-- End-to-end driver for the granite_lsp plugin (used by tests/e2e/test_nvim.py).
--
--   nvim --headless --clean -l e2e_driver.lua SPEC.json OUT.json
--
-- Starts a second Neovim (`--embed --headless`) with the plugin set up as a user would,
-- drives it over msgpack-RPC like a user typing (nvim_input), and writes what happened to
-- OUT.json. The pass/fail decision is left to the caller.
--
-- SPEC = {
--   nvim = "/path/to/nvim", init = "/path/to/init.lua", env = { NAME = "value" },
--   ready_timeout_s = 60, suggest_timeout_s = 60,
--   cases = { { name, path, line, character (UTF-16), key (e.g. "<Tab>"), cycle (bool: press next,
--     then prev, before the key, and record the ghost text each time) }, ... },
-- }

local spec_path, out_path = _G.arg[1], _G.arg[2]
local spec = vim.json.decode(table.concat(vim.fn.readfile(spec_path), '\n'))

local out = { cases = {}, events = {} }
local t0 = vim.uv.hrtime()

local function now()
  return (vim.uv.hrtime() - t0) / 1e9
end

local function event(msg)
  out.events[#out.events + 1] = ('%.2fs %s'):format(now(), msg)
end

local function write_out()
  local f = assert(io.open(out_path, 'w'))
  f:write(vim.json.encode(out))
  f:close()
end

local argv = { spec.nvim, '--embed', '--headless', '--clean', '-n', '-i', 'NONE', '-u', spec.init }
local stderr = {}
local ch = vim.fn.jobstart(argv, {
  rpc = true,
  env = spec.env,
  on_stderr = function(_, data)
    for _, l in ipairs(data or {}) do
      if l ~= '' then
        stderr[#stderr + 1] = l
      end
    end
  end,
})
if ch <= 0 then
  out.fatal = 'could not start ' .. spec.nvim
  write_out()
  os.exit(1)
end
event('child nvim started')

local function lua(code, ...)
  return vim.fn.rpcrequest(ch, 'nvim_exec_lua', code, { ... })
end

local function input(keys)
  event('input ' .. keys)
  return vim.fn.rpcrequest(ch, 'nvim_input', keys)
end

--- Polls `fn` (evaluated in the child) until it returns a truthy value or the timeout ends.
local deadline = spec.deadline_s or 110

local function wait_for(timeout_s, code, ...)
  local args = { ... }
  timeout_s = math.max(0.1, math.min(timeout_s, deadline - now()))
  local value
  local ok = vim.wait(timeout_s * 1000, function()
    value = vim.fn.rpcrequest(ch, 'nvim_exec_lua', code, args)
    return value ~= nil and value ~= false and value ~= vim.NIL
  end, 50)
  return ok, value
end

local function mode()
  return vim.fn.rpcrequest(ch, 'nvim_get_mode').mode
end

local function diagnostics()
  local d = {}
  d.mode = mode()
  d.messages = vim.fn.rpcrequest(ch, 'nvim_exec2', 'messages', { output = true }).output
  d.status = lua([[
    local gl = require('granite_lsp')
    return { lines = gl.status_lines(0), status = gl.get_status(0) }
  ]])
  d.lsp_log_path = lua([[return vim.lsp.log and vim.lsp.log.get_filename and vim.lsp.log.get_filename()
    or vim.lsp.get_log_path()]])
  d.child_stderr = table.concat(stderr, '\n')
  return d
end

local function run_case(case)
  local res = { name = case.name, path = case.path }
  local started = now()
  local function fail(msg)
    res.error = msg
    res.diagnostics = diagnostics()
    event(case.name .. ': ' .. msg)
    return res
  end

  input('<Esc>')
  vim.wait(2000, function()
    return mode() == 'n'
  end, 20)
  lua('vim.cmd.edit(vim.fn.fnameescape(...))', case.path)
  res.filetype = lua('return vim.bo.filetype')

  local ok = wait_for(spec.ready_timeout_s or 60, [[
    local c = vim.lsp.get_clients({ bufnr = 0, name = 'granite_lsp' })[1]
    return c ~= nil and c.initialized == true
  ]])
  if not ok then
    return fail('no initialized granite_lsp client attached to the buffer')
  end
  event(case.name .. ': client attached')

  -- Wait for the model: granite/status "ready" (or an error).
  local _, state = wait_for(spec.ready_timeout_s or 60, [[
    local st = require('granite_lsp').get_status(0)
    return st and (st.state == 'ready' or st.state == 'error') and st.state
  ]])
  res.status_state = state
  if state == 'error' then
    return fail('server reported granite/status error')
  end
  event(case.name .. ': server state ' .. tostring(state))

  -- Cursor: LSP position (UTF-16) -> byte column, then enter insert mode like a user.
  local pos = lua([[
    local row, character = ...
    local line = vim.api.nvim_buf_get_lines(0, row, row + 1, true)[1]
    local col
    if vim.fn.has('nvim-0.11') == 1 then
      col = vim.str_byteindex(line, 'utf-16', character, false)
    else
      col = vim.str_byteindex(line, character, true)
    end
    return { col = col, len = #line }
  ]], case.line, case.character)
  res.byte_col = pos.col
  if pos.col < pos.len then
    lua('vim.api.nvim_win_set_cursor(0, { ... })', case.line + 1, pos.col)
    input('i')
  else
    lua('vim.api.nvim_win_set_cursor(0, { ... })', case.line + 1, 0)
    input('A')
  end
  ok = wait_for(5, [[
    local row, col = ...
    local c = vim.api.nvim_win_get_cursor(0)
    return vim.api.nvim_get_mode().mode == 'i' and c[1] == row and c[2] == col
  ]], case.line + 1, pos.col)
  if not ok then
    return fail('could not put the cursor at the fixture position in insert mode')
  end
  local tick = lua('return vim.api.nvim_buf_get_changedtick(0)')

  ok = wait_for(spec.suggest_timeout_s or 60, "return require('granite_lsp').visible(0)")
  if not ok then
    return fail('no suggestion was shown')
  end
  res.suggest_s = now() - started
  event(('%s: suggestion shown after %.2fs'):format(case.name, res.suggest_s))
  res.ghost = lua([[
    local out = {}
    for _, name in ipairs({ 'nvim.lsp.inline_completion', 'granite_lsp.ghost' }) do
      local ns = vim.api.nvim_get_namespaces()[name]
      if ns then
        for _, m in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
          out[#out + 1] = { ns = name, row = m[2], col = m[3], virt_text = m[4].virt_text,
            virt_lines = m[4].virt_lines, virt_text_pos = m[4].virt_text_pos }
        end
      end
    end
    return out
  ]])

  if case.cycle then
    -- next / prev (the plugin's <M-]> / <M-[>): another suggestion, then the first again.
    lua([[
      _G.granite_e2e_ghost = function()
        local parts = {}
        local function add(chunks)
          for _, c in ipairs(chunks or {}) do
            if c[2] ~= 'ComplHintMore' and c[2] ~= 'GraniteLspSuggestionHint' then -- the "(2/3)" hints
              parts[#parts + 1] = c[1]
            end
          end
        end
        for _, name in ipairs({ 'nvim.lsp.inline_completion', 'granite_lsp.ghost' }) do
          local ns = vim.api.nvim_get_namespaces()[name]
          for _, m in ipairs(ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}) do
            add(m[4].virt_text)
            for _, l in ipairs(m[4].virt_lines or {}) do
              parts[#parts + 1] = '\n'
              add(l)
            end
          end
        end
        return table.concat(parts)
      end
    ]])
    local cyc = { first = lua('return granite_e2e_ghost()') }
    res.cycle = cyc
    input('<M-]>')
    local _, second = wait_for(30, "local g = granite_e2e_ghost(); return g ~= '' and g ~= ... and g", cyc.first)
    cyc.second = second
    input('<M-[>')
    wait_for(10, 'return granite_e2e_ghost() == ...', cyc.first)
    cyc.back = lua('return granite_e2e_ghost()')
    event(case.name .. ': cycled ' .. vim.json.encode(cyc))
  end

  input(case.key)
  res.changed = wait_for(10, 'return vim.api.nvim_buf_get_changedtick(0) ~= ...', tick)
  -- Let the edit (scheduled by the accept mapping) and its autocmds settle.
  vim.wait(300)
  res.mode_after = mode()
  res.cursor_after = lua('return vim.api.nvim_win_get_cursor(0)')
  res.visible_after = lua("return require('granite_lsp').visible(0)")
  res.lines = lua('return vim.api.nvim_buf_get_lines(0, 0, -1, true)')
  input('<Esc>')
  vim.wait(2000, function()
    return mode() == 'n'
  end, 20)
  -- Save it as a user would; the caller compares the file with the expected text.
  local wok, werr = pcall(lua, 'vim.cmd.write()')
  if not wok then
    return fail('write failed: ' .. tostring(werr))
  end
  if not res.changed then
    return fail('the accept key did not change the buffer')
  end
  res.diagnostics = diagnostics()
  event(case.name .. ': done')
  return res
end

for _, case in ipairs(spec.cases) do
  local ok, res
  if now() >= deadline then
    ok, res = true, { name = case.name, error = 'not run: the driver deadline passed' }
  else
    ok, res = pcall(run_case, case)
  end
  if not ok then
    res = { name = case.name, error = 'driver error: ' .. tostring(res) }
    pcall(function()
      res.diagnostics = diagnostics()
    end)
  end
  out.cases[#out.cases + 1] = res
  write_out()
end

local sok, stats = pcall(lua, "return (require('granite_lsp').stats(nil, 2000))")
out.stats = sok and stats or nil
out.child_stderr = table.concat(stderr, '\n')
pcall(vim.fn.rpcnotify, ch, 'nvim_command', 'qa!')
vim.wait(3000, function()
  return vim.fn.jobwait({ ch }, 0)[1] ~= -1
end, 50)
vim.fn.jobstop(ch)
out.elapsed_s = now()
write_out()
os.exit(0)
