" santa.vim: code suggestions from santa (fill-in-the-middle) for Vim 9 and Neovim.
" Setup and options: README.md ("Shell, REPL and editors"). The work happens in autoload/santa.vim.

if exists('g:loaded_santa') || (!has('nvim') && v:version < 900)
  finish
endif
let g:loaded_santa = 1

command! SantaComplete call santa#complete()
command! SantaAccept call santa#accept()
command! SantaDismiss call santa#dismiss()

inoremap <silent> <Plug>(santa-complete) <Cmd>call santa#complete()<CR>
inoremap <silent> <Plug>(santa-accept) <Cmd>call santa#accept()<CR>
inoremap <silent> <Plug>(santa-dismiss) <Cmd>call santa#dismiss()<CR>
nnoremap <silent> <Plug>(santa-complete) <Cmd>call santa#complete()<CR>

if !get(g:, 'santa_no_mappings', 0)
  " Ctrl-G s asks, in every Vim and Neovim (unless something else has it already). Alt-\ asks
  " too only where it is a key of its own: Neovim and the GUI. A terminal sends Alt-\ as Esc \,
  " which leaves insert mode before any mapping sees it, and in terminal Vim a <M-\> mapping
  " would instead take over typing U+00DC (the character Vim makes of Meta-\). Tab accepts, only
  " while a suggestion shows; Ctrl-] dismisses.
  if empty(maparg('<C-g>s', 'i'))
    imap <C-g>s <Plug>(santa-complete)
  endif
  if has('nvim') || has('gui_running')
    imap <M-\> <Plug>(santa-complete)
  endif
  inoremap <silent><expr> <Tab> santa#visible() ? "\<Cmd>call santa#accept()\<CR>" : "\<Tab>"
  inoremap <silent><expr> <C-]> santa#visible() ? "\<Cmd>call santa#dismiss()\<CR>" : "\<C-]>"
endif

augroup santa
  autocmd!
  autocmd InsertLeave,BufLeave * call santa#dismiss()
  autocmd CursorMovedI * call santa#on_move()
  autocmd TextChangedI * call santa#on_change()
augroup END
