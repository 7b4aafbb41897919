-- santa: fill-in-the-middle ghost text for Neovim (0.7+), from `santa serve` or `santa infill`.
--
--   require("santa").setup({ model = "bigcode/tiny_starcoder_py" })
--
-- A request sends the buffer split at the cursor to a running server (POST /infill through
-- curl) or, when none answers, to `santa infill --json` with a marker that is not in the
-- buffer. Both are background jobs, so typing never waits; a reply for a buffer or cursor that
-- changed meanwhile is dropped. The suggestion is shown with extmarks (first line as virtual
-- text at the cursor, the rest as virtual lines) until accepted or dismissed.
--
-- A server started with --api-key gets `api_key` (else $SANTA_API_KEY) as a Bearer token; a
-- server that does not reply within `timeout` seconds (10) is reported, like any other server
-- error. Only when no server is listening at all does the CLI run instead.

local M = {}

M.config = {
  command = "santa", -- the santa executable
  model = nil, -- --model for the CLI (nil: SANTA_MODEL or santa's default)
  args = {}, -- extra CLI arguments, e.g. { "--device", "cpu" }
  server = "http://127.0.0.1:8080", -- santa serve URL; "" or false: CLI only
  api_key = nil, -- for a server started with --api-key (nil: $SANTA_API_KEY)
  timeout = 10, -- seconds to wait for the server's reply (curl --max-time); 0: no limit
  curl = "curl",
  max_tokens = nil,
  mode = nil, -- auto | line | block | full
  auto_trigger = false, -- ask after a pause in typing
  delay_ms = 300,
  keys = { complete = "<M-\\>", accept = "<Tab>", dismiss = "<C-]>" }, -- false to skip one
  hl_group = "SantaSuggestion",
}

local ns = vim.api.nvim_create_namespace("santa_ghost")
local seq = 0
local request = nil -- the request in flight
local shown = nil -- { buf, row, col, text } (row/col 0-based, col in bytes)
local server_down_until = 0
M.last_error = nil

-- Prefix and suffix of buffer `buf` split at 0-based row, byte col.
function M.split(buf, row, col)
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  local line = lines[row + 1] or ""
  local head = { unpack(lines, 1, row) }
  table.insert(head, line:sub(1, col))
  local tail = { line:sub(col + 1), unpack(lines, row + 2) }
  local suffix = table.concat(tail, "\n")
  if vim.bo[buf].eol or vim.bo[buf].fixeol then -- the file on disk ends with a newline
    suffix = suffix .. "\n"
  end
  return table.concat(head, "\n"), suffix
end

local function marker_for(text)
  local n = 0
  while true do
    local marker = string.format("<santa-cursor-%d-%d-%d>", vim.fn.getpid(), seq, n)
    if not text:find(marker, 1, true) then
      return marker
    end
    n = n + 1
  end
end

function M.cli_command(marker, path)
  local c = M.config
  local cmd = { c.command, "infill", "--json", "--marker", marker }
  if path and path ~= "" then vim.list_extend(cmd, { "--path", path }) end
  if c.model then vim.list_extend(cmd, { "--model", c.model }) end
  if c.max_tokens then vim.list_extend(cmd, { "--max-tokens", tostring(c.max_tokens) }) end
  if c.mode then vim.list_extend(cmd, { "--mode", c.mode }) end
  return vim.list_extend(cmd, c.args or {})
end

-- Run cmd with `input` on stdin; done(code, stdout, stderr) on the main loop when it exits
-- (or soon with 127 when it cannot start).
local function run(cmd, input, done)
  local out, err = {}, {}
  local ok, job = pcall(vim.fn.jobstart, cmd, {
    stdout_buffered = true,
    stderr_buffered = true,
    on_stdout = function(_, data) out = data end,
    on_stderr = function(_, data) err = data end,
    on_exit = function(_, code) done(code, table.concat(out, "\n"), table.concat(err, "\n")) end,
  })
  if not ok or job <= 0 then
    -- later, like any other failure: the caller keeps the handle first (for a server request,
    -- done starts the CLI, whose handle must not be overwritten)
    vim.schedule(function() done(127, "", "cannot run " .. cmd[1]) end)
    return nil
  end
  vim.fn.chansend(job, input)
  vim.fn.chanclose(job, "stdin")
  return job
end

local function report(msg)
  M.last_error = msg
  vim.notify(msg, vim.log.levels.ERROR)
end

local function hide()
  if shown and vim.api.nvim_buf_is_valid(shown.buf) then
    vim.api.nvim_buf_clear_namespace(shown.buf, ns, 0, -1)
  end
end

local function show()
  local lines = vim.split(shown.text, "\n", { plain = true })
  local opts = {
    virt_text = { { lines[1], M.config.hl_group } },
    virt_text_pos = vim.fn.has("nvim-0.10") == 1 and "inline" or "eol",
  }
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      table.insert(opts.virt_lines, { { lines[i], M.config.hl_group } })
    end
  end
  vim.api.nvim_buf_set_extmark(shown.buf, ns, shown.row, shown.col, opts)
end

local function on_reply(req, body)
  request = nil
  local ok, reply = pcall(vim.fn.json_decode, body)
  if not ok or type(reply) ~= "table" or type(reply.completion) ~= "string" then
    report("santa: unexpected reply: " .. body:sub(1, 200))
    return
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  if vim.api.nvim_get_current_buf() ~= req.buf or vim.b[req.buf].changedtick ~= req.tick
      or cursor[1] - 1 ~= req.row or cursor[2] ~= req.col then
    return -- the user moved on; this suggestion no longer fits
  end
  M.last_error = nil
  shown = { buf = req.buf, row = req.row, col = req.col, text = reply.completion, via = req.via }
  if reply.completion ~= "" then
    show()
  end
end

local function via_cli(req)
  local marker = marker_for(req.prefix .. req.suffix)
  req.via = "cli"
  req.job = run(M.cli_command(marker, req.path), req.prefix .. marker .. req.suffix, function(code, out, err)
    if req ~= request then return end
    if code ~= 0 then
      request = nil
      local msg = vim.trim(vim.split(err, "\n", { plain = true })[1] or "")
      if msg == "" then msg = "exit status " .. code end
      report(msg:match("^santa:") and msg or "santa: " .. msg)
      return
    end
    on_reply(req, out)
  end)
end

-- The error message of a server's JSON error body (santa's, OpenAI's or TGI's shape).
local function server_error(body, status)
  local ok, reply = pcall(vim.fn.json_decode, body)
  if ok and type(reply) == "table" then
    local e = reply.error
    if type(e) == "table" and type(e.message) == "string" then return e.message end
    if type(e) == "string" then return e end
  end
  return "HTTP " .. status
