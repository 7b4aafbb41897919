"""``santa lsp`` driven by a real LSP client (pytest-lsp's) over stdio.

Against the tiny checkpoint: the handshake, progress while the model loads, incremental sync and
completions equal to ``Engine.infill`` on the same text. Against a scripted ``santa serve``
stand-in (``--endpoint``; no torch, so these start fast) whose streams the test paces: the time
budget, supersession, ``$/cancelRequest`` and edits each stop a running stream, server errors
become LSP errors, and the exact prefix/suffix/settings each request carries. Then malformed
input, unknown methods, shutdown/exit, and the pure parts (positions, settings) directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pygls")
pytest.importorskip("pytest_lsp")

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import LanguageClient
from pytest_lsp.client import make_test_lsp_client

from conftest import serving_in_thread
from santacli.cli import lsp as cli_lsp
from santacli.errors import UsageError
from santacli.lsp import config as lsp_config
from santacli.lsp.config import LspConfig, section
from santacli.lsp.documents import Change, DocumentStore

MAX_TOKENS = 24
ENV = {**os.environ, "SANTA_CONFIG": "/nonexistent/santa.toml", "SANTA_NO_HINT": "1", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}
TEXT = "def add(a, b):\n    return a + b\n"
# Every request's wait for an answer; far more than any here takes, so a hang fails instead of stalling.
PATIENCE = 60


@contextlib.asynccontextmanager
async def santa_lsp(*args: str) -> AsyncIterator[LanguageClient]:
    """`santa lsp ARGS` with a pytest-lsp client on its stdio; killed if a test leaves it running."""
    client = make_test_lsp_client()
    await client.start_io(sys.executable, "-m", "santacli", "lsp", *args, env=ENV)
    try:
        yield client
    finally:
        server = client._server
        if server is not None and server.returncode is None:
            server.kill()
        await client.stop()


async def initialize(client: LanguageClient, options: dict[str, Any] | None = None, *, progress: bool = False,
                     folders: list[Path] = (), encodings: list[str] | None = None) -> types.InitializeResult:
    capabilities = types.ClientCapabilities(
        window=types.WindowClientCapabilities(work_done_progress=progress),
        general=types.GeneralClientCapabilities(position_encodings=encodings) if encodings else None)
    return await asyncio.wait_for(client.initialize_session(types.InitializeParams(
        capabilities=capabilities, initialization_options=options,
        workspace_folders=[types.WorkspaceFolder(uri=f.as_uri(), name=f.name) for f in folders] or None)), PATIENCE)


def open_doc(client: LanguageClient, uri: str, text: str, version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))


def edit(client: LanguageClient, uri: str, version: int, start: tuple[int, int], end: tuple[int, int],
         text: str) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(types.Position(*start), types.Position(*end)), text=text)]))


def inline_params(uri: str, line: int, character: int) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))


async def inline(client: LanguageClient, uri: str, line: int, character: int) -> list[str]:
    reply = await asyncio.wait_for(client.text_document_inline_completion_async(
        inline_params(uri, line, character)), PATIENCE)
    assert reply is not None
    items = reply.items if isinstance(reply, types.InlineCompletionList) else reply
    return [item.insert_text for item in items]


async def completion(client: LanguageClient, uri: str, line: int, character: int) -> types.CompletionList:
    reply = await asyncio.wait_for(client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, character))), PATIENCE)
    assert isinstance(reply, types.CompletionList)
    return reply


async def wait_until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def shutdown_and_exit(client: LanguageClient) -> int:
    await asyncio.wait_for(client.shutdown_session(), PATIENCE)
    assert client._server is not None
    return await asyncio.wait_for(client._server.wait(), PATIENCE)


# ---------------------------------------------------------------------------------------------
# The tiny model


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    """The checkpoint loaded in this process with `santa lsp`'s defaults: the oracle."""
    from santacli.engine import Engine

    return Engine.load(str(tiny_checkpoint), device="cpu")


def model_args(checkpoint: Path) -> list[str]:
    return ["--model", str(checkpoint), "--device", "cpu", "--max-tokens", str(MAX_TOKENS)]


