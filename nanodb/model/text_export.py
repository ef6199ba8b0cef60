"""The text tower exported once to OpenVINO, with its tokenizer, so that a text query in a fresh process
needs neither torch nor open_clip: importing and building them takes seconds, encoding a query ~0.1 s.

The export lies in `cache_dir()/text/<model>-<key>`, the key made of the model name, its weights (the
tag, the random seed, or a checkpoint file's path, size and modification time), the nanodb version, the
export format and the OpenVINO version: an export of other weights or of another version is never
found. The first text query of a model loads the torch model and writes the export (atomically), checked
against open_clip (token ids and vectors) before it is kept; from then on every text of that model is
encoded by the export, in every process, so a text's vector does not depend on which process made it.
Where no export can be made or read (backend torch, a GPU model, a Hugging Face tokenizer, OpenVINO
not installed), text is encoded by the torch model as before.

The tokenizer is open_clip's SimpleTokenizer made of its own parts: its cleaning (ftfy, HTML entities,
whitespace, lower case, as open_clip.tokenizer's "lower" clean function does), its word pattern (saved
from the tokenizer) and its BPE vocabulary and merges, run by the `tokenizers` library.

The tower of a CLIP model (ViT-B-32 and its kin) is exported with a dynamic sequence length and each
text run at the smallest of a few token lengths that holds it (model/text_length.py): a query of a few
words costs a few positions' work, not the context length's; other models' towers run at the full length.
It runs only in a few fixed shapes, checked when it is exported to give each text the same bits alone or
with others (model/text_shapes.py)."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import nanodb
from nanodb.model.announce import announced
from nanodb.model.runtimes.openvino_float import cache_dir
from nanodb.model.spec import ModelConfig, ModelSpec
from nanodb.model.text_length import cuttable, encode_text_cut, needed_length
from nanodb.model.text_shapes import TextShapes, bucket_lengths, check_shapes, cpu_id, run_shaped

if TYPE_CHECKING:
    from nanodb.model.clip import ClipModel

log = logging.getLogger(__name__)

EXPORT_FORMAT = 5  # raised when what an export holds, or how it is read, changes
MIN_COSINE = 0.9999  # an export's vectors against open_clip's own, on the probe texts, or it is not kept

# texts whose token ids and vectors an export must reproduce before it is kept
PROBES = (
    "a red car", "x", "", "A Dog On The BEACH!!", "don't stop, it's 3:45 o'clock", "café crème brûlée",
    "東京タワー の 夜景", "🚗🚕 emoji 🐈‍⬛", "&amp; &lt;b&gt;html&lt;/b&gt;", "tab\tnew\nline   spaces",
    "hello<start_of_text>world<end_of_text>", "ÐÐµÐ¼ mojibake â€œquotesâ€\x9d", "a photo of " * 40,
)


def weights_key(spec: ModelSpec) -> str | None:
    """The weights of `spec` as an export's key names them: the tag, the random seed, or a checkpoint
    file's path, size and modification time (not its digest: hashing the file would cost the time an
    export saves); None for a checkpoint file that is not there (loading the model then says so)."""
    if not spec.is_file:
        return spec.weights_id
    try:
        st = os.stat(spec.pretrained)
    except OSError:
        return None
    return f"file:{spec.pretrained}:{st.st_size}:{st.st_mtime_ns}"


def export_folder(spec: ModelSpec, openvino_version: str) -> Path | None:
    """Where the text-tower export of `spec` for this nanodb and OpenVINO version lies (or would); None
    for a checkpoint file that is not there."""
    weights = weights_key(spec)
    if weights is None:
        return None
    parts = (spec.name, weights, nanodb.__version__, str(EXPORT_FORMAT), openvino_version)
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / "text" / f"{spec.name}-{key}"


def clean(text: str) -> str:
    """open_clip's "lower" clean function: mojibake and HTML entities undone, whitespace collapsed, lower case."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()


class ClipTokenizer:
    """open_clip's SimpleTokenizer from an export's files: text -> token ids (N, context_length)."""

    def __init__(self, folder: Path, meta: dict):
        import regex
        from tokenizers import Tokenizer

        self.bpe = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.words = regex.compile(meta["pattern"], regex.IGNORECASE)
        self.sot, self.eot, self.context_length = meta["sot"], meta["eot"], meta["context_length"]

    def encode(self, text: str) -> list[int]:
        """A text's BPE token ids, without the start and end tokens."""
        words = self.words.findall(clean(text))
        return self.bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids if words else []

    def __call__(self, texts: list[str]) -> np.ndarray:
        """As open_clip's tokenizer: start, ids, end, cut to the context length (ending with the end token),
        padded with zeros."""
        tokens = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in zip(tokens, texts):
            ids = [self.sot, *self.encode(text), self.eot][: self.context_length]
            ids[-1] = self.eot
            row[: len(ids)] = ids
        return tokens


