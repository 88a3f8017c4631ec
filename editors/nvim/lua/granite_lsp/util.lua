-- Helpers shared by the native (Neovim 0.12+) and fallback paths.
-- Positions here are 0-based rows and 0-based *byte* columns unless a name says otherwise.

local M = {}

local api = vim.api

M.has_011 = vim.fn.has('nvim-0.11') == 1

--- Byte length of the UTF-8 sequence starting with byte value `b`.
local function seq_len(b)
  if b < 0x80 then
    return 1
  elseif b >= 0xF0 then
    return 4
  elseif b >= 0xE0 then
    return 3
  elseif b >= 0xC0 then
    return 2
  end
  return 1 -- stray continuation byte: count it on its own
end

--- Code units of `encoding` taken by the UTF-8 sequence of byte length `n`.
local function units(n, encoding)
  if encoding == 'utf-8' then
    return n
  elseif encoding == 'utf-32' then
    return 1
  end
  return n == 4 and 2 or 1 -- utf-16
end

--- Walks `line` a character at a time while `go(byte_index, units)` holds (1-based byte index
--- of the next character, `encoding` code units before it); returns the bytes and units passed.
local function walk(line, encoding, go)
  local i, n = 1, 0
  while i <= #line and go(i, n) do
    local len = seq_len(line:byte(i))
    n = n + units(len, encoding)
    i = i + len
  end
  return i - 1, n
end

