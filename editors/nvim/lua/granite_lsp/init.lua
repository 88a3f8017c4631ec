-- granite_lsp: ghost-text code completions from the granite-lsp server
-- (LSP 3.18 textDocument/inlineCompletion).
--
-- Neovim 0.12+: uses the built-in vim.lsp.inline_completion.
-- Neovim 0.10/0.11 (or `force_fallback = true`): uses granite_lsp.fallback.

local util = require('granite_lsp.util')

local api = vim.api

local M = {}

M.name = 'granite_lsp'

--- Programming languages attached by default (`filetypes = "*"` attaches to every file).
M.default_filetypes = {
  'asm', 'awk', 'bash', 'c', 'clojure', 'cmake', 'cpp', 'crystal', 'cs', 'css', 'cuda', 'd',
  'dart', 'dockerfile', 'elixir', 'elm', 'erlang', 'fish', 'fortran', 'fsharp', 'gdscript',
  'gleam', 'go', 'graphql', 'groovy', 'haskell', 'hcl', 'html', 'java', 'javascript',
  'javascriptreact', 'json', 'jsonc', 'julia', 'kotlin', 'less', 'lisp', 'lua', 'make',
  'markdown', 'matlab', 'nim', 'nix', 'objc', 'objcpp', 'ocaml', 'perl', 'php', 'proto',
  'ps1', 'python', 'r', 'racket', 'ruby', 'rust', 'scala', 'scheme', 'scss', 'sh', 'solidity',
  'sql', 'svelte', 'swift', 'terraform', 'tex', 'toml', 'typescript', 'typescriptreact', 'vim',
  'vue', 'xml', 'yaml', 'zig', 'zsh',
}

