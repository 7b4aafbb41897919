"""santa's language server: the pygls server, its LSP handlers, and the translation of santa's
completions into LSP answers.

- ``textDocument/inlineCompletion`` (LSP 3.18, ghost text): one item per distinct candidate,
  inserted at the cursor.
- ``textDocument/completion`` for clients without it: one item per candidate whose edit
  replaces the word before the cursor with that word plus the completion; ``insertText`` is
  the same text and ``filterText`` the word. Clients filter by the text from the edit's start
  to the cursor (VS Code, Neovim) or by their own word at the cursor (eglot, Helix, Zed,
  Sublime), by prefix or fuzzily, and eglot 1.9 matches ``insertText`` against it: an item that
  starts with the word passes all of these. (An edit from the start of the line with the line
  as ``filterText`` does not: Neovim 0.7 then ignores the edit's range and inserts the line a
  second time.) The list is always incomplete, so clients ask again as the user types rather
  than filter a stale completion.

Requests run on :class:`~santacli.lsp.worker.ModelWorker`'s thread; SantaErrors become LSP
errors (InvalidParams for a request santa cannot use, RequestFailed otherwise), anything else an
InternalError from pygls; the server lives on either way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any, BinaryIO

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method
from pygls.uris import to_fs_path

from santacli import __version__
from santacli.completion import CompletionEngine, CompletionOptions
from santacli.errors import SantaError, UsageError
from santacli.lsp.config import LspConfig, section
from santacli.lsp.documents import Change, Cursor, DocumentStore
from santacli.lsp.worker import Loaded, ModelWorker, Outcome

log = logging.getLogger("santacli.lsp")

# (model, endpoint) -> a loaded engine; the CLI builds it from its flags and the user's settings.
EngineLoader = Callable[[str | None, str | None], CompletionEngine]

_PROGRESS_CREATE_TIMEOUT = 5.0  # seconds a client may take to accept a progress token


@dataclass(frozen=True)
class _BadRequest:
    """A request whose params do not fit its method: answered with InvalidParams."""

    id: int | str
    method: str
    error: str


class _Protocol(LanguageServerProtocol):
    """pygls's protocol with two changes. Documents live once, in santa's
    :class:`~santacli.lsp.documents.DocumentStore` (pygls's own copy splits lines as
    ``str.splitlines`` does, not as LSP does). A request whose params do not fit its method is
    answered with InvalidParams instead of being dropped, so the client does not wait forever."""

    def _to_user(self, method: str, params: Any) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(method)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Generator[Any, Any, None]:
        yield from self._to_user(types.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams
                                      ) -> Generator[Any, Any, None]:
        yield from self._to_user(types.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Generator[Any, Any, None]:
        yield from self._to_user(types.TEXT_DOCUMENT_DID_CLOSE, params)

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            msg_id = data.get("id")
            if "method" in data and isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool):
                cause = exc.__cause__ or exc
                return _BadRequest(msg_id, str(data["method"]), str(cause).splitlines()[0] if str(cause) else "")
            raise

    def handle_message(self, message: Any) -> None:
        if isinstance(message, _BadRequest):
            detail = f": {message.error}" if message.error else ""
            self._send_response(message.id, error=types.ResponseError(
                code=types.ErrorCodes.InvalidParams, message=f"santa: invalid params for {message.method}{detail}"))
            return
        super().handle_message(message)


@contextmanager
def _as_lsp_errors() -> Iterator[None]:
    """SantaErrors as LSP error responses, with santa's message."""
    try:
        yield
    except UsageError as exc:  # the request itself: a document not open, options santa cannot use
        raise JsonRpcException(f"santa: {exc}", code=types.ErrorCodes.InvalidParams) from exc
    except SantaError as exc:  # a model, context or server problem
        raise JsonRpcException(f"santa: {exc}", code=types.LSPErrorCodes.RequestFailed) from exc


