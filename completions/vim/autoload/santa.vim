" santa.vim: fill-in-the-middle suggestions from `santa` for Vim 9 and Neovim.
"
" A request sends the buffer split at the cursor to a running `santa serve` (POST /infill, via
" curl) or, when no server answers, to `santa infill --json` with a marker that is not in the
" buffer. Both run as background jobs, so typing never waits; a reply for a buffer that changed
" meanwhile is dropped. The suggestion shows as virtual text until accepted or dismissed.
" Options (g: or b:): santa_command, santa_model, santa_args, santa_server, santa_api_key (else
" $SANTA_API_KEY), santa_timeout (seconds for a server reply, default 10; 0: none),
" santa_max_tokens, santa_mode, santa_curl. See README.md ("Shell, REPL and editors").

let s:seq = 0
let s:req = {}        " the request in flight
let s:shown = {}      " the suggestion on screen: {buf, lnum, col, text}
let s:server_down_until = 0
let s:last_error = ''
let s:ns = has('nvim') ? nvim_create_namespace('santa') : 0

function! s:opt(name, default) abort
  return get(b:, 'santa_' . a:name, get(g:, 'santa_' . a:name, a:default))
endfunction

" -- text around the cursor -------------------------------------------------------------------

" Prefix and suffix of the buffer split at line lnum, byte column col (1-based).
function! santa#split(lnum, col) abort
  let lines = getline(1, '$')
  let line = lines[a:lnum - 1]
  let head = a:lnum > 1 ? lines[: a:lnum - 2] : []
  let prefix = join(head + [strpart(line, 0, a:col - 1)], "\n")
  let suffix = join([strpart(line, a:col - 1)] + lines[a:lnum :], "\n")
  if &eol || &fixeol  " the file on disk ends with a newline: so does the suffix the model sees
    let suffix .= "\n"
  endif
  return [prefix, suffix]
endfunction

" A cursor marker that does not occur in the text (so it can never split the wrong place).
function! s:marker(text) abort
  let n = 0
  while 1
    let marker = printf('<santa-cursor-%d-%d-%d>', getpid(), s:seq, n)
    if stridx(a:text, marker) < 0
      return marker
    endif
    let n += 1
  endwhile
endfunction

function! santa#cli_command(marker, path) abort
  let cmd = [s:opt('command', 'santa'), 'infill', '--json', '--marker', a:marker]
  if !empty(a:path)
    let cmd += ['--path', a:path]
  endif
  if !empty(s:opt('model', ''))
    let cmd += ['--model', s:opt('model', '')]
  endif
  if s:opt('max_tokens', 0) > 0
    let cmd += ['--max-tokens', string(s:opt('max_tokens', 0))]
  endif
  if !empty(s:opt('mode', ''))
    let cmd += ['--mode', s:opt('mode', '')]
  endif
  return cmd + s:opt('args', [])
endfunction

" -- jobs (Vim and Neovim) ----------------------------------------------------------------------

" A command that cannot start fails like any other: Done runs later, once the caller has kept
" the handle (for a server request, Done starts the CLI, whose handle must not be overwritten).
function! s:later(Done, program) abort
  call timer_start(0, {-> a:Done(127, '', 'cannot run ' . a:program)})
endfunction

