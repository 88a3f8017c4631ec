-- Ghost-text inline completion for Neovim versions without vim.lsp.inline_completion
-- (0.10, 0.11), or when `force_fallback = true`.
--
-- Requests textDocument/inlineCompletion itself (debounced) on InsertEnter / TextChangedI /
-- CursorMovedI, draws the current item with extmarks (inline virtual text for the first line,
-- virtual lines for the rest) and applies it on accept.

local util = require('granite_lsp.util')

local api = vim.api
local uv = vim.uv or vim.loop

local M = {}

M.ns = api.nvim_create_namespace('granite_lsp.ghost')

local TRIGGER_INVOKED = 1
local TRIGGER_AUTOMATIC = 2

---@class granite_lsp.FallbackItem
---@field text string suggestion text, relative to the range start
---@field range? integer[] srow, scol, erow, ecol (0-based, bytes)
---@field command? table
---@field client_id integer

---@class granite_lsp.FallbackState
---@field client_id integer
---@field enabled boolean
---@field timer? userdata
---@field pending? {client_id: integer, id: integer}
---@field items granite_lsp.FallbackItem[]
---@field index integer
---@field anchor? {row: integer, col: integer, tick: integer} where the ghost text was drawn
---@field augroup integer

---@type table<integer, granite_lsp.FallbackState>
local states = {}

local function config()
  return require('granite_lsp').config or {}
end

local function stop_timer(st)
  if st.timer then
    local t = st.timer
    st.timer = nil
    if not t:is_closing() then
      t:stop()
      t:close()
    end
  end
end

local function cancel_pending(st)
  if st.pending then
    local client = vim.lsp.get_client_by_id(st.pending.client_id)
    if client then
      pcall(util.cancel_request, client, st.pending.id)
    end
    st.pending = nil
  end
end

local function hide(bufnr)
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  end
  local st = states[bufnr]
  if st then
    st.anchor = nil
  end
end

--- Clears the suggestion and any request in flight.
function M.clear(bufnr)
  local st = states[bufnr]
  if not st then
    return
  end
  stop_timer(st)
  cancel_pending(st)
  st.items = {}
  st.index = 1
  hide(bufnr)
end

local function cursor_of(bufnr)
  local winid = api.nvim_get_current_win()
  if api.nvim_win_get_buf(winid) ~= bufnr then
    return nil
  end
  local c = api.nvim_win_get_cursor(winid)
  return c[1] - 1, c[2]
end

local function in_insert_mode()
  local mode = api.nvim_get_mode().mode
  return mode:sub(1, 1) == 'i' or mode:sub(1, 1) == 'R'
end

local function display_text(s)
  -- Tabs in virtual text do not expand like buffer tabs: show them as spaces.
  local ts = vim.bo.tabstop > 0 and vim.bo.tabstop or 8
  return (s:gsub('\t', string.rep(' ', ts)))
end

