"""A real headless ComfyUI server for tests (plain helpers, no pytest fixtures).

Tests that need ComfyUI read ``COMFYUI_DIR`` (a ComfyUI checkout whose ``main.py`` runs with the current
python) and skip when it is unset::

    reason = comfyui_skip_reason()
    if reason: pytest.skip(reason)
    with ComfyServer(tmp_path) as server:          # starts, waits for /system_stats
        ws = server.websocket(preview_metadata=True)
        prompt_id = server.queue(graph, ws.client_id)
        entry = server.wait(prompt_id, timeout=600) # history entry; raises with the log tail on error
        assert not server.pack_errors(), server.log_tail()

Isolation: nothing in COMFYUI_DIR is modified. The server gets temp output/input/user/temp dirs, an
in-memory DB, and an ``--extra-model-paths-config`` YAML whose entries are *defaults* (searched first,
written to first) for ``custom_nodes`` (a folder holding a symlink to this repo, whose ``__init__.py`` is
the pack's entry point) and for the model folders diffusion_models / text_encoders / vae / loras / vae_approx.
By default only our pack is loaded from custom_nodes (``--disable-all-custom-nodes`` plus a whitelist),
so other packs installed in COMFYUI_DIR/custom_nodes cannot interfere. ``extra_custom_nodes`` adds more
package folders (symlinked under their own names and whitelisted), e.g. the test shim in
tests/comfy_shim/sf_test_shim (see comfy_fixtures.py); ``env`` sets environment variables of the server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-self-forcing"
MODEL_KINDS = ("diffusion_models", "text_encoders", "vae", "loras", "vae_approx")

# Binary websocket event ids (ComfyUI protocol.py BinaryEventTypes).
EVENT_PREVIEW_IMAGE = 1
EVENT_TEXT = 3
EVENT_PREVIEW_IMAGE_WITH_METADATA = 4


class ComfyServerError(RuntimeError):
    """The server failed to start, rejected a prompt, or a prompt failed; the message has the log tail."""


def comfyui_dir() -> Path | None:
    """The ComfyUI checkout named by COMFYUI_DIR, or None when unset."""
    value = os.environ.get("COMFYUI_DIR", "").strip()
    return Path(value).expanduser().resolve() if value else None


def comfyui_skip_reason() -> str | None:
    """Why tests needing a real ComfyUI must skip, or None when COMFYUI_DIR points at a checkout."""
    path = comfyui_dir()
    if path is None:
        return "COMFYUI_DIR is not set: point it at a ComfyUI checkout to run the ComfyUI tests"
    if not (path / "main.py").is_file():
        return f"COMFYUI_DIR={path} has no main.py: it must be a ComfyUI checkout"
    try:
        import websocket  # noqa: F401  (websocket-client)
    except ImportError:
        return "the websocket-client package is missing: pip install websocket-client"
    return None


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# websocket recorder


@dataclass
class WSMessage:
    """One websocket message as it arrived.

    kind: "json" (text message; ``type``/``data`` from its JSON), "preview" (binary type 1: image only),
    "preview_meta" (binary type 4: ``data`` is the JSON metadata, with node_id / prompt_id / image_type),
    "text" (binary type 3: progress text ``text`` for ``node_id``), or "binary" (anything else, raw ``payload``).
    t: time.monotonic() at arrival (compare with time.monotonic() in the test).
    """

    t: float
    kind: str
    type: Any
    data: Any = None
    image: bytes | None = None
    image_format: str | None = None  # "JPEG" / "PNG"
    node_id: str | None = None
    text: str | None = None
    payload: bytes | None = None


def parse_binary_message(t: float, raw: bytes) -> WSMessage:
    """Decode a binary ComfyUI websocket message (4-byte big-endian event id, then the payload)."""
    if len(raw) < 4:
        return WSMessage(t, "binary", None, payload=raw)
    (event,) = struct.unpack(">I", raw[:4])
    body = raw[4:]
    if event == EVENT_PREVIEW_IMAGE and len(body) >= 4:
        (image_type,) = struct.unpack(">I", body[:4])
        fmt = {1: "JPEG", 2: "PNG"}.get(image_type, str(image_type))
        return WSMessage(t, "preview", event, image=body[4:], image_format=fmt)
    if event == EVENT_PREVIEW_IMAGE_WITH_METADATA and len(body) >= 4:
        (n,) = struct.unpack(">I", body[:4])
        meta = json.loads(body[4:4 + n].decode("utf-8"))
        mime = str(meta.get("image_type", ""))
        fmt = "PNG" if mime.endswith("png") else "JPEG"
        node = meta.get("display_node_id") or meta.get("node_id")
        return WSMessage(t, "preview_meta", event, data=meta, image=body[4 + n:], image_format=fmt,
                         node_id=None if node is None else str(node))
    if event == EVENT_TEXT and len(body) >= 4:
        (n,) = struct.unpack(">I", body[:4])
        node = body[4:4 + n].decode("utf-8")
        return WSMessage(t, "text", event, node_id=node, text=body[4 + n:].decode("utf-8", "replace"))
    return WSMessage(t, "binary", event, payload=body)


class WSRecorder:
    """Websocket client on ``/ws?clientId=...`` recording every message in a background thread.

    With ``preview_metadata=True`` it first announces ``supports_preview_metadata`` (as the frontend does),
    so previews arrive as binary type 4 (with node_id metadata); otherwise as type 1 (image only).
    Previews and ``progress`` events are sent only to the client id that queued the prompt (or to all
    clients when the prompt was queued without one); progress text (type 3) goes to every client.
    """

    def __init__(self, base_url: str, client_id: str | None = None, preview_metadata: bool = False,
                 connect_timeout: float = 10.0):
        import websocket  # websocket-client

        self.client_id = client_id or uuid.uuid4().hex
        self.preview_metadata = preview_metadata
        self._messages: list[WSMessage] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self.error: BaseException | None = None
        ws_url = base_url.replace("http://", "ws://", 1) + "/ws?clientId=" + urllib.parse.quote(self.client_id)
        self._ws = websocket.create_connection(ws_url, timeout=connect_timeout)
        if preview_metadata:
            self._ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        self._ws.settimeout(0.25)
        self._thread = threading.Thread(target=self._run, name=f"ws-{self.client_id[:8]}", daemon=True)
        self._thread.start()
        # The server stores the flags when it reads our first message and answers with its own flags:
        # wait for that, so a prompt queued right after sees the negotiated format.
        self.wait_for(lambda m: m.kind == "json" and m.type == ("feature_flags" if preview_metadata else "status"),
                      timeout=connect_timeout)

    def _run(self) -> None:
        import websocket

        while not self._closed.is_set():
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as e:  # connection closed or broken
                if not self._closed.is_set():
                    self.error = e
                break
            t = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_TEXT:
                try:
                    obj = json.loads(data.decode("utf-8"))
                    msg = WSMessage(t, "json", obj.get("type"), data=obj.get("data"))
                except (ValueError, AttributeError):
                    msg = WSMessage(t, "binary", "bad-json", payload=data)
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                msg = parse_binary_message(t, data)
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            else:
                continue
            with self._cond:
                self._messages.append(msg)
                self._cond.notify_all()
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    # -- reading
    @property
    def messages(self) -> list[WSMessage]:
        """A snapshot of all messages so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def json_messages(self, type: str | None = None) -> list[WSMessage]:
        return [m for m in self.messages if m.kind == "json" and (type is None or m.type == type)]

    def previews(self, node_id: str | None = None) -> list[WSMessage]:
        """Binary preview images (type 1 and type 4); node_id filters type 4 ones by their metadata."""
        out = [m for m in self.messages if m.kind in ("preview", "preview_meta")]
        if node_id is not None:
            out = [m for m in out if m.node_id == str(node_id)]
        return out

    def progress_texts(self, node_id: str | None = None) -> list[WSMessage]:
        return [m for m in self.messages if m.kind == "text" and (node_id is None or m.node_id == str(node_id))]

    def wait_for(self, predicate: Callable[[WSMessage], bool], timeout: float = 30.0,
                 start: int = 0) -> WSMessage:
        """Block until a message (index >= start) satisfies predicate; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self._messages):
                    if predicate(self._messages[i]):
                        return self._messages[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._closed.is_set():
                    raise TimeoutError(f"no matching websocket message within {timeout:.0f}s "
                                       f"({len(self._messages)} received, closed={self._closed.is_set()})")
                self._cond.wait(min(left, 0.5))

    def wait_done(self, prompt_id: str, timeout: float = 600.0) -> WSMessage:
        """Wait for the end of prompt_id: execution_success / execution_error / execution_interrupted,
        or the final ``executing`` message with node None."""
        def done(m: WSMessage) -> bool:
            if m.kind != "json" or not isinstance(m.data, dict) or m.data.get("prompt_id") != prompt_id:
                return False
            if m.type in ("execution_success", "execution_error", "execution_interrupted"):
                return True
            return m.type == "executing" and m.data.get("node") is None
        return self.wait_for(done, timeout)

    def close(self) -> None:
        self._closed.set()
        try:
            self._ws.close()
        except Exception:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "WSRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# server


@dataclass
class ComfyServer:
    """A ComfyUI subprocess on a free loopback port, isolated under ``work_dir``.

    work_dir/ gets: extra_model_paths.yaml, custom_nodes/<PACK_NAME> -> pack_dir (only when pack_dir has an
    ``__init__.py``), custom_nodes/<folder name> -> each of extra_custom_nodes,
    models/{diffusion_models,text_encoders,vae,loras,vae_approx} (``models_dir``), output/, input/, user/,
    temp/, comfyui.log (stdout+stderr).
    """

    work_dir: Path
    comfy_dir: Path | None = None          # default: COMFYUI_DIR
    pack_dir: Path | None = REPO_ROOT      # None: do not install the pack
    pack_name: str = PACK_NAME
    port: int | None = None                # default: a free port
    extra_args: list[str] = field(default_factory=list)
    only_our_pack: bool = True             # ignore other packs in COMFYUI_DIR/custom_nodes
    env: dict[str, str] = field(default_factory=dict)
    cpu: bool | None = None                # default: --cpu unless COMFY_TEST_DEVICE is "gpu"/"cuda"
    extra_custom_nodes: list[Path] = field(default_factory=list)  # more node package folders to load

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        self.comfy_dir = Path(self.comfy_dir).resolve() if self.comfy_dir else comfyui_dir()
        if self.comfy_dir is None or not (self.comfy_dir / "main.py").is_file():
            raise ComfyServerError(comfyui_skip_reason() or f"no ComfyUI main.py in {self.comfy_dir}")
        self.pack_dir = Path(self.pack_dir).resolve() if self.pack_dir else None
        if self.cpu is None:
            self.cpu = os.environ.get("COMFY_TEST_DEVICE", "cpu").lower() not in ("gpu", "cuda")
        self.port = self.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work_dir / "comfyui.log"
        self.custom_nodes_dir = self.work_dir / "custom_nodes"
        self.models_dir = self.work_dir / "models"
        self.model_dirs = {kind: self.models_dir / kind for kind in MODEL_KINDS}
        self.extra_custom_nodes = [Path(p).resolve() for p in self.extra_custom_nodes]
        self.output_dir = self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.user_dir = self.work_dir / "user"
        self.temp_dir = self.work_dir / "temp"
        self.pack_link = self.custom_nodes_dir / self.pack_name
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # -- setup
    @property
    def pack_installed(self) -> bool:
        """Whether the pack is linked into custom_nodes (it needs an ``__init__.py`` at its root)."""
        return self.pack_dir is not None and (self.pack_dir / "__init__.py").is_file()

    def _prepare(self) -> Path:
        for d in [self.custom_nodes_dir, self.output_dir, self.input_dir, self.user_dir, self.temp_dir,
                  *self.model_dirs.values()]:
            d.mkdir(parents=True, exist_ok=True)
        if self.pack_installed and not self.pack_link.exists():
            self.pack_link.symlink_to(self.pack_dir, target_is_directory=True)
        for folder in self.extra_custom_nodes:
            link = self.custom_nodes_dir / folder.name
            if not link.exists():
                link.symlink_to(folder, target_is_directory=True)
        # utils/extra_config.py: each key under a section is a folder kind, paths relative to base_path;
        # is_default puts them first in folder_paths (so saves, e.g. LoRAs, land here, not in COMFYUI_DIR).
        lines = ["self_forcing_tests:", f"  base_path: {json.dumps(str(self.work_dir))}", "  is_default: true",
                 "  custom_nodes: custom_nodes"]
        lines += [f"  {kind}: models/{kind}" for kind in MODEL_KINDS]
        yaml_path = self.work_dir / "extra_model_paths.yaml"
        yaml_path.write_text("\n".join(lines) + "\n")
        return yaml_path

    def add_model(self, kind: str, src: str | os.PathLike, name: str | None = None) -> str:
        """Symlink a model file into the temp folder of ``kind``; returns the name ComfyUI lists."""
        if kind not in self.model_dirs:
            raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
        src = Path(src).resolve()
        dst = self.model_dirs[kind] / (name or src.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src)
        return dst.name

    def command(self) -> list[str]:
        yaml_path = self._prepare()
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", "--extra-model-paths-config", str(yaml_path),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--user-directory", str(self.user_dir), "--temp-directory", str(self.temp_dir)]
        if self.cpu:
            cmd.append("--cpu")
        if self.only_our_pack:
            cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", self.pack_name,
                    *[p.name for p in self.extra_custom_nodes]]
        return cmd + list(self.extra_args)

    # -- lifecycle
    def start(self, timeout: float | None = None) -> "ComfyServer":
        """Start the server and wait until /system_stats answers (timeout: COMFY_START_TIMEOUT or 60 s);
        ComfyServerError with the log otherwise."""
        if timeout is None:
            timeout = float(os.environ.get("COMFY_START_TIMEOUT", "60"))
        if self.proc is not None:
            raise ComfyServerError("server already started")
        cmd = self.command()
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.update(self.env)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(("$ " + " ".join(cmd) + "\n").encode())
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_dir), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                self.proc = None
                raise ComfyServerError(f"ComfyUI exited with code {code} during start-up\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s\n"
                                       f"{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the server (SIGINT, then SIGTERM, then SIGKILL); returns its exit code."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                try:
                    proc.send_signal(sig)
                    proc.wait(timeout=timeout if sig != signal.SIGKILL else None)
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            code = proc.returncode
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def _pack_paths(self) -> list[str]:
        paths = [str(self.pack_link)]
        if self.pack_dir is not None:
            paths.append(str(self.pack_dir))
        return paths

    def pack_errors(self) -> list[str]:
        """Log passages that show our pack failing: its "IMPORT FAILED" line, "Cannot import"/
        comfy_entrypoint warnings naming it, and every traceback with a frame in its files."""
        paths = self._pack_paths()
        lines = self.log_text().splitlines()
        errors: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("Traceback (most recent call last)"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()
                                          or lines[j].startswith(("During handling", "The above exception"))
                                          or lines[j].startswith("Traceback")):
                    j += 1
                block = "\n".join(lines[i:min(j + 1, len(lines))])
                if any(p in block for p in paths):
                    errors.append(block)
                i = j + 1
                continue
            if any(p in line for p in paths) and re.search(
                    r"IMPORT FAILED|Cannot import|comfy_entrypoint|Skip .* module|Error|Exception", line):
                errors.append(line)
            i += 1
        return errors

    def assert_pack_loaded(self) -> None:
        """ComfyServerError unless the pack is installed and its import left no error in the log."""
        if not self.pack_installed:
            raise ComfyServerError(f"the pack is not installed: {self.pack_dir}/__init__.py is missing")
        errors = self.pack_errors()
        if errors:
            raise ComfyServerError("the pack failed in ComfyUI:\n" + "\n\n".join(errors) + "\n" + self.log_tail())

    # -- HTTP
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0,
                 raw: bytes | None = None) -> tuple[int, bytes]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode("utf-8"))
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str, timeout: float = 30.0) -> bytes:
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path} -> {status}: {body[:2000]!r}")
        return body

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self.get(path, timeout=timeout))

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
        status, data = self._request("POST", path, body, timeout=timeout)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def object_info(self, node_class: str | None = None) -> dict:
        """/object_info (all node classes) or /object_info/<class> (that class's entry, {} if unknown)."""
        if node_class is None:
            return self.get_json("/object_info", timeout=60)
        return self.get_json("/object_info/" + urllib.parse.quote(node_class)).get(node_class, {})

    def queue(self, prompt_graph: dict, client_id: str | None = None, extra_data: dict | None = None) -> str:
        """POST /prompt with an API-format graph; returns the prompt id. ComfyServerError with the
        server's validation errors when it refuses the graph."""
        body: dict[str, Any] = {"prompt": prompt_graph}
        if client_id is not None:
            body["client_id"] = client_id
        if extra_data:
            body["extra_data"] = extra_data
        status, resp = self.post_json("/prompt", body)
        if status != 200 or not isinstance(resp, dict) or "prompt_id" not in resp:
            raise ComfyServerError(f"/prompt refused the graph ({status}):\n"
                                   f"{json.dumps(resp, indent=1)[:6000] if isinstance(resp, dict) else resp}")
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of prompt_id, or None while it is queued or running."""
        return self.get_json("/history/" + urllib.parse.quote(prompt_id)).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Poll /history until prompt_id finished; returns its entry (``outputs``, ``status``, ``meta``).
        ComfyServerError (with the execution error and the log tail) if it failed, was interrupted,
        timed out, or the server died."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "success" and status.get("completed", True):
                    return entry
                if status.get("status_str") == "error" or status.get("completed") is False:
                    msgs = [m for m in status.get("messages", []) if m and m[0] in (
                        "execution_error", "execution_interrupted")]
                    detail = ""
                    for kind, data in msgs:
                        detail += f"{kind}: node {data.get('node_id')} ({data.get('node_type')}): " \
                                  f"{data.get('exception_type', '')}: {data.get('exception_message', '')}\n"
                        detail += "".join(data.get("traceback") or [])
                    raise ComfyServerError(f"prompt {prompt_id} failed:\n{detail}\n{self.log_tail()}")
                if status.get("completed", False):
                    return entry
            if not self.running:
                raise ComfyServerError(f"ComfyUI exited while running prompt {prompt_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s\n"
                                       f"{self.log_tail()}")
            time.sleep(poll)

    def wait_idle(self, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Wait until the queue is empty (nothing running or pending, e.g. after a browser queued a prompt
        whose id the test does not know); returns the whole /history {prompt_id: entry}."""
        deadline = time.monotonic() + timeout
        while True:
            q = self.get_json("/queue")
            if not q.get("queue_running") and not q.get("queue_pending"):
                return self.get_json("/history")
            if not self.running:
                raise ComfyServerError(f"ComfyUI exited\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"queue not idle within {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(poll)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def set_setting(self, setting_id: str, value: Any) -> None:
        """POST /settings/<id> (e.g. "Comfy.TutorialCompleted", True before a browser test)."""
        status, resp = self.post_json("/settings/" + urllib.parse.quote(setting_id), value)
        if status != 200:
            raise ComfyServerError(f"setting {setting_id} -> {status}: {resp}")

    def output_files(self, entry: dict, key: str | None = None) -> list[Path]:
        """Files a history entry lists in its outputs (images/gifs/video/... with filename/subfolder/type)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir / "temp", "input": self.input_dir}
        paths = []
        for node_out in (entry.get("outputs") or {}).values():
            for k, items in node_out.items():
                if key is not None and k != key or not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        paths.append(root / item.get("subfolder", "") / item["filename"])
        return paths

    def websocket(self, client_id: str | None = None, preview_metadata: bool = False) -> WSRecorder:
        """A connected WSRecorder (close it, or use it as a context manager)."""
        return WSRecorder(self.url, client_id=client_id, preview_metadata=preview_metadata)


# ----------------------------------------------------------------------------------------------
# headless browser (Chrome DevTools Protocol over websocket-client)


def chromium_skip_reason() -> str | None:
    """Why browser tests must skip, or None when a chromium binary is on PATH (or CHROMIUM names one)."""
    import shutil

    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    return None if exe else "no chromium on PATH (apt-get install chromium, or set CHROMIUM)"


class BrowserPage:
    """The ComfyUI frontend in headless chromium, driven through the DevTools protocol.

    ``evaluate`` runs a JS expression in the page (promises awaited, result returned by value);
    ``load_api_json`` / ``queue_prompt`` use the page's ``app.loadApiJson`` and ``app.queuePrompt``.
    The page's own websocket client is the one that queues, so progress/previews go to it (use
    ``screenshot`` to see them); progress text also reaches a WSRecorder of the test.
    """

    def __init__(self, server: ComfyServer, width: int = 1280, height: int = 800, timeout: float = 60.0):
        import tempfile

        import websocket

        exe = os.environ.get("CHROMIUM") or "chromium"
        server.set_setting("Comfy.TutorialCompleted", True)  # no template dialog over the canvas
        self._profile = tempfile.mkdtemp(prefix="chromium-", dir=server.work_dir)
        port = free_port()
        self._log = open(server.work_dir / "chromium.log", "ab")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={self._profile}",
             f"--remote-debugging-port={port}", f"--window-size={width},{height}", server.url + "/"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._id = 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise ComfyServerError("chromium did not open its DevTools endpoint")
            time.sleep(0.25)
        self._cdp = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
        while not self.evaluate("typeof window.app !== 'undefined' && !!window.app.graph"):
            if time.monotonic() > deadline:
                self.close()
                raise ComfyServerError("the ComfyUI frontend did not finish loading")
            time.sleep(0.25)

    def call(self, method: str, **params) -> dict:
        """One DevTools command; returns its ``result`` (events arriving meanwhile are dropped)."""
        self._id += 1
        self._cdp.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._cdp.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise ComfyServerError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise ComfyServerError(f"page error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def load_api_json(self, graph: dict, name: str = "test.json") -> list[str]:
        """Load an API-format graph into the canvas; returns ["type:id", ...] of its nodes."""
        return self.evaluate(f"(async () => {{ await app.loadApiJson({json.dumps(graph)}, {json.dumps(name)}); "
                             "return app.graph.nodes.map(n => n.type + ':' + n.id); })()")

    def load_workflow(self, workflow: dict) -> None:
        """Load a UI-format workflow (what template files hold) as the template browser does."""
        self.evaluate(f"(async () => {{ await app.loadGraphData({json.dumps(workflow)}); return true; }})()")

    def queue_prompt(self) -> None:
        """Press Run (``app.queuePrompt(0)``). Note: INT inputs named seed get the frontend's
        "control after generate" widget (default randomize), which changes the seed after queueing."""
        self.evaluate("(async () => { await app.queuePrompt(0); return true; })()")

    def screenshot(self, path: str | os.PathLike) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        cdp = getattr(self, "_cdp", None)
        if cdp is not None:
            try:
                cdp.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "BrowserPage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def missing_nodes(info: dict, wanted: Iterable[str]) -> list[str]:
    """The names in wanted that /object_info ``info`` does not list."""
    return [n for n in wanted if n not in info]