" Run cmd with input on stdin; call Done(status, stdout, stderr) when it has exited and its
" output is read (or, when it cannot start, soon with status 127). Returns a handle for s:stop().
function! s:job(cmd, input, Done) abort
  let ctx = {'out': [], 'err': [], 'status': -1, 'closed': 0, 'Done': a:Done}
  if has('nvim')
    " Neovim calls these with self = the options dict, so ctx is that dict
    function! ctx.on_stdout(id, data, event) dict
      call add(self.out, join(a:data, "\n"))
    endfunction
    function! ctx.on_stderr(id, data, event) dict
      call add(self.err, join(a:data, "\n"))
    endfunction
    function! ctx.on_exit(id, status, event) dict
      call self.Done(a:status, join(self.out, ''), join(self.err, ''))
    endfunction
    let ctx.stdout_buffered = v:true
    let ctx.stderr_buffered = v:true
    try
      let id = jobstart(a:cmd, ctx)
    catch
      let id = -1
    endtry
    if id <= 0
      call s:later(a:Done, a:cmd[0])
      return 0
    endif
    call chansend(id, a:input)
    call chanclose(id, 'stdin')
    return id
  endif
  " Vim: exit_cb can come before the last output, so finish when both have happened
  function! ctx.finish() dict
    if self.closed && self.status >= 0
      call self.Done(self.status, join(self.out, ''), join(self.err, ''))
    endif
  endfunction
  function! ctx.on_out(ch, msg) dict
    call add(self.out, a:msg)
  endfunction
  function! ctx.on_err(ch, msg) dict
    call add(self.err, a:msg)
  endfunction
  function! ctx.on_close(ch) dict
    let self.closed = 1
    call self.finish()
  endfunction
  function! ctx.on_exit(job, status) dict
    let self.status = a:status
    call self.finish()
  endfunction
  let job = job_start(a:cmd, {'in_io': 'pipe', 'out_mode': 'raw', 'err_mode': 'raw',
        \ 'out_cb': ctx.on_out, 'err_cb': ctx.on_err, 'close_cb': ctx.on_close, 'exit_cb': ctx.on_exit})
  if job_status(job) ==# 'fail'
    call s:later(a:Done, a:cmd[0])
    return 0
  endif
  call ch_sendraw(job, a:input)
  call ch_close_in(job)
  return job
endfunction

function! s:stop(job) abort
  try
    if has('nvim')
      call jobstop(a:job)
    else
      call job_stop(a:job)
    endif
  catch
  endtry
endfunction

" -- requests ----------------------------------------------------------------------------------

" Ask for a suggestion at the cursor (insert mode: before the cursor; normal mode: before the
" character under it).
function! santa#complete() abort
  call santa#dismiss()
  call s:cancel()
  let [prefix, suffix] = santa#split(line('.'), col('.'))
  let s:seq += 1
  let s:req = {'id': s:seq, 'buf': bufnr(''), 'tick': b:changedtick, 'lnum': line('.'), 'col': col('.'),
        \ 'prefix': prefix, 'suffix': suffix, 'path': expand('%:t'), 'job': 0}
  let server = s:opt('server', 'http://127.0.0.1:8080')
  if !empty(server) && localtime() >= s:server_down_until
    call s:via_server(s:req, server)
  else
    call s:via_cli(s:req)
  endif
endfunction

" The key for a server started with --api-key: g:/b:santa_api_key, else $SANTA_API_KEY.
function! s:api_key() abort
  let key = s:opt('api_key', '')
  return trim(empty(key) ? $SANTA_API_KEY : key)
endfunction

" A file holding the Authorization header, for curl's `-H @FILE`. The key never goes on curl's
" command line: any user on the machine can read that (ps, /proc/PID/cmdline). stdin is taken by
" the JSON body, and a curl config on stdin (`-K -`) cannot carry the body as well (curl caps a
" config line at 100 KB, less than a source file can be). So the header goes into a file only we
" can read: mode 0600, in Vim's private temporary directory (itself 0700, removed when Vim exits),
" deleted as soon as curl exits. Returns '' when it cannot be written.
function! s:header_file(key) abort
  let file = tempname()
  try
    call writefile([], file)
    call setfperm(file, 'rw-------')  " before the key goes in
    call writefile(['Authorization: Bearer ' . a:key], file)
  catch
    call delete(file)
    return ''
  endtry
  return file
endfunction

" g:santa_timeout as curl's --max-time wants it ('10', '2.5'); '' for no limit.
function! s:timeout() abort
  let t = s:opt('timeout', 10)
  let t = type(t) == v:t_string ? str2float(t) : t
  return t > 0 ? substitute(string(t), '\.0$', '', '') : ''
endfunction