def _plain(method: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A plain function that calls bound ``method``: pygls tags handlers with attributes, which
    bound methods cannot take."""
    if asyncio.iscoroutinefunction(method):
        async def call_async(params: Any) -> Any:
            return await method(params)

        return call_async

    def call(params: Any) -> Any:
        return method(params)

    return call


def _label(text: str) -> str:
    """What a completion menu shows: the first line with text, marked when more follow."""
    lines = [line for line in text.split("\n") if line.strip()]
    return lines[0].strip() + (" …" if len(lines) > 1 else "") if lines else text


def completion_item(cursor: Cursor, text: str, rank: int) -> types.CompletionItem:
    """One ``textDocument/completion`` item for completion ``text`` at ``cursor`` (see the
    module docstring for why it starts with the word before the cursor)."""
    start, here = types.Position(cursor.line, cursor.word_start), types.Position(cursor.line, cursor.character)
    return types.CompletionItem(
        label=_label(text), kind=types.CompletionItemKind.Text, detail="santa", sort_text=f"{rank:02d}",
        preselect=rank == 0, filter_text=cursor.word, insert_text=cursor.word + text,
        insert_text_format=types.InsertTextFormat.PlainText, insert_text_mode=types.InsertTextMode.AsIs,
        text_edit=types.TextEdit(range=types.Range(start, here), new_text=cursor.word + text),
    )


def inline_items(cursor: Cursor, outcome: Outcome) -> types.InlineCompletionList:
    here = types.Position(cursor.line, cursor.character)
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(insert_text=text, range=types.Range(here, here)) for text in outcome.texts])


class SantaServer(LanguageServer):
    """The language server: documents, settings and the model worker, with their handlers.

    Args:
        load: builds the engine for (model, endpoint); called on the model thread.
        options: the request options from the command line and settings; ``maxTokens`` and
            ``mode`` from the client's settings replace theirs, the file name is the document's.
        config: the settings before the client's (from the command line).
    """

    def __init__(self, load: EngineLoader, options: CompletionOptions, config: LspConfig) -> None:
        super().__init__("santa", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=_Protocol)
        self.documents = DocumentStore()
        self.worker = ModelWorker()
        self.options = options
        self.config = config
        self.shut_down = False  # a shutdown request came: exit means success
        self._load = load
        self._initial = config  # the command line's settings with initializationOptions applied
        self._progress_ids = itertools.count(1)
        for method, handler, options_ in (
            (types.INITIALIZE, self._initialize, None),
            (types.INITIALIZED, self._initialized, None),
            (types.SHUTDOWN, self._shutdown, None),
            (types.WORKSPACE_DID_CHANGE_CONFIGURATION, self._did_change_configuration, None),
            (types.TEXT_DOCUMENT_DID_OPEN, self._did_open, None),
            (types.TEXT_DOCUMENT_DID_CHANGE, self._did_change, None),
            (types.TEXT_DOCUMENT_DID_CLOSE, self._did_close, None),
            (types.TEXT_DOCUMENT_INLINE_COMPLETION, self._inline_completion, types.InlineCompletionOptions()),
            (types.TEXT_DOCUMENT_COMPLETION, self._completion, types.CompletionOptions(resolve_provider=False)),
        ):
            self.feature(method, options_)(_plain(handler))

    # -- lifecycle and settings ---------------------------------------------------------------

    def _initialize(self, params: types.InitializeParams) -> None:
        # pygls chose the position encoding from the client's offer before calling this.
        encoding = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        self.documents.encoding = str(getattr(encoding, "value", encoding))
        self._initial = self._configured(self.config, params.initialization_options, "initializationOptions"
                                         ) or self.config
        self.config = self._initial

    async def _initialized(self, params: types.InitializedParams) -> None:
        # Loading starts only now, so the client has its initialize answer (and a responsive
        # server) while the model loads.
        await self._load_engine()

    def _shutdown(self, params: None) -> None:
        self.shut_down = True
        self.worker.close()

    async def _did_change_configuration(self, params: types.DidChangeConfigurationParams) -> None:
        settings = params.settings
        if settings is None and self._client_pulls_configuration():
            items = [types.ConfigurationItem(section="santa")]
            try:
                settings = (await self.workspace_configuration_async(types.ConfigurationParams(items=items)))[0]
            except Exception as exc:  # the client could not answer: keep the settings we have
                log.warning("santa: workspace/configuration failed: %s", exc)
                return
        before = self.config.engine_choice
        # The latest settings apply over initializationOptions; invalid ones keep what we had.
        self.config = self._configured(self._initial, settings, "settings") or self.config
        if self.config.engine_choice != before:
            await self._load_engine()

    def _client_pulls_configuration(self) -> bool:
        workspace = self.client_capabilities.workspace
        return bool(workspace and workspace.configuration)

    def _configured(self, base: LspConfig, payload: object, origin: str) -> LspConfig | None:
        """``base`` with the santa settings in ``payload``; None (after a warning) if invalid."""
        try:
            values = section(payload)
            return base if values is None else base.merged(values)
        except UsageError as exc:
            self._tell(types.MessageType.Warning, f"santa: ignoring the {origin}: {exc}")
            return None

    def _tell(self, kind: types.MessageType, message: str) -> None:
        self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    async def _load_engine(self) -> None:
        """Load the configured engine on the model thread, shown as progress (or a message).
        The load is queued first, so that requests arriving meanwhile wait for it."""
        model, endpoint = self.config.engine_choice
        what = endpoint or model or "the model"
        loaded: asyncio.Future[Loaded] = asyncio.get_running_loop().create_future()
        self.worker.load(lambda: self._load(model, endpoint), loaded.set_result)
        token = await self._begin_progress(f"loading {what}")
        report = await loaded
        if report.engine is None:
            message = f"santa: cannot load {what}: {report.error}"
            self._end_progress(token, message)
            self._tell(types.MessageType.Error, message)
            return
        message = f"santa: {report.engine.name} ready ({report.seconds:.1f} s)"
        self._end_progress(token, message)
        if token is None:
            self.window_log_message(types.LogMessageParams(type=types.MessageType.Info, message=message))

    async def _begin_progress(self, message: str) -> str | None:
        """A ``$/progress`` token with its begin sent, or None after a plain message (clients
        without work-done progress)."""
        window = self.client_capabilities.window
        if window is not None and window.work_done_progress:
            token = f"santa-load-{next(self._progress_ids)}"
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), _PROGRESS_CREATE_TIMEOUT)
            except Exception as exc:  # refused or no answer: fall back to a message
                log.warning("santa: the client did not create a progress token: %s", exc)
            else:
                self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="santa", message=message))
                return token
        self._tell(types.MessageType.Info, f"santa: {message}…")
        return None

    def _end_progress(self, token: str | None, message: str) -> None:
        if token is not None:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))

    # -- documents ----------------------------------------------------------------------------

    def _did_open(self, params: types.DidOpenTextDocumentParams) -> None:
        doc = params.text_document
        self.documents.open(doc.uri, doc.text, doc.version, doc.language_id)

    def _did_change(self, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        self.worker.supersede(uri)  # a completion for the old text is stale
        changes = [
            Change(c.text, (c.range.start.line, c.range.start.character), (c.range.end.line, c.range.end.character))
            if isinstance(c, types.TextDocumentContentChangePartial) else Change(c.text)
            for c in params.content_changes
        ]
        try:
            self.documents.change(uri, params.text_document.version, changes)
        except UsageError as exc:
            log.warning("santa: ignoring a change: %s", exc)

    def _did_close(self, params: types.DidCloseTextDocumentParams) -> None:
        self.worker.supersede(params.text_document.uri)
        self.documents.close(params.text_document.uri)

    def _filename(self, uri: str) -> str | None:
        """The document's path inside its workspace folder (else its name): StarCoder's
        ``<filename>`` metadata. None for documents that are not files."""
        path = to_fs_path(uri) if uri.startswith("file:") else None
        if not path:
            return None
        file = PurePath(path)
        roots = [to_fs_path(folder.uri) for folder in self.workspace.folders.values()]
        for root in sorted((PurePath(r) for r in [*roots, self.workspace.root_path] if r), key=lambda p: -len(p.parts)):
            if file.is_relative_to(root) and file != root:
                return file.relative_to(root).as_posix()
        return file.name

    # -- completions --------------------------------------------------------------------------

    async def _complete(self, uri: str, position: types.Position) -> tuple[Cursor, Outcome]:
        with _as_lsp_errors():
            cursor = self.documents.cursor(uri, position.line, position.character)
            options = replace(self.options, max_tokens=self.config.max_tokens, mode=self.config.mode,
                              filename=self._filename(uri))
            outcome = await self.worker.complete(
                uri, lambda engine: engine.infill(cursor.prefix, cursor.suffix, options), self.config.budget)
        self._log_outcome(outcome)
        return cursor, outcome

    def _log_outcome(self, outcome: Outcome) -> None:
        """One line per request in the client's log (``window/logMessage``, type Log): what the
        latency rules did and whether the prompt cache was warm."""
        r = outcome.result
        stats = "" if r is None else (
            f", {r.generated_tokens} tokens in {r.elapsed:.2f} s, prompt {r.prompt_tokens} tokens"
            f" ({r.reused_prompt_tokens} reused), stop: {r.stop_reason}")
        self.window_log_message(types.LogMessageParams(type=types.MessageType.Log,
                                                       message=f"santa: {outcome.status}{stats}"))

    async def _inline_completion(self, params: types.InlineCompletionParams) -> types.InlineCompletionList:
        cursor, outcome = await self._complete(params.text_document.uri, params.position)
        return inline_items(cursor, outcome)

    async def _completion(self, params: types.CompletionParams) -> types.CompletionList:
        cursor, outcome = await self._complete(params.text_document.uri, params.position)
        items = [completion_item(cursor, text, rank) for rank, text in enumerate(outcome.texts) if text.strip()]
        return types.CompletionList(is_incomplete=True, items=items)


def _protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """stdin and a private copy of stdout for the protocol. File descriptor 1 then points at
    stderr, so that stray output (a print, a C library, a child process) goes to the log instead
    of corrupting the message stream."""
    sys.stdout.flush()
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return sys.stdin.buffer, protocol_out


def serve(load: EngineLoader, options: CompletionOptions, config: LspConfig, *,
          tcp: tuple[str, int] | None = None) -> bool:
    """Run the server over stdio (or TCP, one client) until the client exits; True when it sent
    ``shutdown`` first (the exit code is then 0, per the specification)."""
    server = SantaServer(load, options, config)
    if tcp is None:
        server.start_io(*_protocol_streams())
    else:
        server.start_tcp(*tcp)
    return server.shut_down