M.defaults = {
  -- Server command line. Add "--model", path here or use `model` below.
  cmd = { 'granite-lsp', '--stdio' },
  -- Server options, sent as initializationOptions and as settings.granite
  -- (nil: the server's default).
  model = nil, -- Hugging Face id or local directory
  device = nil, -- "auto" | "cpu" | "cuda" | "mps"
  dtype = nil, -- e.g. "bfloat16", "float32"
  max_tokens = nil, -- most tokens generated per suggestion
  prefix_tokens = nil, -- tokens of context before the cursor
  suffix_tokens = nil, -- tokens of context after the cursor
  debounce_ms = nil, -- server-side debounce of requests
  max_lines = nil, -- most lines in one suggestion
  -- Suggestions per request you make (`next`/`prev` cycle through them; nil: the server's 3).
  candidates = nil,
  -- Suggestions per automatic request while typing (nil: the server's 1). The fallback renderer's
  -- `next` asks again for `candidates`; the native one (vim.lsp.inline_completion) cycles only through
  -- the items it was given while typing, so set 3 there to cycle, at a cost on every keystroke's
  -- request: no early first line, no speculative decoding, a state copy per alternative, and the
  -- answer waits for the alternatives.
  typing_candidates = nil,
  -- Extra raw initializationOptions / settings.granite keys (camelCase), merged last.
  server_options = {},
  -- Filetypes to attach to: a list, or "*" for every file buffer.
  filetypes = nil, -- nil: M.default_filetypes
  -- Markers of the project root (sent as the workspace folder).
  root_markers = { '.git', '.hg', 'pyproject.toml', 'package.json', 'Cargo.toml', 'go.mod' },
  -- One server (one loaded model) for every project; false: one per root directory.
  single_server = true,
  -- Ask for suggestions while typing; false: only on the `trigger` / `next` keys.
  auto_trigger = true,
  -- Use the plugin's own renderer even where vim.lsp.inline_completion exists.
  force_fallback = false,
  -- Client-side debounce of the fallback renderer (the native one uses its own 200 ms).
  client_debounce_ms = 75,
  -- Insert-mode keymaps, buffer-local in attached buffers; false disables one (or all).
  keymaps = {
    accept = '<Tab>', -- accept the whole suggestion; otherwise types the key
    accept_line = '<M-l>', -- accept up to the end of the line
    accept_word = '<M-w>', -- accept the next word
    next = '<M-]>', -- next suggestion (or ask for one)
    prev = '<M-[>', -- previous suggestion
    dismiss = '<C-]>', -- hide the suggestion; otherwise types the key
    trigger = '<M-\\>', -- ask for a suggestion now
  },
  -- Show granite/status "loading"/"ready" messages (errors are always shown).
  notify = true,
  -- Called as on_attach(client, bufnr) after the plugin's own attach.
  on_attach = nil,
}

---@type table?
M.config = nil

---@type table<integer, table> client_id -> last granite/status params
M.status = {}

--- Suggestions everywhere (:GraniteToggle); buffers attached while it is off start off.
M.globally_enabled = true

local augroup = api.nvim_create_augroup('granite_lsp', { clear = true })

local function native_available()
  local ok, ic = pcall(function()
    return vim.lsp.inline_completion
  end)
  return ok and type(ic) == 'table' and type(ic.enable) == 'function' and type(ic.get) == 'function'
end

--- Whether the built-in renderer is used.
function M.uses_native()
  return native_available() and not (M.config and M.config.force_fallback)
end

local camel = {
  model = 'model',
  device = 'device',
  dtype = 'dtype',
  max_tokens = 'maxTokens',
  prefix_tokens = 'prefixTokens',
  suffix_tokens = 'suffixTokens',
  debounce_ms = 'debounceMs',
  max_lines = 'maxLines',
  candidates = 'candidates',
  typing_candidates = 'typingCandidates',
}

--- The flat camelCase option table the server takes.
function M.server_options(cfg)
  cfg = cfg or M.config or M.defaults
  local out = {}
  for k, v in pairs(camel) do
    if cfg[k] ~= nil then
      out[v] = cfg[k]
    end
  end
  return vim.tbl_extend('force', out, cfg.server_options or {})
end

-- Suggestions ----------------------------------------------------------------------------

local native_ns
local function native_namespace()
  native_ns = native_ns or api.nvim_get_namespaces()['nvim.lsp.inline_completion']
  return native_ns
end

--- Neovim 0.12-dev creates the inline-completion autocmds (InsertEnter, CursorMovedI, ...)
--- without `buffer =`, so typing in any buffer sends requests for every attached buffer with
--- the current window's cursor. Re-create them buffer-local (no-op once Neovim does that).
local function pin_native_autocmds(bufnr)
  local ok, acs = pcall(api.nvim_get_autocmds, { group = 'nvim.lsp.inline_completion:' .. bufnr })
  if not ok then
    return
  end
  for _, ac in ipairs(acs) do
    if not ac.buflocal and type(ac.callback) == 'function' then
      api.nvim_del_autocmd(ac.id)
      api.nvim_create_autocmd(ac.event, {
        group = ac.group,
        buffer = bufnr,
        callback = ac.callback,
        desc = ac.desc,
      })
    end
  end
end

local function pin_native_later(bufnr)
  -- Neovim creates the capability in a vim.schedule() queued after LspAttach: run after it.
  vim.schedule(function()
    vim.schedule(function()
      if api.nvim_buf_is_valid(bufnr) then
        pin_native_autocmds(bufnr)
      end
    end)
  end)
end

local function resolve(bufnr)
  return (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
end

--- Whether a suggestion is drawn in `bufnr`.
function M.visible(bufnr)
  bufnr = resolve(bufnr)
  if M.uses_native() then
    local ns = native_namespace()
    return ns ~= nil and #api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { limit = 1 }) > 0
  end
  return require('granite_lsp.fallback').visible(bufnr)
end

local function accept_part(bufnr, kind)
  if M.uses_native() then
    if not M.visible(bufnr) then
      return false
    end
    if kind == 'all' then
      return vim.lsp.inline_completion.get({ bufnr = bufnr })
    end
    return vim.lsp.inline_completion.get({
      bufnr = bufnr,
      on_accept = function(item)
        local range
        if item.range then
          local s, e = item.range.start, item.range.end_
          range = { s.row, s.col, e.row, e.col }
        end
        local res = util.apply(bufnr, util.item_text(item.insert_text), range, kind)
        if res and res.full and item.command then
          util.exec_cmd(vim.lsp.get_client_by_id(item.client_id), item.command, bufnr)
        end
      end,
    })
  end
  return require('granite_lsp.fallback').accept(bufnr, kind)
end

--- Accepts the whole visible suggestion. Returns false when there is none.
function M.accept(bufnr)
  return accept_part(resolve(bufnr), 'all')
end

--- Accepts the suggestion up to the end of the current line.
function M.accept_line(bufnr)
  return accept_part(resolve(bufnr), 'line')
end

--- Accepts the next word of the suggestion.
function M.accept_word(bufnr)
  return accept_part(resolve(bufnr), 'word')
end

--- Asks for a suggestion at the cursor now.
function M.trigger(bufnr)
  bufnr = resolve(bufnr)
  if M.uses_native() then
    -- vim.lsp.inline_completion has no public "request now"; its CursorMovedI autocmd does it.
    pcall(api.nvim_exec_autocmds, 'CursorMovedI', {
      group = 'nvim.lsp.inline_completion:' .. bufnr,
      buffer = bufnr,
      modeline = false,
    })
  else
    require('granite_lsp.fallback').trigger(bufnr)
  end
end

--- Shows the next (count > 0) or previous suggestion.
function M.select(count, bufnr)
  bufnr = resolve(bufnr)
  if M.uses_native() then
    if M.visible(bufnr) then
      vim.lsp.inline_completion.select({ bufnr = bufnr, count = count })
    else
      M.trigger(bufnr)
    end
  else
    require('granite_lsp.fallback').select(bufnr, count)
  end
end

function M.next(bufnr)
  M.select(1, bufnr)
end

function M.prev(bufnr)
  M.select(-1, bufnr)
end

--- Hides the suggestion. Returns false when none was shown.
function M.dismiss(bufnr)
  bufnr = resolve(bufnr)
  if M.uses_native() then
    if not M.visible(bufnr) then
      return false
    end
    -- get() with a no-op accept handler hides the item and cancels pending requests.
    return vim.lsp.inline_completion.get({ bufnr = bufnr, on_accept = function() end })
  end
  return require('granite_lsp.fallback').dismiss(bufnr)
end

--- Whether suggestions are on in `bufnr`.
function M.is_enabled(bufnr)
  bufnr = resolve(bufnr)
  if M.uses_native() then
    return vim.lsp.inline_completion.is_enabled({ bufnr = bufnr })
  end
  return require('granite_lsp.fallback').is_enabled(bufnr)
end

--- Turns suggestions on or off in `bufnr` (nil: toggle).
function M.enable(enable, bufnr)
  bufnr = resolve(bufnr)
  if enable == nil then
    enable = not M.is_enabled(bufnr)
  end
  if M.uses_native() then
    vim.lsp.inline_completion.enable(enable, { bufnr = bufnr })
    if enable then
      pin_native_later(bufnr)
    end
  else
    require('granite_lsp.fallback').enable(bufnr, enable)
  end
  return enable
end

function M.toggle(bufnr)
  return M.enable(nil, bufnr)
end

--- Buffers a granite-lsp client is attached to.
local function attached_buffers()
  local seen, out = {}, {}
  for _, c in ipairs(M.get_clients()) do
    for b in pairs(c.attached_buffers or {}) do
      if not seen[b] and api.nvim_buf_is_valid(b) then
        seen[b] = true
        out[#out + 1] = b
      end
    end
  end
  return out
end

--- Turns suggestions on or off in every buffer, and for buffers attached later (nil: toggle).
function M.enable_all(enable)
  if enable == nil then
    enable = not M.globally_enabled
  end
  M.globally_enabled = enable
  for _, b in ipairs(attached_buffers()) do
    M.enable(enable, b)
  end
  pcall(vim.cmd, 'redrawstatus')
  return enable
end

--- A short statusline component: '' where granite-lsp is not attached, else its state, e.g.
--- "granite: ready", "granite: loading 40%", "granite: off", "granite: error".
--- Lualine: `sections = { lualine_x = { require('granite_lsp').statusline } }`;
--- plain: `vim.o.statusline = "%f %=%{v:lua.require'granite_lsp'.statusline()}"`.
function M.statusline(bufnr)
  bufnr = resolve(bufnr)
  if not M.config or #M.get_clients(bufnr) == 0 then
    return ''
  end
  if not M.globally_enabled or not M.is_enabled(bufnr) then
    return 'granite: off'
  end
  local st = M.get_status(bufnr)
  if not st then
    return 'granite: starting'
  end
  if st.state == 'loading' and st.percent then
    return ('granite: loading %d%%'):format(st.percent)
  end
  return 'granite: ' .. tostring(st.state or '?')
end

-- Clients --------------------------------------------------------------------------------

--- granite-lsp clients, optionally those attached to `bufnr`.
function M.get_clients(bufnr)
  local filter = { name = M.name }
  if bufnr then
    filter.bufnr = resolve(bufnr)
  end
  if vim.lsp.get_clients then
    return vim.lsp.get_clients(filter)
  end
  return vim.lsp.get_active_clients(filter)
end

--- Last granite/status of `bufnr`'s client (or of any client).
function M.get_status(bufnr)
  local clients = M.get_clients(bufnr)
  for _, c in ipairs(clients) do
    if M.status[c.id] then
      return M.status[c.id], c
    end
  end
  return nil, clients[1]
end

--- Counters from the server's granite/stats request (synchronous).
function M.stats(bufnr, timeout_ms)
  local client = M.get_clients(bufnr)[1] or M.get_clients()[1]
  if not client then
    return nil, 'no granite-lsp client is running'
  end
  local res, err = util.request_sync(client, 'granite/stats', vim.empty_dict(), timeout_ms or 2000)
  if not res then
    return nil, err or 'no answer'
  end
  if res.err then
    return nil, res.err.message or vim.inspect(res.err)
  end
  return res.result
end

local function on_status(err, params, ctx)
  if err or type(params) ~= 'table' then
    return
  end
  local prev = M.status[ctx.client_id]
  M.status[ctx.client_id] = params
  local cfg = M.config or M.defaults
  if params.state == 'error' then
    local msg = 'granite-lsp: ' .. (params.message or 'error')
    if tostring(params.message):find('was not found', 1, true) then
      msg = msg .. '\nRun :GraniteDownload to download the model, then it loads.'
    end
    vim.notify(msg, vim.log.levels.ERROR)
  elseif cfg.notify and params.state == 'ready' and not (prev and prev.state == 'ready') then
    vim.notify(
      ('granite-lsp: %s ready on %s (%s)'):format(
        tostring(params.model or '?'),
        tostring(params.device or '?'),
        tostring(params.dtype or '?')
      ),
      vim.log.levels.INFO
    )
  end
  if params.state == 'ready' then
    -- Suggestions asked for while the model loaded came back empty: ask again.
    local bufnr = api.nvim_get_current_buf()
    local client = vim.lsp.get_client_by_id(ctx.client_id)
    if client and client.attached_buffers and client.attached_buffers[bufnr] then
      local mode = api.nvim_get_mode().mode
      if mode:sub(1, 1) == 'i' and not M.visible(bufnr) then
        M.trigger(bufnr)
      end
    end
  end
  pcall(api.nvim_exec_autocmds, 'User', {
    pattern = 'GraniteLspStatus',
    modeline = false,
    data = vim.tbl_extend('force', params, { client_id = ctx.client_id }),
  })
end

local function set_keymaps(bufnr)
  local km = M.config.keymaps
  if km == false or type(km) ~= 'table' then
    return
  end
  local function map(lhs, fn, desc)
    if not lhs or lhs == false or lhs == '' then
      return
    end
    vim.keymap.set('i', lhs, fn, { buffer = bufnr, expr = true, silent = true, desc = desc })
  end
  -- With nothing shown, these keys do what they do without the plugin.
  local function or_key(fn, lhs)
    return function()
      if fn(bufnr) then
        return ''
      end
      return lhs
    end
  end
  map(km.accept, or_key(M.accept, km.accept), 'granite: accept suggestion')
  -- Alt keys typed with nothing shown would insert odd characters: do nothing instead.
  map(km.accept_line, or_key(M.accept_line, ''), 'granite: accept line')
  map(km.accept_word, or_key(M.accept_word, ''), 'granite: accept word')
  map(km.dismiss, or_key(M.dismiss, km.dismiss), 'granite: dismiss suggestion')
  map(km.next, function()
    M.next(bufnr)
    return ''
  end, 'granite: next suggestion')
  map(km.prev, function()
    M.prev(bufnr)
    return ''
  end, 'granite: previous suggestion')
  map(km.trigger, function()
    M.trigger(bufnr)
    return ''
  end, 'granite: ask for a suggestion')
end

-- granite/focus (README, "Custom protocol"): which buffer the user looks at and where the cursor is, on
-- BufEnter and on cursor moves in normal mode (typing sends its own requests), 150 ms after the last one,
-- so that the server can work ahead of the next request.
local focus_timer = nil
local function send_focus(client, bufnr)
  api.nvim_create_autocmd({ 'BufEnter', 'CursorMoved' }, {
    group = augroup,
    buffer = bufnr,
    callback = function()
      if focus_timer then
        focus_timer:stop()
      end
      focus_timer = vim.defer_fn(function()
        focus_timer = nil
        if util.is_stopped(client) or api.nvim_get_current_buf() ~= bufnr then
          return
        end
        local params = vim.lsp.util.make_position_params(0, client.offset_encoding or 'utf-16')
        client:notify('granite/focus', { textDocument = params.textDocument, position = params.position })
      end, 150)
    end,
  })
end

local function on_attach(client, bufnr)
  send_focus(client, bufnr)
  if M.uses_native() then
    vim.lsp.inline_completion.enable(M.globally_enabled, { bufnr = bufnr })
    if M.globally_enabled then
      pin_native_later(bufnr)
    end
  else
    require('granite_lsp.fallback').attach(bufnr, client.id)
    if not M.globally_enabled then
      require('granite_lsp.fallback').enable(bufnr, false)
    end
  end
  set_keymaps(bufnr)
  if type(M.config.on_attach) == 'function' then
    M.config.on_attach(client, bufnr)
  end
end

--- The vim.lsp client configuration.
function M.client_config(cfg)
  cfg = cfg or M.config
  local opts = M.server_options(cfg)
  local filetypes = cfg.filetypes
  if filetypes == '*' then
    filetypes = nil
  elseif filetypes == nil then
    filetypes = M.default_filetypes
  end
  local c = {
    name = M.name,
    cmd = cfg.cmd,
    filetypes = filetypes,
    root_markers = cfg.root_markers,
    init_options = opts,
    settings = { granite = opts },
    handlers = { ['granite/status'] = on_status },
  }
  if cfg.single_server then
    c.reuse_client = function(client, config)
      return client.name == config.name and not util.is_stopped(client)
    end
  end
  return c
end

local function highlights()
  api.nvim_set_hl(0, 'GraniteLspSuggestion', { link = 'ComplHint', default = true })
  if vim.tbl_isempty(api.nvim_get_hl(0, { name = 'ComplHint' })) then
    api.nvim_set_hl(0, 'GraniteLspSuggestion', { link = 'Comment', default = true })
  end
  api.nvim_set_hl(0, 'GraniteLspSuggestionHint', { link = 'MoreMsg', default = true })
end

--- Legacy start for Neovim 0.10 (no vim.lsp.config / vim.lsp.enable).
local function start_legacy(bufnr, cc)
  if vim.bo[bufnr].buftype ~= '' then
    return
  end
  if cc.filetypes and not vim.tbl_contains(cc.filetypes, vim.bo[bufnr].filetype) then
    return
  end
  local config = vim.deepcopy(cc)
  config.root_dir = vim.fs.root and vim.fs.root(bufnr, cc.root_markers) or nil
  if not config.root_dir then
    local found = vim.fs.find(cc.root_markers, {
      upward = true,
      path = vim.fs.dirname(api.nvim_buf_get_name(bufnr)),
    })[1]
    config.root_dir = found and vim.fs.dirname(found) or nil
  end
  config.root_markers = nil
  config.filetypes = nil
  config.reuse_client = nil
  vim.lsp.start(config, { bufnr = bufnr, reuse_client = cc.reuse_client })
end

--- Configures and enables the server. See README.md for every option.
function M.setup(opts)
  opts = opts or {}
  local cfg = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts)
  if opts.keymaps == false then
    cfg.keymaps = false
  end
  if type(opts.cmd) == 'table' then
    cfg.cmd = opts.cmd -- lists are replaced, not merged
  end
  if type(opts.root_markers) == 'table' then
    cfg.root_markers = opts.root_markers
  end
  if type(opts.filetypes) == 'table' then
    cfg.filetypes = opts.filetypes
  end
  if vim.fn.has('nvim-0.10') ~= 1 then
    vim.notify('granite_lsp needs Neovim 0.10 or newer', vim.log.levels.ERROR)
    return
  end
  M.config = cfg
  highlights()
  api.nvim_clear_autocmds({ group = augroup })
  api.nvim_create_autocmd('ColorScheme', { group = augroup, callback = highlights })
  api.nvim_create_autocmd('LspAttach', {
    group = augroup,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == M.name then
        on_attach(client, args.buf)
      end
    end,
  })
  api.nvim_create_autocmd('LspDetach', {
    group = augroup,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == M.name then
        require('granite_lsp.fallback').detach(args.buf)
      end
    end,
  })

  local cc = M.client_config(cfg)
  if vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(M.name, cc)
    vim.lsp.enable(M.name)
  else
    api.nvim_create_autocmd('FileType', {
      group = augroup,
      callback = function(args)
        start_legacy(args.buf, M.client_config()) -- read live: filetypes may change after setup
      end,
    })
    -- Buffers opened before setup().
    for _, b in ipairs(api.nvim_list_bufs()) do
      if api.nvim_buf_is_loaded(b) and vim.bo[b].filetype ~= '' then
        start_legacy(b, cc)
      end
    end
  end
end

--- Changes the filetypes attached to after setup(): a list, or "*" for every file buffer. Open buffers
--- of a filetype added get the server now; those of a filetype removed are detached.
function M.set_filetypes(filetypes)
  if not M.config then
    return
  end
  M.config.filetypes = filetypes
  local cc = M.client_config()
  local native = vim.lsp.config and vim.lsp.enable
  if native then
    vim.lsp.config[M.name] = cc -- replaces the whole config ("*": no filetypes key at all)
  end
  for _, b in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(b) and vim.bo[b].buftype == '' and vim.bo[b].filetype ~= '' then
      local wanted = cc.filetypes == nil or vim.tbl_contains(cc.filetypes, vim.bo[b].filetype)
      local clients = M.get_clients(b)
      if wanted and #clients == 0 then
        if native then -- vim.lsp.enable's own FileType handler, not the buffer's ftplugins again
          api.nvim_exec_autocmds('FileType', { group = 'nvim.lsp.enable', buffer = b, modeline = false })
        else
          start_legacy(b, cc)
        end
      elseif not wanted then
        for _, c in ipairs(clients) do
          vim.lsp.buf_detach_client(b, c.id)
        end
      end
    end
  end
end

--- The server's executable running a subcommand (`python -m granite_lsp` stays a module run).
local function subcommand(name, extra)
  local cmd = (M.config or M.defaults).cmd
  local out = { cmd[1] }
  if cmd[2] == '-m' and cmd[3] then
    out[2], out[3] = '-m', cmd[3]
  end
  out[#out + 1] = name
  vim.list_extend(out, extra or {})
  return out
end

--- The command that downloads a model.
function M.download_cmd(model)
  return subcommand('download', (model and model ~= '') and { model } or {})
end

--- `granite-lsp doctor` with the model and device this setup asks for (what :checkhealth shows).
function M.doctor_cmd()
  local cfg = M.config or M.defaults
  local extra = {}
  for _, key in ipairs({ 'model', 'device', 'dtype' }) do
    if cfg[key] then
      vim.list_extend(extra, { '--' .. key, tostring(cfg[key]) })
    end
  end
  return subcommand('doctor', extra)
end

--- Runs `granite-lsp download [model]` (default: the configured model), showing its progress in the
--- message area; on success the running servers are asked to load it. `on_done(ok, path_or_error)`.
function M.download(model, on_done)
  model = (model and model ~= '') and model or (M.config and M.config.model) or nil
  local cmd = M.download_cmd(model)
  local last = ''
  local function show(line)
    vim.schedule(function()
      api.nvim_echo({ { 'granite-lsp download: ' .. line } }, false, {})
    end)
  end
  local ok, job = pcall(vim.system, cmd, {
    text = true,
    stderr = function(_, data)
      if data then
        for piece in data:gmatch('[^\r\n]+') do
          last = piece
        end
        show(last)
      end
    end,
  }, function(res)
    vim.schedule(function()
      local path = vim.trim(res.stdout or '')
      if res.code == 0 and path ~= '' then
        vim.notify('granite-lsp: model downloaded to ' .. path .. '; loading it', vim.log.levels.INFO)
        M.update({}) -- a configuration change makes a server without a model try again
      else
        path = last ~= '' and last or ('exit code ' .. tostring(res.code))
        vim.notify('granite-lsp download failed: ' .. path, vim.log.levels.ERROR)
      end
      if on_done then
        on_done(res.code == 0, path)
      end
    end)
  end)
  if not ok then
    vim.notify('granite-lsp download: cannot run ' .. table.concat(cmd, ' ') .. ': ' .. tostring(job), vim.log.levels.ERROR)
    if on_done then
      on_done(false, tostring(job))
    end
  end
end

--- Sends changed options to running servers (workspace/didChangeConfiguration).
function M.update(opts)
  if not M.config then
    return
  end
  if opts and opts.filetypes ~= nil then
    M.set_filetypes(opts.filetypes)
    opts = vim.deepcopy(opts)
    opts.filetypes = nil
  end
  M.config = vim.tbl_deep_extend('force', M.config, opts or {})
  local so = M.server_options(M.config)
  for _, client in ipairs(M.get_clients()) do
    client.settings = vim.tbl_deep_extend('force', client.settings or {}, { granite = so })
    if util.has_011 then
      client:notify('workspace/didChangeConfiguration', { settings = client.settings })
    else
      client.notify('workspace/didChangeConfiguration', { settings = client.settings })
    end
  end
end

--- Human-readable status lines (used by :GraniteLspStatus).
function M.status_lines(bufnr)
  bufnr = resolve(bufnr)
  local lines = {}
  if not M.config then
    return { 'granite_lsp: setup() was not called' }
  end
  lines[#lines + 1] = ('renderer: %s'):format(
    M.uses_native() and 'native vim.lsp.inline_completion' or 'granite_lsp fallback'
  )
  local clients = M.get_clients()
  if #clients == 0 then
    lines[#lines + 1] = 'server: not running (cmd: ' .. table.concat(M.config.cmd, ' ') .. ')'
    return lines
  end
  for _, c in ipairs(clients) do
    local st = M.status[c.id]
    lines[#lines + 1] = ('server: client %d, %s'):format(
      c.id,
      st
          and ('%s, model %s, device %s, dtype %s%s'):format(
            tostring(st.state),
            tostring(st.model or '?'),
            tostring(st.device or '?'),
            tostring(st.dtype or '?'),
            st.message and (' (' .. tostring(st.message) .. ')') or ''
          )
        or 'no granite/status yet'
    )
  end
  local attached = #M.get_clients(bufnr) > 0
  lines[#lines + 1] = ('this buffer: %s'):format(
    not attached and 'not attached' or (M.is_enabled(bufnr) and 'suggestions on' or 'suggestions off')
  )
  return lines
end

return M