function! s:via_server(req, server) abort
  let body = {'prefix': a:req.prefix, 'suffix': a:req.suffix, 'path': a:req.path}
  if s:opt('max_tokens', 0) > 0
    let body.max_tokens = s:opt('max_tokens', 0)
  endif
  if !empty(s:opt('mode', ''))
    let body.mode = s:opt('mode', '')
  endif
  " No --fail: an HTTP error has a body worth showing. The last line of the output is the HTTP
  " status and whether a connection was made at all (0: no server there, try the CLI).
  let cmd = [s:opt('curl', 'curl'), '-sS', '--connect-timeout', '1', '-w', "\n%{http_code} %{num_connects}",
        \ '-H', 'Content-Type: application/json', '--data-binary', '@-']
  if !empty(s:timeout())  " a stalled server must not keep a request running forever
    let cmd += ['--max-time', s:timeout()]
  endif
  let key = s:api_key()
  let keyfile = ''
  if !empty(key)
    let keyfile = s:header_file(key)
    if empty(keyfile)
      let s:last_error = 'santa: cannot write a temporary file for the API key'
      let s:req = {}
      echohl ErrorMsg | echomsg s:last_error | echohl None
      return
    endif
    let cmd += ['-H', '@' . keyfile]
  endif
  let cmd += [substitute(a:server, '/$', '', '') . '/infill']
  let a:req.via = 'server'
  let a:req.job = s:job(cmd, json_encode(body), function('s:on_server', [a:req, keyfile]))
endfunction

