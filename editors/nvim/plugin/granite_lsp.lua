-- granite_lsp user commands. Nothing starts until require("granite_lsp").setup() is called.
if vim.g.loaded_granite_lsp then
  return
end
vim.g.loaded_granite_lsp = true

local function gl()
  return require('granite_lsp')
end

vim.api.nvim_create_user_command('GraniteLspToggle', function(args)
  local on
  if args.args == 'on' then
    on = gl().enable(true)
  elseif args.args == 'off' then
    on = gl().enable(false)
  else
    on = gl().toggle()
  end
  vim.notify('granite-lsp suggestions ' .. (on and 'on' or 'off') .. ' in this buffer')
end, {
  nargs = '?',
  complete = function()
    return { 'on', 'off' }
  end,
  desc = 'Turn granite-lsp suggestions on/off in the current buffer',
})

vim.api.nvim_create_user_command('GraniteLspStatus', function()
  vim.notify(table.concat(gl().status_lines(0), '\n'))
end, { desc = 'Show the granite-lsp server and model state' })

vim.api.nvim_create_user_command('GraniteLspStats', function()
  local stats, err = gl().stats(0)
  if not stats then
    vim.notify('granite-lsp: ' .. tostring(err), vim.log.levels.WARN)
    return
  end
  vim.notify(vim.inspect(stats))
end, { desc = 'Show the granite-lsp server counters (granite/stats)' })

vim.api.nvim_create_user_command('GraniteToggle', function(args)
  local on
  if args.args == 'on' then
    on = gl().enable_all(true)
  elseif args.args == 'off' then
    on = gl().enable_all(false)
  else
    on = gl().enable_all()
  end
  vim.notify('granite-lsp suggestions ' .. (on and 'on' or 'off') .. ' everywhere')
end, {
  nargs = '?',
  complete = function()
    return { 'on', 'off' }
  end,
  desc = 'Turn granite-lsp suggestions on/off in every buffer',
})

vim.api.nvim_create_user_command('GraniteDownload', function(args)
  gl().download(args.args)
end, { nargs = '?', desc = 'Download a model (default: the configured one) with granite-lsp download' })