--- Draws items[index] at the cursor.
local function show(bufnr, hint)
  local st = states[bufnr]
  hide(bufnr)
  if not st or not st.items[st.index] then
    return
  end
  local crow, ccol = cursor_of(bufnr)
  if not crow then
    return
  end
  local item = st.items[st.index]
  local line = util.get_line(bufnr, crow)
  local text = item.text
  local range = item.range
  local ghost = text
  if range and range[1] == crow and range[2] <= ccol then
    local typed = line:sub(range[2] + 1, ccol)
    if text:sub(1, #typed) == typed then
      ghost = text:sub(#typed + 1)
    end
  end
  local lines = vim.split(ghost, '\n', { plain = true })
  -- When the item replaces text right after the cursor that its first line ends with
  -- (e.g. a closing bracket), do not draw that text twice.
  if range and #lines == 1 and range[3] == crow and range[4] > ccol then
    local tail = line:sub(ccol + 1, range[4])
    if tail ~= '' and lines[1]:sub(-#tail) == tail then
      lines[1] = lines[1]:sub(1, #lines[1] - #tail)
    end
  end
  local hl = 'GraniteLspSuggestion'
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { display_text(lines[i]), hl } }
  end
  local virt_text = { { display_text(lines[1]), hl } }
  if hint then
    local last = #virt_lines > 0 and virt_lines[#virt_lines] or virt_text
    last[#last + 1] = { hint, 'GraniteLspSuggestionHint' }
  end
  local opts = {
    virt_text = virt_text,
    virt_text_pos = 'inline',
    hl_mode = 'combine',
    right_gravity = false,
  }
  if #virt_lines > 0 then
    opts.virt_lines = virt_lines
  end
  api.nvim_buf_set_extmark(bufnr, M.ns, crow, ccol, opts)
  st.anchor = { row = crow, col = ccol, tick = api.nvim_buf_get_changedtick(bufnr) }
end

--- Normalizes a server item to byte positions in the current buffer contents.
---@return granite_lsp.FallbackItem?
local function normalize(bufnr, client, item)
  if type(item) ~= 'table' or item.insertText == nil then
    return nil
  end
  local text = util.item_text(item.insertText)
  local range
  if type(item.range) == 'table' and item.range.start and item.range['end'] then
    local enc = client.offset_encoding or 'utf-16'
    local s, e = item.range.start, item.range['end']
    local srow, erow = s.line, e.line
    local scol = util.lsp_to_byte(util.get_line(bufnr, srow), s.character, enc)
    local ecol = util.lsp_to_byte(util.get_line(bufnr, erow), e.character, enc)
    range = { srow, scol, erow, ecol }
  end
  return { text = text, range = range, command = item.command, client_id = client.id }
end

local function visible_suggestion(bufnr)
  local st = states[bufnr]
  if not st or not st.anchor or not st.items[st.index] then
    return nil
  end
  local crow, ccol = cursor_of(bufnr)
  if crow ~= st.anchor.row or ccol ~= st.anchor.col then
    return nil
  end
  if api.nvim_buf_get_changedtick(bufnr) ~= st.anchor.tick then
    return nil
  end
  return st.items[st.index]
end

--- Sends textDocument/inlineCompletion for the cursor position now.
function M.request(bufnr, trigger_kind)
  local st = states[bufnr]
  if not st or not st.enabled then
    return
  end
  stop_timer(st)
  cancel_pending(st)
  if not in_insert_mode() then
    return
  end
  local crow, ccol = cursor_of(bufnr)
  if not crow then
    return
  end
  local client = vim.lsp.get_client_by_id(st.client_id)
  if not client or util.is_stopped(client) then
    return
  end
  local enc = client.offset_encoding or 'utf-16'
  local line = util.get_line(bufnr, crow)
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(bufnr) },
    position = { line = crow, character = util.byte_to_lsp(line, ccol, enc) },
    context = { triggerKind = trigger_kind or TRIGGER_AUTOMATIC },
  }
  -- The request flushes pending didChange notifications for this buffer first.
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local ok, id
  ok, id = util.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    if st.pending and st.pending.id == id then
      st.pending = nil
    end
    if err then
      if err.code ~= -32800 then -- RequestCancelled
        vim.lsp.log.warn('granite_lsp inlineCompletion', err)
      end
      return
    end
    -- Drop answers for a position or text that is gone.
    if not api.nvim_buf_is_valid(bufnr) or api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return
    end
    local r, c = cursor_of(bufnr)
    if r ~= crow or c ~= ccol or not in_insert_mode() then
      return
    end
    local items = {}
    for _, raw in ipairs((result and (result.items or result)) or {}) do
      local it = normalize(bufnr, client, raw)
      if it and it.text ~= '' then
        items[#items + 1] = it
      end
    end
    st.items = items
    st.invoked = trigger_kind == TRIGGER_INVOKED
    st.index = 1
    local hint
    if st.select_after and #items > 1 then -- `next`/`prev` asked for these: move on from the first
      st.index = (st.select_after % #items) + 1
      hint = (' (%d/%d)'):format(st.index, #items)
    end
    st.select_after = nil
    show(bufnr, hint)
  end, bufnr)
  if ok and id then
    st.pending = { client_id = client.id, id = id }
  end
end

local function schedule_request(bufnr)
  local st = states[bufnr]
  if not st or not st.enabled then
    return
  end
  stop_timer(st)
  local delay = config().client_debounce_ms or 75
  local timer = uv.new_timer()
  st.timer = timer
  timer:start(
    delay,
    0,
    vim.schedule_wrap(function()
      if st.timer ~= timer then
        return
      end
      stop_timer(st)
      if api.nvim_buf_is_valid(bufnr) and api.nvim_get_current_buf() == bufnr then
        M.request(bufnr, TRIGGER_AUTOMATIC)
      end
    end)
  )
end

local function on_change(bufnr)
  local st = states[bufnr]
  if not st then
    return
  end
  if st.anchor then
    local crow, ccol = cursor_of(bufnr)
    if
      crow == st.anchor.row
      and ccol == st.anchor.col
      and api.nvim_buf_get_changedtick(bufnr) == st.anchor.tick
    then
      return -- nothing moved since the suggestion was drawn (e.g. our own partial accept)
    end
  end
  M.clear(bufnr)
  if config().auto_trigger ~= false then
    schedule_request(bufnr)
  end
end

--- Starts the fallback for `bufnr` with client `client_id`.
function M.attach(bufnr, client_id)
  if states[bufnr] then
    states[bufnr].client_id = client_id
    return
  end
  local augroup = api.nvim_create_augroup('granite_lsp_fallback_' .. bufnr, { clear = true })
  local st = { client_id = client_id, enabled = true, items = {}, index = 1, augroup = augroup }
  states[bufnr] = st
  local handlers = {
    {
      'InsertEnter',
      function()
        if config().auto_trigger ~= false then
          schedule_request(bufnr)
        end
      end,
    },
    { { 'TextChangedI', 'CursorMovedI' }, function() on_change(bufnr) end },
    { { 'InsertLeave', 'BufLeave' }, function() M.clear(bufnr) end },
    { { 'BufUnload', 'BufWipeout' }, function() M.detach(bufnr) end },
  }
  for _, h in ipairs(handlers) do
    api.nvim_create_autocmd(h[1], { group = augroup, buffer = bufnr, callback = h[2] })
  end
end

function M.detach(bufnr)
  local st = states[bufnr]
  if not st then
    return
  end
  M.clear(bufnr)
  pcall(api.nvim_del_augroup_by_id, st.augroup)
  states[bufnr] = nil
end

function M.is_attached(bufnr)
  return states[bufnr] ~= nil
end

function M.is_enabled(bufnr)
  local st = states[bufnr]
  return st ~= nil and st.enabled
end

function M.enable(bufnr, enable)
  local st = states[bufnr]
  if not st then
    return
  end
  st.enabled = enable
  if not enable then
    M.clear(bufnr)
  end
end

function M.visible(bufnr)
  return visible_suggestion(bufnr) ~= nil
end

--- Current suggestion text (nil when none is shown).
function M.current_text(bufnr)
  local item = visible_suggestion(bufnr)
  return item and item.text or nil
end

--- Accepts the visible suggestion, whole or in part. Returns false when none is shown.
--- The edit itself is scheduled so this can run inside an <expr> mapping.
---@param kind 'all'|'line'|'word'
function M.accept(bufnr, kind)
  local item = visible_suggestion(bufnr)
  if not item then
    return false
  end
  vim.schedule(function()
    local st = states[bufnr]
    if not st or visible_suggestion(bufnr) ~= item then
      return
    end
    stop_timer(st)
    cancel_pending(st)
    hide(bufnr)
    local res = util.apply(bufnr, item.text, item.range, kind)
    if not res then
      return
    end
    if res.full then
      st.items = {}
      st.index = 1
      util.exec_cmd(vim.lsp.get_client_by_id(item.client_id), item.command, bufnr)
      return
    end
    -- Keep showing what is left of the suggestion at the new cursor.
    local crow, ccol = cursor_of(bufnr)
    if not crow or res.rest == '' then
      return
    end
    local range = { crow, ccol, crow, ccol + res.tail_left }
    st.items = {
      { text = res.rest, range = range, command = item.command, client_id = item.client_id },
    }
    st.index = 1
    show(bufnr)
  end)
  return true
end

--- Cycles through the suggestions; asks for some when there are none, and for the alternatives
--- (an invoked request gets several) when an automatic request's one is shown.
function M.select(bufnr, count)
  local st = states[bufnr]
  if not st then
    return
  end
  local n = #st.items
  if n == 0 or not visible_suggestion(bufnr) or (n == 1 and not st.invoked) then
    st.select_after = n == 1 and visible_suggestion(bufnr) and count or nil
    M.request(bufnr, TRIGGER_INVOKED)
    return
  end
  st.index = (st.index - 1 + count) % n + 1
  show(bufnr, n > 1 and (' (%d/%d)'):format(st.index, n) or nil)
end

function M.dismiss(bufnr)
  if not visible_suggestion(bufnr) then
    return false
  end
  M.clear(bufnr)
  return true
end

--- Re-requests in the current buffer (e.g. once the model finished loading).
function M.trigger(bufnr)
  if states[bufnr] and in_insert_mode() and api.nvim_get_current_buf() == bufnr then
    M.request(bufnr, TRIGGER_INVOKED)
  end
end

return M