function! s:on_server(req, keyfile, status, out, err) abort
  if !empty(a:keyfile)
    call delete(a:keyfile)
  endif
  if a:req isnot s:req
    return
  endif
  let m = matchlist(a:out, '\v^(\_.*)\n(\d{3}) (\d+)\s*$')
  if a:status != 0 && (empty(m) || m[3] ==# '0')
    " no server: use the CLI and don't try the server again for a while
    let s:server_down_until = localtime() + 30
    call s:via_cli(a:req)
    return
  endif
  if a:status == 0 && !empty(m) && m[2] ==# '200'
    call s:on_reply(a:req, m[1])
    return
  endif
  " The server is there but failed us: an error status (busy, bad request, wrong key), no reply
  " in time, a dropped connection. Say so; it is not down, and the CLI would load a second model.
  if a:status == 28
    let msg = 'no reply within ' . s:timeout() . ' s (g:santa_timeout)'
  elseif a:status != 0
    let msg = substitute(trim(get(split(a:err, "\n"), 0, '')), '^curl: (\d\+) ', '', '')
    let msg = empty(msg) ? 'curl exit status ' . a:status : msg
  else
    let msg = s:server_error(empty(m) ? a:out : m[1], empty(m) ? '?' : m[2])
    if !empty(m) && m[2] ==# '401'
      let msg .= ' (set g:santa_api_key or $SANTA_API_KEY)'
    endif
  endif
  let s:last_error = 'santa: server: ' . msg
  let s:req = {}
  echohl ErrorMsg | echomsg s:last_error | echohl None
endfunction

" The message of a server's JSON error body (santa's, OpenAI's or TGI's shape).
function! s:server_error(body, status) abort
  try
    let reply = json_decode(a:body)
  catch
    return 'HTTP ' . a:status
  endtry
  let e = type(reply) == v:t_dict ? get(reply, 'error', '') : ''
  if type(e) == v:t_dict && type(get(e, 'message', 0)) == v:t_string
    return e.message
  endif
  return type(e) == v:t_string && !empty(e) ? e : 'HTTP ' . a:status
endfunction

function! s:via_cli(req) abort
  let text = a:req.prefix . a:req.suffix
  let marker = s:marker(text)
  let a:req.via = 'cli'
  let a:req.job = s:job(santa#cli_command(marker, a:req.path), a:req.prefix . marker . a:req.suffix,
        \ function('s:on_cli', [a:req]))
endfunction

function! s:on_cli(req, status, out, err) abort
  if a:req isnot s:req
    return
  endif
  if a:status != 0
    let msg = trim(get(split(a:err, "\n"), 0, 'exit status ' . a:status))
    let s:last_error = msg =~# '^santa:' ? msg : 'santa: ' . msg
    let s:req = {}
    echohl ErrorMsg | echomsg s:last_error | echohl None
    return
  endif
  call s:on_reply(a:req, a:out)
endfunction

function! s:on_reply(req, out) abort
  let s:req = {}
  try
    let reply = json_decode(a:out)
    let text = reply.completion
  catch
    let s:last_error = 'santa: unexpected reply: ' . strpart(a:out, 0, 200)
    echohl ErrorMsg | echomsg s:last_error | echohl None
    return
  endtry
  " the user moved on: this suggestion is for text that is no longer there
  if bufnr('') != a:req.buf || b:changedtick != a:req.tick || line('.') != a:req.lnum || col('.') != a:req.col
    return
  endif
  let s:last_error = ''
  let s:shown = {'buf': a:req.buf, 'lnum': a:req.lnum, 'col': a:req.col, 'text': text, 'via': a:req.via}
  if !empty(text)
    call s:show()
  endif
endfunction

function! s:cancel() abort
  if !empty(s:req) && !empty(s:req.job)
    call s:stop(s:req.job)
  endif
  let s:req = {}
endfunction

" -- showing, accepting, dismissing --------------------------------------------------------

function! s:show() abort
  if !hlexists('SantaSuggestion')
    highlight default link SantaSuggestion Comment
  endif
  let lines = split(s:shown.text, "\n", 1)
  if has('nvim')
    let opts = {'virt_text': [[lines[0], 'SantaSuggestion']], 'virt_text_pos': has('nvim-0.10') ? 'inline' : 'eol'}
    if len(lines) > 1
      let opts.virt_lines = map(lines[1:], {_, l -> [[l, 'SantaSuggestion']]})
    endif
    call nvim_buf_set_extmark(0, s:ns, s:shown.lnum - 1, s:shown.col - 1, opts)
  elseif has('textprop') && has('patch-9.0.0067')
    if empty(prop_type_get('SantaSuggestion'))
      call prop_type_add('SantaSuggestion', {'highlight': 'SantaSuggestion'})
    endif
    if !empty(lines[0])
      call prop_add(s:shown.lnum, s:shown.col, {'type': 'SantaSuggestion', 'text': lines[0]})
    endif
    for l in lines[1:]
      call prop_add(s:shown.lnum, 0, {'type': 'SantaSuggestion', 'text': empty(l) ? ' ' : l, 'text_align': 'below'})
    endfor
  elseif exists('*popup_create')
    let s:shown.popup = popup_create(lines, {'line': 'cursor+1', 'col': 'cursor', 'highlight': 'SantaSuggestion'})
  endif
endfunction

function! s:hide() abort
  if has('nvim')
    call nvim_buf_clear_namespace(get(s:shown, 'buf', 0), s:ns, 0, -1)
  elseif has('textprop') && !empty(prop_type_get('SantaSuggestion'))
    call prop_remove({'type': 'SantaSuggestion', 'bufnr': get(s:shown, 'buf', bufnr('')), 'all': 1})
  endif
  if has_key(s:shown, 'popup')
    call popup_close(s:shown.popup)
  endif
endfunction

function! santa#visible() abort
  return !empty(s:shown) && !empty(s:shown.text)
endfunction

" 'running', 'shown' (a suggestion is on screen), 'empty' (the model had nothing) or 'idle'
function! santa#state() abort
  return !empty(s:req) ? 'running' : santa#visible() ? 'shown' : !empty(s:shown) ? 'empty' : 'idle'
endfunction

function! santa#last_error() abort
  return s:last_error
endfunction

function! santa#suggestion() abort
  return get(s:shown, 'text', '')
endfunction

" Insert the suggestion where it was requested and put the cursor after it.
function! santa#accept() abort
  if !santa#visible() || bufnr('') != s:shown.buf
    return
  endif
  let shown = s:shown
  call santa#dismiss()
  let line = getline(shown.lnum)
  let parts = split(shown.text, "\n", 1)
  let parts[0] = strpart(line, 0, shown.col - 1) . parts[0]
  let endcol = len(parts[-1]) + 1
  let parts[-1] .= strpart(line, shown.col - 1)
  call setline(shown.lnum, parts[0])
  call append(shown.lnum, parts[1:])
  call cursor(shown.lnum + len(parts) - 1, endcol)
endfunction

function! santa#dismiss() abort
  if !empty(s:shown)
    call s:hide()
  endif
  let s:shown = {}
endfunction

" CursorMovedI: typing or moving away makes the suggestion stale.
function! santa#on_move() abort
  if !empty(s:shown) && (line('.') != s:shown.lnum || col('.') != s:shown.col || bufnr('') != s:shown.buf)
    call santa#dismiss()
  endif
endfunction

" Automatic suggestions after a pause in typing (g:santa_auto_trigger).
let s:timer = -1
function! santa#on_change() abort
  if !s:opt('auto_trigger', 0)
    return
  endif
  call timer_stop(s:timer)
  let s:timer = timer_start(s:opt('delay_ms', 300), {-> mode() ==# 'i' ? santa#complete() : 0})
endfunction
