"""``santa setup bash|zsh|fish|vim|neovim|emacs``: where the installed shell completion scripts
and editor plugins are, and the lines that turn them on. A pip install has no source checkout:
the scripts and plugins ship inside the package (``santacli/plugins``, links to ``completions/``
in a checkout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from santacli.errors import UsageError

TARGETS = ("bash", "zsh", "fish", "vim", "neovim", "emacs")


def plugins_dir() -> Path:
    """The installed copy of completions/ (resolved: editors get a path that stays valid)."""
    return (Path(__file__).resolve().parents[1] / "plugins").resolve()


def _snippet(target: str, root: Path) -> tuple[Path, str]:
    """(the file or folder, what to add to the shell's or editor's startup file)."""
    if target == "bash":
        path = (root / "santa.bash").resolve()
        return path, f"# in ~/.bashrc\nsource {path}"
    if target == "zsh":
        path = (root / "_santa").resolve().parent
        return path, f"# in ~/.zshrc, before compinit runs\nfpath=({path} $fpath)"
    if target == "fish":
        path = (root / "santa.fish").resolve()
        return path, f"# in ~/.config/fish/config.fish (or copy the file to ~/.config/fish/completions/)\nsource {path}"
    if target == "vim":
        path = (root / "vim").resolve()
        return path, f'" in ~/.vimrc (Vim 9, or Neovim with the Vim script plugin)\nset runtimepath+={path}'
    if target == "neovim":
        path = (root / "nvim").resolve()
        return path, (f'-- in ~/.config/nvim/init.lua\nvim.opt.runtimepath:append("{path}")\n'
                      'require("santa").setup({})')
    path = (root / "emacs").resolve()
    return path, f';; in ~/.emacs or init.el\n(add-to-list \'load-path "{path}")\n(require \'santa)\n' \
                 "(add-hook 'prog-mode-hook #'santa-mode)"


def setup(
    target: Annotated[str, typer.Argument(help="bash, zsh, fish, vim, neovim or emacs.",
                                          autocompletion=lambda incomplete: [t for t in TARGETS
                                                                             if t.startswith(incomplete)])],
    path_only: Annotated[bool, typer.Option("--path", help="Print only the path of the script or plugin.")] = False,
) -> None:
    """Print how to turn on shell completion or an editor plugin (the installed files and the lines to add)."""
    if target not in TARGETS:
        raise UsageError(f"setup target must be one of {', '.join(TARGETS)}, got {target!r}")
    path, lines = _snippet(target, plugins_dir())
    if not path.exists():
        raise UsageError(f"{path} is missing: this santa was installed without its plugins; reinstall it")
    sys.stdout.write(f"{path}\n" if path_only else f"{lines}\n")