@pytest.mark.asyncio
async def test_completions_equal_engine_infill_on_the_edited_text(tiny_checkpoint: Path, reference) -> None:
    uri = "file:///work/prog.py"
    async with santa_lsp(*model_args(tiny_checkpoint)) as client:
        result = await initialize(client, {"santa": {"budgetMs": PATIENCE * 1000}}, progress=True)
        caps = result.capabilities
        assert caps.inline_completion_provider is not None and caps.completion_provider is not None
        assert caps.position_encoding == types.PositionEncodingKind.Utf16
        assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
        assert result.server_info.name == "santa"

        # Sent before the model has loaded (that takes seconds: torch): the first is queued
        # behind the load and superseded by the second before it ever runs.
        open_doc(client, uri, TEXT)
        first = asyncio.create_task(inline(client, uri, 1, 11))
        second = asyncio.create_task(inline(client, uri, 1, 11))
        expected = reference.infill(*split(TEXT, 1, 11), max_tokens=MAX_TOKENS).result.text
        assert expected, "the tiny model should suggest something here"
        assert await first == []
        assert await second == [expected]
        [(begin, end)] = [tuple(reports) for reports in client.progress_reports.values()]
        assert (begin.kind, end.kind) == ("begin", "end") and "ready" in end.message, (begin, end)

        # Incremental edits, with a character outside the BMP (two UTF-16 units) before others.
        edit(client, uri, 2, (0, 0), (0, 0), "# héllo 😀 wörld\n")
        edit(client, uri, 3, (0, 10), (0, 10), "!")  # after the emoji: "# héllo " is 8 units, the emoji 2
        edit(client, uri, 4, (2, 15), (2, 16), "- b")  # "a + b" -> "a + - b"
        text = "# héllo 😀! wörld\ndef add(a, b):\n    return a + - b\n"
        prefix, suffix = split(text, 2, 11)
        expected = reference.infill(prefix, suffix, max_tokens=MAX_TOKENS).result.text
        assert await inline(client, uri, 2, 11) == [expected]

        listed = await completion(client, uri, 2, 11)
        # the same document layout on every request keeps the engine's prompt cache warm
        log = [m.message for m in client.log_messages if m.message.startswith("santa: done")]
        assert len(log) == 3 and "(0 reused)" not in log[-1], log
        assert listed.is_incomplete
        [item] = listed.items
        assert item.text_edit.new_text == item.insert_text == expected
        assert (item.text_edit.range.start, item.text_edit.range.end) == (types.Position(2, 11),) * 2
        assert item.filter_text == ""  # no word before the cursor
        # after a word: the item replaces it and starts with it, so that clients keep it
        expected = reference.infill(*split(text, 2, 12), max_tokens=MAX_TOKENS).result.text
        [item] = (await completion(client, uri, 2, 12)).items
        assert item.text_edit.new_text == item.insert_text == "a" + expected
        assert (item.text_edit.range.start, item.text_edit.range.end) == (types.Position(2, 11), types.Position(2, 12))
        assert item.filter_text == "a"
        assert await shutdown_and_exit(client) == 0


def split(text: str, line: int, column: int) -> tuple[str, str]:
    """Split at a (line, code point column) position."""
    offset = sum(len(x) + 1 for x in text.split("\n")[:line]) + column
    return text[:offset], text[offset:]