class ExportedTextTower:
    """The text half of a ClipModel (`encode_text`, `dim`) from an export: OpenVINO, no torch."""

    def __init__(self, folder: Path, keep_compiled: bool = True):
        import openvino as ov

        meta = json.loads((folder / "meta.json").read_text())
        self.folder = folder
        self.weights_id = meta["weights_id"]
        self.dim = meta["dim"]
        self.tokenizer = ClipTokenizer(folder, meta)
        self.cut = meta["cut"]  # whether it runs a batch's tokens cut to its longest text
        # `keep_compiled`: OpenVINO keeps the compiled model beside the export (written by the first load,
        # the export's own), and loads it in a third of the time of compiling again
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if keep_compiled:
            config["CACHE_DIR"] = str(folder / "compiled")
        compiled = ov.Core().compile_model(str(folder / "text.xml"), "CPU", config)
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request, used by one thread at a time
        # which model this is, for the cache of text vectors: its spec and weights, run by this export
        self.text_model_id = ("openvino export", meta["model"], self.weights_id, folder.name)
        self.filler = self.tokenizer([""])[0]  # what fills a call's rows beyond its texts
        self.shapes = self._shapes(meta)

    def _shapes(self, meta: dict) -> TextShapes:
        """The shapes checked when the tower was exported; checked again here if that was on another CPU;
        one text a call before they are checked (while exporting)."""
        lengths = bucket_lengths(self.cut, self.tokenizer.context_length)
        if "shapes" not in meta:
            return TextShapes.one_by_one(lengths)
        shapes, here = TextShapes.from_meta(meta["shapes"]), cpu_id()
        if shapes.cpu != here:
            log.info("the text export %s was checked on another CPU (%s); checking its shapes on this one (%s)",
                     self.folder.name, shapes.cpu, here)
            shapes = check_shapes(self.features, lengths, self.tokenizer.sot, self.tokenizer.eot)
        return shapes

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit float32 vectors (N, dim), as ClipModel.encode_text; each text's vector the same
        bits alone or with any others: it runs at its token-length bucket in a call of checked rows
        (model/text_shapes.py)."""
        tokens = self.tokenizer(list(texts))
        needed = tokens.argmax(axis=1) + 1 if self.cut else np.full(len(tokens), tokens.shape[1])
        return unit_rows(run_shaped(self.features, tokens, needed, self.shapes, self.filler, self.dim))

    def encode_each(self, texts: list[str]) -> np.ndarray:
        """Each text's vector bit for bit as `encode_text([text])` gives it (what the query batcher needs):
        encode_text's, which runs every text in shapes that give it the same bits alone or together."""
        return self.encode_text(texts)

    def text_key(self, text: str) -> str:
        """What a text's vector depends on: its cleaned form (the tokenizer reads nothing else)."""
        return clean(text)

    def features(self, tokens: np.ndarray) -> np.ndarray:
        """The tower's float32 features (not normalized) of token ids (N, L)."""
        with self._lock:
            return self._request.infer({0: tokens})[0].astype(np.float32)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Each row divided by its norm (a zero row stays zero)."""
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


_towers: dict[Path, ExportedTextTower] = {}
_failed: set[Path] = set()  # exports that could not be made or read in this process: not tried again


def text_encoder(config: ModelConfig, weights_id: str, load: Callable[[], ClipModel]) -> ExportedTextTower | ClipModel:
    """What encodes text for `config`'s model: its text tower's export (made now from the model that
    `load` returns, if there is none yet), so a text's vector is the same in every process; the model
    itself for backend torch, or where no export can be made or read."""
    if config.backend != "torch":
        tower = load_text_tower(config.spec, weights_id)
        if tower is not None:
            return tower
    model = load()
    if config.backend != "torch" and export_text_tower(model) is not None:
        return load_text_tower(config.spec, weights_id) or model
    return model


def load_text_tower(spec: ModelSpec, weights_id: str) -> ExportedTextTower | None:
    """The export of `spec`'s text tower made from the weights `weights_id` names (once per process), or
    None: none was made, OpenVINO or tokenizers is not installed, or it cannot be read (logged)."""
    try:
        import openvino as ov
        import tokenizers  # noqa: F401  (read by the export's tokenizer)
    except ImportError:
        return None
    folder = export_folder(spec, ov.__version__)
    if folder is None:
        return None
    if folder not in _towers and folder not in _failed and (folder / "meta.json").is_file():
        try:
            _towers[folder] = ExportedTextTower(folder)
        except Exception as e:  # a damaged file fails in json, tokenizers or OpenVINO, each its own way
            log.warning("the text export %s cannot be read (%s); encoding text with the torch model", folder, e)
            _failed.add(folder)
    tower = _towers.get(folder)
    return tower if tower is not None and tower.weights_id == weights_id else None


def export_text_tower(clip: ClipModel) -> Path | None:
    """Export `clip`'s text tower and tokenizer (once per model and version; seconds), so that the next
    process encodes text without torch; None when this model's cannot be exported (logged)."""
    try:
        import openvino as ov
        import tokenizers  # noqa: F401  (the export is of no use without it)
    except ImportError:
        return None
    if not _exportable(clip):
        return None
    folder = export_folder(clip.spec, ov.__version__)
    if folder is None:
        return None
    if (folder / "meta.json").is_file():
        return folder
    failed = folder.with_name(folder.name + ".failed")  # why it could not be made: not tried again
    if folder in _failed or failed.is_file():
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, ignore_cleanup_errors=True) as tmp:
        try:
            with announced(f"exporting the text tower of {clip.spec.name} for fast text queries (once)"):
                _write_export(clip, Path(tmp), ov)
                _check_export(clip, Path(tmp))
        except Exception as e:  # the converter may raise anything; the torch model still encodes text
            log.warning("the text tower of %s cannot be exported (%s); text queries load the torch model",
                        clip.spec.describe(), e)
            _failed.add(folder)
            failed.write_text(f"{e}\n")
            return None
        try:
            os.replace(tmp, folder)  # atomic: another process may be exporting the same model
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    return folder