--- Converts a byte column of `line` to an LSP character offset in `encoding`.
---@param line string
---@param col integer 0-based byte column
---@param encoding string 'utf-8'|'utf-16'|'utf-32'
---@return integer
function M.byte_to_lsp(line, col, encoding)
  if encoding == 'utf-8' then
    return math.min(col, #line)
  end
  local _, n = walk(line, encoding, function(i)
    return i <= col
  end)
  return n
end

--- Converts an LSP character offset in `encoding` to a byte column of `line`.
--- Offsets past the end of the line clamp to the end; an offset in the middle of a
--- character rounds up to the end of that character.
---@param line string
---@param character integer
---@param encoding string
---@return integer 0-based byte column
function M.lsp_to_byte(line, character, encoding)
  if encoding == 'utf-8' then
    return math.min(character, #line)
  end
  local bytes = walk(line, encoding, function(_, n)
    return n < character
  end)
  return math.min(bytes, #line)
end

---@param bufnr integer
---@param row integer 0-based
---@return string
function M.get_line(bufnr, row)
  return api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ''
end

--- Text of an inline completion item (string or snippet StringValue).
--- Snippet placeholders are reduced to their default text.
---@param insert_text string|{kind: string, value: string}
---@return string
function M.item_text(insert_text)
  if type(insert_text) == 'string' then
    return insert_text
  end
  if type(insert_text) ~= 'table' or type(insert_text.value) ~= 'string' then
    return ''
  end
  local ok, grammar = pcall(require, 'vim.lsp._snippet_grammar')
  if ok then
    local parsed_ok, parsed = pcall(grammar.parse, insert_text.value)
    if parsed_ok then
      return tostring(parsed)
    end
  end
  local s = insert_text.value
  s = s:gsub('%${%d+:([^}]*)}', '%1'):gsub('%${%d+}', ''):gsub('%$%d+', '')
  return (s:gsub('\\([$}\\])', '%1'))
end

--- The part of `rest` that a partial accept takes.
---@param rest string text of the suggestion from the cursor on
---@param kind 'all'|'line'|'word'
---@return string
function M.cut(rest, kind)
  if kind == 'line' then
    -- The rest of the current line; when the suggestion continues on the next line,
    -- that whole next line (with its newline before it).
    return rest:match('^\r?\n?[^\r\n]*') or rest
  elseif kind == 'word' then
    return rest:match('^%s*[%w_\128-\255]+')
      or rest:match('^%s*[^%w_%s\128-\255]+')
      or rest:match('^%s+')
      or rest
  end
  return rest
end

--- Applies (part of) a suggestion to the buffer and moves the cursor after it.
---
--- `range` is the byte range the full suggestion replaces (nil: insert at the cursor).
---@param bufnr integer
---@param text string full suggestion text, relative to the range start
---@param range? {[1]: integer, [2]: integer, [3]: integer, [4]: integer} srow, scol, erow, ecol
---@param kind 'all'|'line'|'word'
---@return {full: boolean, rest: string, tail_left: integer}? result `rest` is what remains
---  of the suggestion after the inserted part; `tail_left` is the number of bytes after the new
---  cursor that the remaining suggestion still replaces.
function M.apply(bufnr, text, range, kind)
  if bufnr == 0 then
    bufnr = api.nvim_get_current_buf()
  end
  local winid = vim.fn.bufwinid(bufnr)
  if winid == -1 then
    return nil
  end
  local cursor = api.nvim_win_get_cursor(winid)
  local crow, ccol = cursor[1] - 1, cursor[2]
  local srow, scol, erow, ecol
  if range then
    srow, scol, erow, ecol = range[1], range[2], range[3], range[4]
  else
    srow, scol, erow, ecol = crow, ccol, crow, ccol
  end

  -- Text between the range start and the cursor that the user already typed.
  local rest, pstart_row, pstart_col = text, srow, scol
  if srow == crow and scol <= ccol then
    local typed = M.get_line(bufnr, crow):sub(scol + 1, ccol)
    if text:sub(1, #typed) == typed then
      rest = text:sub(#typed + 1)
      pstart_row, pstart_col = crow, ccol
    end
  end

  local part = M.cut(rest, kind)
  local full = #part >= #rest
  local pend_row, pend_col
  local tail_left = 0
  if full then
    part = rest
    pend_row, pend_col = erow, ecol
    if pend_row < crow or (pend_row == crow and pend_col < ccol) then
      pend_row, pend_col = crow, ccol
    end
  else
    pend_row, pend_col = crow, ccol
    local first_line = rest:match('^[^\n]*')
    if erow == crow and ecol > ccol then
      if part:find('\n', 1, true) or #part >= #first_line then
        -- The inserted part covers the whole first line, which replaces the range tail.
        pend_col = ecol
      else
        tail_left = ecol - ccol
      end
    end
  end
  if pstart_row > pend_row or (pstart_row == pend_row and pstart_col > pend_col) then
    pstart_row, pstart_col = pend_row, pend_col
  end

  local lines = vim.split(part, '\n', { plain = true })
  api.nvim_buf_set_text(bufnr, pstart_row, pstart_col, pend_row, pend_col, lines)
  local new_row = pstart_row + #lines - 1
  local new_col = (#lines == 1 and pstart_col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(winid, { new_row + 1, new_col })
  return { full = full, rest = rest:sub(#part + 1), tail_left = tail_left }
end

--- client:request() on 0.11+, client.request() on 0.10.
function M.request(client, method, params, handler, bufnr)
  if M.has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

function M.cancel_request(client, id)
  if M.has_011 then
    return client:cancel_request(id)
  end
  return client.cancel_request(id)
end

function M.request_sync(client, method, params, timeout_ms, bufnr)
  if M.has_011 then
    return client:request_sync(method, params, timeout_ms, bufnr)
  end
  return client.request_sync(method, params, timeout_ms, bufnr)
end

function M.is_stopped(client)
  if M.has_011 then
    return client:is_stopped()
  end
  return client.is_stopped()
end

--- Runs an item's command after an accept (workspace/executeCommand).
function M.exec_cmd(client, command, bufnr)
  if not client or type(command) ~= 'table' or not command.command then
    return
  end
  if client.exec_cmd then
    client:exec_cmd(command, { bufnr = bufnr })
    return
  end
  M.request(client, 'workspace/executeCommand', {
    command = command.command,
    arguments = command.arguments,
  }, function() end, bufnr)
end

return M