@pytest.mark.asyncio
async def test_a_model_that_cannot_load_is_an_error_not_a_dead_server(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # a folder that is no checkpoint
    uri = "file:///work/prog.py"
    async with santa_lsp("--model", str(tmp_path), "--device", "cpu") as client:
        await initialize(client, {"budgetMs": PATIENCE * 1000})
        open_doc(client, uri, TEXT)
        with pytest.raises(JsonRpcException) as failed:
            await inline(client, uri, 1, 11)
        assert failed.value.code == types.LSPErrorCodes.RequestFailed
        assert "could not be loaded" in failed.value.message
        await wait_until(lambda: client.messages, "the error message")
        assert any(m.type == types.MessageType.Error and "cannot load" in m.message for m in client.messages)
        assert await shutdown_and_exit(client) == 0


# ---------------------------------------------------------------------------------------------
# A scripted santa server: the test paces its streams


@dataclass
class Exchange:
    """One /infill request as the scripted server saw it."""

    body: dict[str, Any]
    pieces: list[str]
    sent: int = 0
    hung_up: bool = False  # the client closed the stream before its end
    started: threading.Event = field(default_factory=threading.Event)  # the first piece went out
    ended: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Script:
    """How the scripted server answers one request: these pieces, ``pause`` seconds apart,
    the first after ``delay`` (a model busy with its prefill)."""

    pieces: list[str]
    pause: float = 0.0
    delay: float = 0.0


@dataclass(frozen=True)
class Failure:
    status: int
    message: str


class ScriptedServer(ThreadingHTTPServer):
    """Streams /infill like `santa serve`: each request takes the next script, by default one
    quick piece, "done"."""

    daemon_threads = True

    def __init__(self) -> None:
        self.scripts: queue.SimpleQueue[Script | Failure] = queue.SimpleQueue()
        self.exchanges: list[Exchange] = []
        super().__init__(("127.0.0.1", 0), ScriptedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            script = self.server.scripts.get_nowait()
        except queue.Empty:
            script = Script(["done"])
        if isinstance(script, Failure):
            data = json.dumps({"error": {"message": script.message}}).encode()
            self.send_response(script.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        pieces = script.pieces
        exchange = Exchange(body, pieces)
        self.server.exchanges.append(exchange)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            time.sleep(script.delay)
            for piece in pieces:
                self._event({"text": piece})
                exchange.sent += 1
                exchange.started.set()
                time.sleep(script.pause)
            text = "".join(pieces)
            self._event({"result": {
                "completion": text, "candidates": [text], "stop_reason": "eos", "stop_reasons": ["eos"],
                "mode": body["mode"], "fim": True, "fim_mode": "psm", "model": "scripted",
                "tokens": {"prompt": 1, "prompt_reused": 0, "generated": len(pieces)},
                "timings": {"time_to_first_token_s": 0, "tokens_per_s": 0, "total_s": 0},
                "truncated": {"prefix_chars": 0, "prefix_lines": 0, "suffix_chars": 0, "suffix_lines": 0}}})
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client hung up: santa cancelled the stream
            exchange.hung_up = True
        finally:
            exchange.ended.set()

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    with serving_in_thread(ScriptedServer()) as server:
        yield server


SLOW = Script(["x"] * 1000, pause=0.01)  # ten seconds of stream unless santa stops it


async def ended_early(exchange: Exchange) -> None:
    """The stream was cut: santa closed the connection long before the script's end."""
    await wait_until(exchange.ended.is_set, "the stream to end")
    assert exchange.hung_up and exchange.sent < len(exchange.pieces), (exchange.sent, exchange.hung_up)


@pytest.mark.asyncio
async def test_the_budget_returns_the_text_so_far_and_stops_the_stream(scripted: ScriptedServer) -> None:
    uri = "file:///work/prog.py"
    scripted.scripts.put(SLOW)
    async with santa_lsp("--endpoint", scripted.url, "--budget-ms", "300") as client:
        await initialize(client)
        open_doc(client, uri, TEXT)
        [text] = await inline(client, uri, 1, 11)
        await ended_early(scripted.exchanges[0])
        assert 0 < len(text) < len(SLOW.pieces) and set(text) == {"x"}, text  # a prefix of the stream


@pytest.mark.asyncio
async def test_the_budget_does_not_wait_for_a_long_model_step(scripted: ScriptedServer) -> None:
    uri = "file:///work/prog.py"
    scripted.scripts.put(Script(["x"] * 100, pause=0.01, delay=5.0))  # nothing for five seconds
    async with santa_lsp("--endpoint", scripted.url, "--budget-ms", "300") as client:
        await initialize(client)
        open_doc(client, uri, TEXT)
        assert await inline(client, uri, 1, 11) == []
        [exchange] = scripted.exchanges
        assert exchange.sent == 0  # answered while the "model" was still busy, with nothing
        await ended_early(exchange)  # and its stream stops at its first piece


@pytest.mark.asyncio
async def test_a_newer_request_or_an_edit_supersedes_a_running_one(scripted: ScriptedServer) -> None:
    uri = "file:///work/prog.py"
    async with santa_lsp("--endpoint", scripted.url, "--budget-ms", str(PATIENCE * 1000)) as client:
        await initialize(client)
        open_doc(client, uri, TEXT)

        scripted.scripts.put(SLOW)
        scripted.scripts.put(Script(["fresh"]))
        older = asyncio.create_task(inline(client, uri, 1, 11))
        await wait_until(lambda: scripted.exchanges and scripted.exchanges[0].started.is_set(), "the first stream")
        assert await inline(client, uri, 1, 11) == ["fresh"]
        assert await older == []
        await ended_early(scripted.exchanges[0])

        scripted.scripts.put(SLOW)
        running = asyncio.create_task(inline(client, uri, 1, 11))
        await wait_until(lambda: len(scripted.exchanges) == 3 and scripted.exchanges[2].started.is_set(), "stream 3")
        edit(client, uri, 2, (0, 0), (0, 0), "#\n")
        assert await running == []
        await ended_early(scripted.exchanges[2])

        # another document is not affected: both run to the end, one after the other
        other = "file:///work/other.py"
        open_doc(client, other, "x = 1\n")
        scripted.scripts.put(Script(["one"], pause=0.2))
        scripted.scripts.put(Script(["two"]))
        assert await asyncio.gather(inline(client, uri, 0, 1), inline(client, other, 0, 5)) == [["one"], ["two"]]
        assert await shutdown_and_exit(client) == 0


@pytest.mark.asyncio
async def test_cancel_request_stops_the_stream(scripted: ScriptedServer) -> None:
    uri = "file:///work/prog.py"
    scripted.scripts.put(SLOW)
    async with santa_lsp("--endpoint", scripted.url, "--budget-ms", str(PATIENCE * 1000)) as client:
        await initialize(client)
        open_doc(client, uri, TEXT)
        pending = asyncio.create_task(client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(uri, 1, 11), msg_id="cancel-me"))
        await wait_until(lambda: scripted.exchanges and scripted.exchanges[0].started.is_set(), "the stream")
        client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-me"))
        with pytest.raises(JsonRpcException) as cancelled:
            await asyncio.wait_for(pending, PATIENCE)
        assert cancelled.value.code == types.LSPErrorCodes.RequestCancelled
        await ended_early(scripted.exchanges[0])
        assert await inline(client, uri, 1, 11) == ["done"]  # and the next request is served


@pytest.mark.asyncio
async def test_requests_carry_the_unsaved_text_and_the_settings(scripted: ScriptedServer, tmp_path: Path) -> None:
    project = tmp_path / "project"
    uri = (project / "pkg" / "mod.py").as_uri()
    async with santa_lsp("--endpoint", scripted.url, "--max-tokens", "40") as client:
        await initialize(client, {"santa": {"maxTokens": 12, "mode": "line"}}, folders=[project])
        open_doc(client, uri, "x = 'é😀'\r\ny = 2\n")
        edit(client, uri, 2, (0, 8), (0, 8), "z")  # after the emoji: "x = 'é" is 6 units, the emoji 2
        assert await inline(client, uri, 1, 4) == ["done"]
        body = scripted.exchanges[-1].body
        assert (body["prefix"], body["suffix"]) == ("x = 'é😀z'\r\ny = ", "2\n")
        assert (body["max_tokens"], body["mode"], body["path"]) == (12, "line", "pkg/mod.py")

        # didChangeConfiguration: applied over initializationOptions; bad values are refused whole
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"santa": {"maxTokens": 7, "mode": "block"}}))
        assert await inline(client, uri, 1, 4) == ["done"]
        assert (scripted.exchanges[-1].body["max_tokens"], scripted.exchanges[-1].body["mode"]) == (7, "block")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"santa": {"maxTokens": 5, "mode": "sideways"}}))
        await wait_until(lambda: [m for m in client.messages if m.type == types.MessageType.Warning], "a warning")
        [warning] = [m for m in client.messages if m.type == types.MessageType.Warning]
        assert "sideways" in warning.message
        assert await inline(client, uri, 1, 4) == ["done"]
        assert scripted.exchanges[-1].body["max_tokens"] == 7

        # a position past the end of its line means the end of the line
        assert await inline(client, uri, 1, 99) == ["done"]
        assert scripted.exchanges[-1].body["suffix"] == "\n"
        assert await shutdown_and_exit(client) == 0