end

local function api_key()
  local key = M.config.api_key
  if key == nil or key == "" then key = vim.env.SANTA_API_KEY end
  return key and vim.trim(tostring(key)) or ""
end

-- A file holding the Authorization header, for curl's `-H @FILE`. The key never goes on curl's
-- command line: any user on the machine can read that (ps, /proc/PID/cmdline). stdin is taken by
-- the JSON body, and a curl config on stdin (`-K -`) cannot carry the body as well (curl caps a
-- config line at 100 KB, less than a source file can be). So the header goes into a file created
-- with mode 0600 in Neovim's private temporary directory (0700, removed when Neovim exits), and
-- deleted as soon as curl exits. Returns nil and the reason when it cannot be written.
local function header_file(key)
  local path = vim.fn.tempname()
  local fd, err = vim.loop.fs_open(path, "w", 384) -- 384 = 0600
  if not fd then return nil, err end
  local ok, werr = vim.loop.fs_write(fd, "Authorization: Bearer " .. key .. "\n", -1)
  vim.loop.fs_close(fd)
  if not ok then
    os.remove(path)
    return nil, werr
  end
  return path
end

-- config.timeout as curl's --max-time wants it ("10", "2.5"); nil for no limit
local function timeout()
  local t = tonumber(M.config.timeout)
  if not t or t <= 0 then return nil end
  return (tostring(t):gsub("%.0$", ""))
end

