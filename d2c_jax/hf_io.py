"""Hugging Face safetensors checkpoint → base params pytree (layers stacked on axis 0).

One declarative table maps each of our param paths to the HF tensor name and says whether it is
transposed (HF Linear weights are [out, in]; our kernels are [in, out]). Tensors are read key by
key (single file or sharded with model.safetensors.index.json), checked (shape, NaN/Inf), cast to
the requested dtype and optionally placed with a jax.sharding.Sharding.
Shape legend: L layers, V vocab, D model dim, F mlp dim, H heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from d2c_jax.errors import UserError
from d2c_jax.models.config import ModelConfig, load_config, module_shapes
from d2c_jax.sharding import put_global
from d2c_jax.types import DTYPES, Params

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One param: our path, HF name ('{l}' = layer index), transpose flag, when it exists."""

    path: tuple[str, ...]
    hf: str
    transpose: bool
    when: str = "always"  # always | qkv_bias | layernorm | untied


_LAYER = "model.layers.{l}."
# The name/transpose table. It is shared by the three architectures (they use the same HF
# module names); what differs is which optional entries exist, selected by `when`.
TABLE: tuple[Entry, ...] = (
    Entry(("embed",), "model.embed_tokens.weight", False),
    Entry(("final_norm", "scale"), "model.norm.weight", False),
    Entry(("final_norm", "bias"), "model.norm.bias", False, "layernorm"),
    Entry(("lm_head",), "lm_head.weight", True, "untied"),
    Entry(("layers", "input_norm", "scale"), _LAYER + "input_layernorm.weight", False),
    Entry(("layers", "input_norm", "bias"), _LAYER + "input_layernorm.bias", False, "layernorm"),
    Entry(("layers", "q_proj", "kernel"), _LAYER + "self_attn.q_proj.weight", True),
    Entry(("layers", "q_proj", "bias"), _LAYER + "self_attn.q_proj.bias", False, "qkv_bias"),
    Entry(("layers", "k_proj", "kernel"), _LAYER + "self_attn.k_proj.weight", True),
    Entry(("layers", "k_proj", "bias"), _LAYER + "self_attn.k_proj.bias", False, "qkv_bias"),
    Entry(("layers", "v_proj", "kernel"), _LAYER + "self_attn.v_proj.weight", True),
    Entry(("layers", "v_proj", "bias"), _LAYER + "self_attn.v_proj.bias", False, "qkv_bias"),
    Entry(("layers", "o_proj", "kernel"), _LAYER + "self_attn.o_proj.weight", True),
    Entry(("layers", "post_attn_norm", "scale"), _LAYER + "post_attention_layernorm.weight", False),
    Entry(("layers", "post_attn_norm", "bias"), _LAYER + "post_attention_layernorm.bias", False, "layernorm"),
    Entry(("layers", "gate_proj", "kernel"), _LAYER + "mlp.gate_proj.weight", True),
    Entry(("layers", "up_proj", "kernel"), _LAYER + "mlp.up_proj.weight", True),
    Entry(("layers", "down_proj", "kernel"), _LAYER + "mlp.down_proj.weight", True),
)
# Tensors some checkpoints carry that we do not need.
_IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def entries(cfg: ModelConfig) -> list[Entry]:
    """The table entries that exist for this config."""
    present = {
        "always": True,
        "qkv_bias": cfg.qkv_bias,
        "layernorm": cfg.norm == "layer",
        "untied": not cfg.tie_embeddings,
    }
    return [e for e in TABLE if present[e.when]]


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our shape of every param (stacked layer params include the leading L)."""
    d, v, n = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    linear = module_shapes(cfg)  # (d_in, d_out) of the 7 projections
    out = {}
    for e in entries(cfg):
        if e.path[0] == "layers":
            mod, leaf = e.path[1], e.path[2]
            if mod in linear:  # kernel [d_in, d_out]; bias (q/k/v only) [d_out]
                shape = linear[mod][1:] if leaf == "bias" else linear[mod]
            else:  # input_norm / post_attn_norm scale and bias
                shape = (d,)
            out[e.path] = (n, *shape)
        elif e.path[0] == "embed":
            out[e.path] = (v, d)
        elif e.path[0] == "lm_head":
            out[e.path] = (d, v)
        else:
            out[e.path] = (d,)
    return out


# ---------------------------------------------------------------------------------------------
# Reading safetensors key by key.


class SafetensorsReader:
    """The one safetensors reader (base checkpoints and PEFT adapters): opens each file once,
    reads tensors key by key in their stored dtype; numpy-native dtypes via safe_open, BF16 via
    memmap (numpy has no bfloat16, so safe_open(framework='numpy') refuses it). Every failure is
    a UserError naming the file."""

    FLOAT_DTYPES = ("F32", "F16", "F64", "BF16")

    def __init__(self):
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[int, dict]] = {}

    def keys(self, path: str) -> list[str]:
        return list(self._open(path).keys())

    def shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """{key: shape} from the header alone."""
        handle = self._open(path)
        return {k: tuple(int(d) for d in handle.get_slice(k).get_shape()) for k in handle.keys()}

    def _open(self, path: str):
        from safetensors import safe_open

        if path not in self._handles:
            if not os.path.isfile(path):
                raise UserError(path, "cannot read safetensors file: not found")
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:  # corrupt header, truncated file
                raise UserError(path, f"not a valid safetensors file ({e})") from None
        return self._handles[path]

    def _header(self, path: str) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]

    def read(self, path: str, key: str) -> np.ndarray:
        handle = self._open(path)
        sl = handle.get_slice(key)
        dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
        try:
            if dtype == "BF16":
                start, header = self._header(path)
                begin, end = header[key]["data_offsets"]
                raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
                return np.asarray(raw).view(ml_dtypes.bfloat16).reshape(shape)
            return handle.get_tensor(key)
        except UserError:
            raise
        except Exception as e:
            raise UserError(path, f"cannot read tensor {key!r} ({dtype}): {e}") from None

    def read_float32(self, path: str) -> dict[str, np.ndarray]:
        """Every tensor of a file (floating point only) as float32."""
        handle = self._open(path)
        out = {}
        for key in handle.keys():
            dtype = handle.get_slice(key).get_dtype()
            if dtype not in self.FLOAT_DTYPES:
                raise UserError(path, f"tensor {key} has unsupported dtype {dtype} (need F32, F16, BF16 or F64)")
            out[key] = self.read(path, key).astype(np.float32)
        return out


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a safetensors file from its header alone: the tensor data are
    never read (nor need to be present), so a 70B checkpoint's shapes take milliseconds."""
    if not os.path.isfile(path):
        raise UserError(path, "cannot read safetensors file: not found")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        return {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"]))
                for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
        raise UserError(path, f"not a valid safetensors header ({e})") from None


def _weight_files(model_dir: str, reader: SafetensorsReader | None) -> dict[str, str]:
    """Maps each tensor name to the safetensors file holding it (reader None: from the files'
    headers alone)."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(index, f"cannot parse the safetensors index: {e}") from None
        out = {}
        for key, fname in weight_map.items():
            path = os.path.join(model_dir, fname)
            if not os.path.isfile(path):
                raise UserError(index, f"lists {fname} for {key!r} but that file does not exist")
            out[key] = path
        return out
    single = os.path.join(model_dir, SINGLE_FILE)
    files = [single] if os.path.isfile(single) else sorted(
        p for p in glob.glob(os.path.join(model_dir, "*.safetensors"))
        if not os.path.basename(p).startswith("adapter_")
    )
    if not files:
        raise UserError(model_dir, "no model weights: expected model.safetensors or "
                        f"{INDEX_FILE} (pytorch .bin checkpoints are not supported)")
    out = {}
    for path in files:
        for key in (reader.keys(path) if reader is not None else read_header(path)):
            out[key] = path
    return out


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(None, f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = jnp.dtype(dtype)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        raise UserError(None, f"unsupported dtype {dt}; use one of {', '.join(DTYPES)}")
    return dt


def param_shape_tree(cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The params pytree as ShapeDtypeStructs (for sharding rules and memory; no weights read)."""
    return _nested({path: jax.ShapeDtypeStruct(shape, dtype) for path, shape in param_shapes(cfg).items()})


def _nested(flat: Mapping[tuple[str, ...], Any]) -> Params:
    """{("layers", "q_proj", "kernel"): x, ...} -> {"layers": {"q_proj": {"kernel": x}}, ...}."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _sharding_of(shardings: Any) -> Callable[[tuple[str, ...]], Any]:
    """path -> Sharding or None, from a nested dict of shardings, a callable or None."""
    if shardings is None:
        return lambda path: None
    if callable(shardings) and not isinstance(shardings, Mapping):
        return lambda path: shardings("/".join(path))
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: not isinstance(x, Mapping))}
    return lambda path: flat.get(path)


def _check_finite(arr: np.ndarray, path: str, key: str) -> None:
    if not np.isfinite(arr.astype(np.float32, copy=False)).all():
        raise UserError(path, f"tensor {key!r} contains NaN or Inf values")


def load_params(
    model_dir: str | os.PathLike,
    cfg: ModelConfig,
    dtype: Any = "float32",
    shardings: Any = None,
) -> Params:
    """Loads the base params (see docs/architecture.md) in `dtype` (float32 | bfloat16).

    `shardings` (optional): a nested dict shaped like the params with jax.sharding.Sharding
    leaves (missing entries → default placement), or a callable taking the param name
    ("embed", "lm_head", "final_norm/scale", "layers/q_proj/kernel", ...) and returning a
    Sharding or None. Every tensor is checked; any problem is a UserError naming the file.
    """
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise UserError(model_dir, "model directory does not exist")
    np_dtype = _np_dtype(dtype)
    reader = SafetensorsReader()
    files = _checked_files(model_dir, cfg, reader)
    wanted = entries(cfg)
    shapes = param_shapes(cfg)

    sharding_of = _sharding_of(shardings)
    flat: dict[tuple[str, ...], Any] = {}
    for e in wanted:
        shape = shapes[e.path]
        layered = "{l}" in e.hf
        out = np.empty(shape, np_dtype)
        for i in range(cfg.num_layers if layered else 1):
            key = e.hf.format(l=i)
            path = files[key]
            arr = reader.read(path, key)
            _check_shape(e, key, path, tuple(arr.shape), shape)
            _check_finite(arr, path, key)
            arr = arr.T if e.transpose else arr
            if layered:
                out[i] = arr.astype(np_dtype)
            else:
                out[...] = arr.astype(np_dtype)
        sharding = sharding_of(e.path)
        # put_global, not device_put: a sharding may span other hosts' devices (multi-host).
        flat[e.path] = put_global(out, sharding) if sharding is not None else jnp.asarray(out)
    return _nested(flat)


def check_params_headers(model_dir: str | os.PathLike, cfg: ModelConfig) -> None:
    """load_params' checks of names and shapes, from the safetensors headers alone (no tensor
    data read: a dry run on a directory whose weights are absent or still downloading)."""
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise UserError(model_dir, "model directory does not exist")
    files = _checked_files(model_dir, cfg, None)
    headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    shapes = param_shapes(cfg)
    for e in entries(cfg):
        layered = "{l}" in e.hf
        for i in range(cfg.num_layers if layered else 1):
            key = e.hf.format(l=i)
            path = files[key]
            if path not in headers:
                headers[path] = read_header(path)
            _check_shape(e, key, path, headers[path][key][1], shapes[e.path])


def _check_shape(e: Entry, key: str, path: str, hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    want = shape[1:] if "{l}" in e.hf else shape
    hf_want = tuple(reversed(want)) if e.transpose else want
    if tuple(hf_shape) != hf_want:
        raise UserError(path, f"tensor {key!r} has shape {list(hf_shape)}, expected {list(hf_want)} from config.json")


def _checked_files(model_dir: str, cfg: ModelConfig, reader: SafetensorsReader | None) -> dict[str, str]:
    """{tensor name: file} after checking that every tensor the config needs is there and
    nothing unexpected is (reader None: names from the headers alone)."""
    files = _weight_files(model_dir, reader)
    wanted = entries(cfg)
    expected: set[str] = set()
    for e in wanted:
        names = [e.hf.format(l=i) for i in range(cfg.num_layers)] if "{l}" in e.hf else [e.hf]
        expected.update(names)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(expected - set(files), key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(model_dir, f"checkpoint is missing tensor {missing[0]!r}{more} "
                        f"for architecture {cfg.arch}")
    unexpected = sorted(
        (k for k in files if k not in expected and k not in optional
         and not any(p.fullmatch(k) for p in _IGNORED)), key=_natural)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(files[unexpected[0]], f"unexpected tensor {unexpected[0]!r}{more} "
                        f"for architecture {cfg.arch} (config.json and weights disagree?)")
    return files


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def load_model(model_dir: str | os.PathLike, dtype: Any = "float32", shardings: Any = None):
    """Convenience: (cfg, params) for a HF model directory."""
    cfg = load_config(model_dir)
    return cfg, load_params(model_dir, cfg, dtype, shardings)


# Files a transformers tokenizer is read from (any one of the vocabularies is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(model_dir: str | os.PathLike):
    """The model's transformers tokenizer (what AutoTokenizer loads), from local files only (never
    the network)."""
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise UserError(model_dir, "model directory does not exist")
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in _VOCAB_FILES):
        raise UserError(model_dir, f"no tokenizer files (expected {' or '.join(_VOCAB_FILES)}); "
                        "copy the base model's tokenizer into this directory")
    from d2c_jax import tokenizer_cache

    try:
        return tokenizer_cache.load(model_dir)  # AutoTokenizer's tokenizer, its class pick remembered
    except Exception as e:  # transformers raises OSError/ValueError/... for missing files
        text = " ".join(str(e).split())
        raise UserError(model_dir, f"cannot load the tokenizer: {type(e).__name__}: {text[:300]}") from None