@pytest.mark.asyncio
async def test_the_position_encoding_is_negotiated(scripted: ScriptedServer) -> None:
    uri = "file:///work/prog.py"
    async with santa_lsp("--endpoint", scripted.url) as client:
        result = await initialize(client, encodings=["utf-8", "utf-16"])  # the client's preference first
        assert result.capabilities.position_encoding == types.PositionEncodingKind.Utf8
        open_doc(client, uri, "é😀x\n")
        assert await inline(client, uri, 0, 6) == ["done"]  # two bytes, then four
        assert scripted.exchanges[-1].body["prefix"] == "é😀"
        assert await shutdown_and_exit(client) == 0


@pytest.mark.asyncio
async def test_errors_are_lsp_errors_and_the_server_lives_on(scripted: ScriptedServer) -> None:
    uri = "file:///work/prog.py"
    async with santa_lsp("--endpoint", scripted.url) as client:
        await initialize(client)
        open_doc(client, uri, TEXT)
        scripted.scripts.put(Failure(503, "server is busy"))
        with pytest.raises(JsonRpcException) as busy:
            await inline(client, uri, 1, 11)
        assert busy.value.code == types.LSPErrorCodes.RequestFailed and "busy" in busy.value.message
        with pytest.raises(JsonRpcException) as unopened:
            await inline(client, "file:///work/never-opened.py", 0, 0)
        assert unopened.value.code == types.ErrorCodes.InvalidParams and "not open" in unopened.value.message

        # an unknown method: MethodNotFound; an unknown notification: ignored
        with pytest.raises(JsonRpcException) as unknown:
            await asyncio.wait_for(client.protocol.send_request_async("santa/noSuchMethod", {}), PATIENCE)
        assert unknown.value.code == types.ErrorCodes.MethodNotFound
        client.protocol.notify("santa/noSuchNotification", {})
        assert await inline(client, uri, 1, 11) == ["done"]  # still serving
        assert await shutdown_and_exit(client) == 0