local function via_server(req, url)
  local body = { prefix = req.prefix, suffix = req.suffix, path = req.path,
                 max_tokens = M.config.max_tokens, mode = M.config.mode }
  -- No --fail: an HTTP error has a body worth showing. The last line of the output is the HTTP
  -- status and whether a connection was made at all (0: no server there, try the CLI).
  local cmd = { M.config.curl, "-sS", "--connect-timeout", "1", "-w", "\n%{http_code} %{num_connects}",
                "-H", "Content-Type: application/json", "--data-binary", "@-" }
  local seconds = timeout()
  if seconds then -- a stalled server must not keep a request running forever
    vim.list_extend(cmd, { "--max-time", seconds })
  end
  local key, keyfile = api_key(), nil
  if key ~= "" then
    local err
    keyfile, err = header_file(key)
    if not keyfile then
      request = nil
      report("santa: cannot write a temporary file for the API key: " .. tostring(err))
      return
    end
    vim.list_extend(cmd, { "-H", "@" .. keyfile })
  end
  table.insert(cmd, (url:gsub("/$", "")) .. "/infill")
  req.via = "server"
  req.job = run(cmd, vim.fn.json_encode(body), function(code, out, err)
    if keyfile then os.remove(keyfile) end
    if req ~= request then return end
    local reply, status, connects = out:match("^(.*)\n(%d%d%d) (%d+)%s*$")
    if code ~= 0 and (not connects or connects == "0") then
      -- no server: use the CLI, and don't try the server again for a while
      server_down_until = os.time() + 30
      via_cli(req)
      return
    end
    if code == 0 and status == "200" then
      on_reply(req, reply)
      return
    end
    -- The server is there but failed us: an error status (busy, bad request, wrong key), no reply
    -- in time, a dropped connection. Say so; it is not down, and the CLI would load a second model.
    local msg
    if code == 28 then
      msg = "no reply within " .. (seconds or "?") .. " s (timeout)"
    elseif code ~= 0 then
      msg = vim.trim(vim.split(err, "\n", { plain = true })[1] or ""):gsub("^curl: %(%d+%) ", "")
      if msg == "" then msg = "curl exit status " .. code end
    else
      msg = server_error(reply or out, status or "?")
      if status == "401" then msg = msg .. " (set api_key in setup() or $SANTA_API_KEY)" end
    end
    request = nil
    report("santa: server: " .. msg)
  end)
end

-- Ask for a suggestion at the cursor (before the character under it in normal mode).
function M.complete()
  M.dismiss()
  if request and request.job then pcall(vim.fn.jobstop, request.job) end
  local buf = vim.api.nvim_get_current_buf()
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local prefix, suffix = M.split(buf, row, col)
  seq = seq + 1
  request = { id = seq, buf = buf, tick = vim.b[buf].changedtick, row = row, col = col,
              prefix = prefix, suffix = suffix, path = vim.fn.expand("%:t") }
  local url = M.config.server
  if url and url ~= "" and os.time() >= server_down_until then
    via_server(request, url)
  else
    via_cli(request)
  end
end

function M.visible()
  return shown ~= nil and shown.text ~= ""
end

-- "running", "shown", "empty" (the model had nothing) or "idle"
function M.state()
  if request then return "running" end
  if M.visible() then return "shown" end
  return shown and "empty" or "idle"
end

function M.suggestion()
  return shown and shown.text or ""
end

-- Insert the suggestion where it was requested; the cursor ends after it.
function M.accept()
  if not M.visible() or vim.api.nvim_get_current_buf() ~= shown.buf then return end
  local s = shown
  M.dismiss()
  local lines = vim.split(s.text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(s.buf, s.row, s.col, s.row, s.col, lines)
  local last_row = s.row + #lines - 1
  local last_col = (#lines == 1 and s.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { last_row + 1, last_col })
end

function M.dismiss()
  hide()
  shown = nil
end

local timer = nil
local function schedule_auto()
  if not M.config.auto_trigger then return end
  if timer then timer:stop() end
  timer = vim.defer_fn(function()
    if vim.api.nvim_get_mode().mode == "i" then M.complete() end
  end, M.config.delay_ms)
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", M.config, opts or {})
  vim.cmd("highlight default link SantaSuggestion Comment")
  vim.api.nvim_create_user_command("SantaComplete", M.complete, { force = true })
  vim.api.nvim_create_user_command("SantaAccept", M.accept, { force = true })
  vim.api.nvim_create_user_command("SantaDismiss", M.dismiss, { force = true })
  local keys = M.config.keys or {}
  if keys.complete then
    vim.keymap.set("i", keys.complete, M.complete, { desc = "santa: suggest" })
  end
  if keys.accept then
    vim.keymap.set("i", keys.accept, function()
      if M.visible() then
        vim.schedule(M.accept) -- text can't change inside an <expr> mapping
        return ""
      end
      return vim.api.nvim_replace_termcodes(keys.accept, true, false, true)
    end, { expr = true, desc = "santa: accept" })
  end
  if keys.dismiss then
    vim.keymap.set("i", keys.dismiss, function()
      if M.visible() then
        M.dismiss()
        return ""
      end
      return vim.api.nvim_replace_termcodes(keys.dismiss, true, false, true)
    end, { expr = true, desc = "santa: dismiss" })
  end
  local group = vim.api.nvim_create_augroup("santa_ghost", { clear = true })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, { group = group, callback = M.dismiss })
  vim.api.nvim_create_autocmd("CursorMovedI", {
    group = group,
    callback = function()
      if shown then
        local c = vim.api.nvim_win_get_cursor(0)
        if c[1] - 1 ~= shown.row or c[2] ~= shown.col then M.dismiss() end
      end
    end,
  })
  vim.api.nvim_create_autocmd("TextChangedI", { group = group, callback = schedule_auto })
end

return M