def _exportable(clip: ClipModel) -> bool:
    """A float32 model on the CPU with open_clip's plain SimpleTokenizer (not a Hugging Face one)."""
    import open_clip
    import torch

    tok = clip.tokenizer
    return (clip.device == "cpu" and next(clip.model.parameters()).dtype == torch.float32
            and type(tok) is open_clip.tokenizer.SimpleTokenizer and getattr(tok, "reduction_fn", None) is None
            and tok.clean_fn is open_clip.tokenizer.get_clean_fn("lower"))


def _write_export(clip: ClipModel, folder: Path, ov) -> None:
    """The text tower as OpenVINO IR (token ids -> features), the tokenizer's BPE and meta.json (last)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = clip.tokenizer
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    bpe = Tokenizer(models.BPE(vocab=tok.encoder, merges=merges, end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # open_clip's byte map
    bpe.add_special_tokens([tok.decoder[i] for i in tok.all_special_ids])
    bpe.save(str(folder / "tokenizer.json"))

    cut = cuttable(clip.model)
    tower = _traceable_text_tower(clip.model, cut)
    example = tok(["a red car", "a dog"])
    if cut:  # traced at a length short of the context length, so nothing takes that for a constant
        example = example[:, :needed_length(example)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit tracing's deprecation notices, for this call only
        converted = ov.convert_model(tower, example_input=example,
                                     input=[ov.PartialShape([-1, -1 if cut else tok.context_length])])
    ov.save_model(converted, folder / "text.xml")  # float16 weights on disk (half the size), float32 arithmetic
    meta = {"model": clip.spec.name, "weights_id": clip.spec.weights_id, "dim": clip.dim, "pattern": tok.pat.pattern,
            "sot": tok.sot_token_id, "eot": tok.eot_token_id, "context_length": tok.context_length,
            "cut": cut, "format": EXPORT_FORMAT, "nanodb": nanodb.__version__}
    (folder / "meta.json").write_text(json.dumps(meta))


def _check_export(clip: ClipModel, folder: Path) -> None:
    """The export's token ids equal open_clip's and its vectors are within MIN_COSINE of the torch model's
    float32 ones, on the probe texts (raises ValueError saying what differs); then the shapes it runs in
    are checked, and kept in its meta.json."""
    import torch

    exported = ExportedTextTower(folder, keep_compiled=False)  # the folder is renamed after: kept for nothing
    texts = list(PROBES)
    ours, theirs = exported.tokenizer(texts), clip.tokenizer(texts).numpy()
    for text, a, b in zip(texts, ours, theirs):
        if not np.array_equal(a, b):
            raise ValueError(f"its tokenizer reads {text[:40]!r} otherwise than open_clip's")
    with torch.no_grad():  # open_clip's own encode_text, at the full context length
        reference = torch.nn.functional.normalize(clip.model.encode_text(torch.from_numpy(theirs)), dim=-1).numpy()
    # the shapes it will run in, checked once here (model/text_shapes.py) and kept beside it; then the
    # probes (texts of every token-length bucket) together and each alone, in those shapes
    lengths = bucket_lengths(exported.cut, exported.tokenizer.context_length)
    exported.shapes = check_shapes(exported.features, lengths, exported.tokenizer.sot, exported.tokenizer.eot)
    for vectors in (exported.encode_text(texts), np.concatenate([exported.encode_text([t]) for t in texts])):
        cosine = (vectors * reference).sum(axis=1)
        if cosine.min() < MIN_COSINE:
            raise ValueError(f"its vectors differ from open_clip's (cosine {cosine.min():.5f})")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "shapes": exported.shapes.to_meta()}))


def _traceable_text_tower(model, cut: bool):
    """open_clip's encode_text as a module to trace: token ids -> text features (not unit length); `cut`:
    of token ids of any length up to the context length (model/text_length.py), else of the full length."""
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self, clip_model):
            super().__init__()
            self.clip_model = clip_model

        def forward(self, tokens):
            return encode_text_cut(self.clip_model, tokens) if cut else self.clip_model.encode_text(tokens)

    return TextTower(model)