class RawPeer:
    """`santa lsp` spoken to byte by byte, for what a well-behaved client library cannot send."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin, self.stdout = process.stdin, process.stdout

    async def send(self, message: dict[str, Any] | bytes) -> None:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await self.stdin.drain()

    async def reply(self, msg_id: int | str) -> dict[str, Any]:
        """The response to ``msg_id`` (notifications and requests from the server are skipped)."""
        while True:
            length = 0
            while (line := await asyncio.wait_for(self.stdout.readline(), PATIENCE)) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert length, "the server closed its output"
            message = json.loads(await self.stdout.readexactly(length))
            if message.get("id") == msg_id and "method" not in message:
                return message


@pytest.mark.asyncio
async def test_malformed_input_is_answered_or_ignored(scripted: ScriptedServer) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "santacli", "lsp", "--endpoint", scripted.url, env=ENV,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    peer = RawPeer(process)
    try:
        await peer.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}})
        assert "capabilities" in (await peer.reply(1))["result"]
        await peer.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        await peer.send(b"{this is not json")
        await peer.send(b"[]")
        await peer.send({"jsonrpc": "2.0", "id": "no-params", "method": "textDocument/completion"})
        await peer.send({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion",
                         "params": {"textDocument": {"uri": "file:///x.py"}}})  # no position, no context
        for msg_id in ("no-params", 2):  # answered, not dropped: the client must not wait forever
            error = (await peer.reply(msg_id))["error"]
            assert error["code"] == types.ErrorCodes.InvalidParams, error
        await peer.send({"jsonrpc": "2.0", "id": 3, "method": "santa/noSuchMethod", "params": {}})
        assert (await peer.reply(3))["error"]["code"] == types.ErrorCodes.MethodNotFound
        await peer.send({"jsonrpc": "2.0", "id": 4, "method": "shutdown"})
        assert (await peer.reply(4))["result"] is None
        await peer.send({"jsonrpc": "2.0", "method": "exit"})
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.asyncio
async def test_exit_without_shutdown_and_end_of_input(scripted: ScriptedServer) -> None:
    async with santa_lsp("--endpoint", scripted.url) as client:
        await initialize(client)
        client.exit(None)
        assert client._server is not None
        assert await asyncio.wait_for(client._server.wait(), PATIENCE) == 1  # LSP: exit without shutdown
    async with santa_lsp("--endpoint", scripted.url) as client:
        await initialize(client)
        assert client._server is not None and client._server.stdin is not None
        client._server.stdin.close()  # the editor went away
        assert await asyncio.wait_for(client._server.wait(), PATIENCE) == 1


@pytest.mark.asyncio
async def test_tcp_for_debugging(scripted: ScriptedServer) -> None:
    import socket

    with socket.socket() as probe:  # a free port (released again for the server to take)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "santacli", "lsp", "--endpoint", scripted.url, "--tcp", f"127.0.0.1:{port}",
        env=ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    client = make_test_lsp_client()
    try:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                assert process.returncode is None and time.monotonic() < deadline, "the server did not listen"
                await asyncio.sleep(0.1)
        await initialize(client)
        open_doc(client, "file:///work/prog.py", TEXT)
        assert await inline(client, "file:///work/prog.py", 1, 11) == ["done"]
        await asyncio.wait_for(client.shutdown_session(), PATIENCE)
        assert await asyncio.wait_for(process.wait(), PATIENCE) == 0
        assert process.stdout is not None and await process.stdout.read() == b""  # nothing on stdout
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await client.stop()


def test_help_imports_neither_pygls_nor_torch() -> None:
    import subprocess

    code = ("import sys\n"
            "from santacli.cli.app import main\n"
            "for argv in (['--help'], ['lsp', '--help']):\n"
            "    assert main(argv) == 0\n"
            "heavy = sorted(m for m in ('torch', 'pygls', 'lsprotocol') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, capture_output=True)


# ---------------------------------------------------------------------------------------------
# The pure parts


def test_positions_follow_lsp_line_breaks_and_encodings() -> None:
    text = "a😀b\r\nc\x0cd\u2028e\rf\n"  # a form feed and U+2028 are not LSP line breaks
    store = DocumentStore()
    store.open("u", text, 1)
    assert store.cursor("u", 0, 3).prefix == "a😀"  # UTF-16: the emoji is two units
    assert store.cursor("u", 0, 2).prefix == "a"  # inside the pair: the character's start
    assert store.cursor("u", 1, 3).prefix == "a😀b\r\nc\x0cd"
    assert store.cursor("u", 2, 0).prefix == "a😀b\r\nc\x0cd\u2028e\r"
    assert store.cursor("u", 1, 99).suffix == "\rf\n"  # past the line's end: its end
    end = store.cursor("u", 9, 9)  # past the last line: the end of the text
    assert (end.prefix, end.suffix, end.line, end.character) == (text, "", 3, 0)
    store.encoding = "utf-8"
    assert store.cursor("u", 0, 5).prefix == "a😀"  # four bytes
    assert store.cursor("u", 0, 6).character == 6
    store.encoding = "utf-32"
    assert store.cursor("u", 0, 2).prefix == "a😀"
    with pytest.raises(UsageError):
        store.encoding = "utf-7"


def test_incremental_changes_apply_in_order() -> None:
    store = DocumentStore()
    store.open("u", "héllo\nwörld\n", 1)
    store.change("u", 2, [Change("X", (0, 1), (1, 1)), Change("!", (0, 6), (0, 6)), Change("Y", (5, 0), (9, 9))])
    assert store.get("u").text == "hXörld!\nY"
    assert store.get("u").version == 2
    store.change("u", 3, [Change("whole")])
    assert store.get("u").text == "whole"
    cursor = store.cursor("u", 0, 3)
    assert (cursor.prefix, cursor.suffix, cursor.line_prefix, cursor.word) == ("who", "le", "who", "who")
    store.close("u")
    with pytest.raises(UsageError, match="not open"):
        store.cursor("u", 0, 0)


def test_settings_merge_and_validation() -> None:
    base = LspConfig(model="tiny", max_tokens=64)
    merged = base.merged({"maxTokens": 16.0, "mode": "line", "budgetMs": 500, "endpoint": "http://h:1"})
    assert merged == LspConfig(model="tiny", endpoint="http://h:1", max_tokens=16, mode="line", budget_ms=500)
    assert merged.budget == 0.5 and merged.engine_choice == ("tiny", "http://h:1")
    assert base.merged({"maxTokens": None}) == base
    for bad in ({"maxTokens": 0}, {"maxTokens": 1.5}, {"maxTokens": True}, {"mode": "sideways"},
                {"budgetMs": 0}, {"model": ""}, {"temperature": 0.5}):
        with pytest.raises(UsageError):
            base.merged(bad)
    assert section({"santa": {"mode": "line"}, "other": 1}) == {"mode": "line"}
    assert section({"mode": "line", "typo": 1}) == {"mode": "line", "typo": 1}  # flat: the typo is reported
    assert section({"pylsp": {}}) is None and section(None) is None and section({"santa": None}) is None
    with pytest.raises(UsageError):
        section({"santa": 3})
    assert cli_lsp.DEFAULT_BUDGET_MS == lsp_config.DEFAULT_BUDGET_MS


def test_tcp_addresses_are_loopback_only() -> None:
    assert cli_lsp.parse_tcp("127.0.0.1:2087") == ("127.0.0.1", 2087)
    assert cli_lsp.parse_tcp("[::1]:2087") == ("::1", 2087)
    assert cli_lsp.parse_tcp("localhost:1") == ("localhost", 1)
    for bad in ("0.0.0.0:2087", "example.com:80", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ":80"):
        with pytest.raises(UsageError):
            cli_lsp.parse_tcp(bad)
