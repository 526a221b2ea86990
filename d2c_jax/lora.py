"""PEFT LoRA adapters: load (validated), stack N of them, save merged ones in PEFT format.

Shape legend: N adapters, L layers, R (common, max) rank, r one adapter's rank, d_in / d_out the
input / output width of the adapted linear module (`module_shapes`).

Layout (PEFT's, per layer): lora_A [r, d_in], lora_B [d_out, r], delta_W = scaling * B @ A with
scaling = alpha / r (alpha / sqrt(r) with use_rslora). Stacking zero-pads every adapter to the
common rank R and to the union of adapted modules and layers; the padding adds nothing to
B @ A, so it is exact. The decoder's `lora` pytree folds the scaling into b:
`lora = {module: {"a": [L, R, d_in], "b": [L, d_out, R]}}`, delta_W = b @ a.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from d2c_jax.atomic_io import write_dir_atomic
from d2c_jax.errors import UserError
from d2c_jax.hf_io import SafetensorsReader
from d2c_jax.models.config import LORA_MODULES, ModelConfig, module_shapes, read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# What PEFT assumes for a key adapter_config.json omits (or sets to null): peft.LoraConfig's
# defaults, and for target_modules PEFT's default for the architecture
# (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: q_proj, v_proj for llama, qwen2, stablelm).
PEFT_DEFAULTS: Mapping[str, Any] = {"r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none",
                                    "target_modules": ["q_proj", "v_proj"]}
PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$"
)
_ANY_LORA_RE = re.compile(r"^base_model\.model\.(.+)\.lora_(?:A|B|embedding_A|embedding_B)(?:\.weight)?$")


def peft_key(layer: int, module: str, factor: str) -> str:
    """PEFT's saved tensor name, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}.lora_{factor}.weight"


@dataclasses.dataclass(frozen=True)
class BaseDims:
    """What adapters need to know about the base model: layer count and (d_in, d_out) per module."""

    num_layers: int
    shapes: Mapping[str, tuple[int, int]]


def base_dims(cfg: ModelConfig | BaseDims) -> BaseDims:
    """BaseDims of a ModelConfig (or the BaseDims itself)."""
    if isinstance(cfg, BaseDims):
        return cfg
    return BaseDims(num_layers=cfg.num_layers, shapes=module_shapes(cfg))


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One PEFT LoRA adapter, zero-filled on the layers it does not adapt.

    a: {module: [L, r, d_in]}, b: {module: [L, d_out, r]} (raw PEFT factors, float32).
    """

    name: str
    path: str
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    rank: int
    scaling: float
    base_model_path: str | None
    base_model_class: str | None = None  # PEFT's auto_mapping.base_model_class, e.g. "LlamaForCausalLM"


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """N adapters stacked on a leading axis (see docs/architecture.md)."""

    names: tuple[str, ...]
    a: dict[str, np.ndarray]  # {module: [N, L, R, d_in]} raw lora_A, zero-padded
    b: dict[str, np.ndarray]  # {module: [N, L, d_out, R]} raw lora_B, zero-padded
    scaling: np.ndarray  # [N] float64: alpha / r or alpha / sqrt(r)
    ranks: np.ndarray  # [N] int: the true rank of each adapter
    paths: tuple[str, ...]
    base_model_paths: tuple[str | None, ...] = ()

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    @property
    def rank(self) -> int:
        """The common (max) rank R."""
        return int(next(iter(self.a.values())).shape[2])

    @property
    def num_layers(self) -> int:
        return int(next(iter(self.a.values())).shape[1])


# ----------------------------------------------------------------------------- adapter_config.json


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    """Parses and validates adapter_config.json; rejects what cannot be represented as plain LoRA."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise UserError(path, f"missing {CONFIG_NAME} (expected a PEFT LoRA adapter directory)")
    cfg = read_json_object(path, CONFIG_NAME)
    if cfg.get("peft_type") != "LORA":
        raise UserError(path, f"peft_type={cfg.get('peft_type')!r} is not supported (only LORA)")
    cfg.update({key: value for key, value in PEFT_DEFAULTS.items() if cfg.get(key) is None})
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(path, f"r={r!r} must be a positive integer")
    alpha = cfg["lora_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise UserError(path, f"lora_alpha={alpha!r} must be a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UserError(
                path, f"{key}={cfg[key]!r} is not supported (per-module ranks/alphas); only a single r and lora_alpha"
            )
    unsupported = {
        "use_dora": "DoRA adapters",
        "fan_in_fan_out": "transposed (Conv1D) weights",
        "lora_bias": "LoRA bias terms",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "target_parameters": "nn.Parameter targets",
        "layer_replication": "layer replication",
        "trainable_token_indices": "trainable tokens",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise UserError(path, f"{key}={cfg[key]!r} is not supported ({what} cannot be merged as LoRA)")
    bias = cfg["bias"]
    if bias != "none":
        raise UserError(path, f"bias={bias!r} is not supported (trained bias terms cannot be merged as LoRA); "
                        "only bias=\"none\"")
    tm = cfg.get("target_modules")
    if not tm or not isinstance(tm, (str, list)):
        raise UserError(path, f"target_modules={tm!r} must be a non-empty list of module names or a regex string")
    if isinstance(tm, list):
        for t in tm:
            if t == "all-linear":
                continue
            if not isinstance(t, str) or not any(t == m or t.endswith("." + m) for m in LORA_MODULES):
                raise UserError(
                    path, f"unsupported target module {t!r}; supported: {', '.join(LORA_MODULES)}"
                )
    ltt = cfg.get("layers_to_transform")
    if ltt is not None and not (
        isinstance(ltt, int) or (isinstance(ltt, list) and all(isinstance(x, int) for x in ltt))
    ):
        raise UserError(path, f"layers_to_transform={ltt!r} must be an int or a list of ints")
    return cfg


def _is_targeted(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT's check_target_module_exists for one module name such as model.layers.0.self_attn.q_proj."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        if tm == "all-linear":
            return True
        return re.fullmatch(tm, key) is not None
    if key in tm or "all-linear" in tm:
        return True
    found = any(key.endswith("." + t) for t in tm)
    ltt = cfg.get("layers_to_transform")
    if found and ltt is not None and (ltt != [] if isinstance(ltt, list) else True):
        pattern = cfg.get("layers_pattern")
        match = None
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == ltt if isinstance(ltt, int) else idx in ltt
    return found


def _targeted_set(cfg: Mapping[str, Any], num_layers: int, cfg_path: str) -> set[tuple[int, str]]:
    try:
        return {
            (layer, m)
            for layer in range(num_layers)
            for m in LORA_MODULES
            if _is_targeted(cfg, f"model.layers.{layer}.{PARENT[m]}.{m}")
        }
    except re.error as e:
        raise UserError(cfg_path, f"target_modules / exclude_modules is not a valid regex: {e}") from None


# ----------------------------------------------------------------------------- loading


def _weights_path(adapter_dir: str) -> str:
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            raise UserError(
                path,
                "missing; found only adapter_model.bin (pickle), which is not supported: re-save the "
                "adapter with save_pretrained(..., safe_serialization=True)",
            )
        raise UserError(path, f"missing {WEIGHTS_NAME}")
    return path


def _parse_keys(keys, path: str, num_layers: int | None) -> dict[tuple[int, str, str], str]:
    """{(layer, module, 'A'|'B'): key} from PEFT tensor names; errors name the bad tensor."""
    parsed = {}
    for key in keys:
        m = _KEY_RE.match(key)
        if m is None:
            other = _ANY_LORA_RE.match(key)
            if other is not None and other.group(1).split(".")[-1] in LORA_MODULES:
                raise UserError(
                    path,
                    f"tensor {key} is not named like a PEFT adapter of a causal LM "
                    "(expected base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_A.weight)",
                )
            if other is not None:
                raise UserError(
                    path,
                    f"tensor {key}: unsupported target module {other.group(1)!r}; supported: "
                    f"{', '.join(LORA_MODULES)} inside model.layers.<i>",
                )
            raise UserError(
                path,
                f"unexpected tensor {key} (only lora_A/lora_B weights are supported: no trained "
                "biases, DoRA magnitudes or modules_to_save)",
            )
        layer, parent, module, factor = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if parent != PARENT[module]:
            raise UserError(path, f"tensor {key}: {module} is not under {parent}")
        if num_layers is not None and layer >= num_layers:
            raise UserError(
                path, f"tensor {key}: layer index {layer} out of range (the base model has {num_layers} layers)"
            )
        parsed[(layer, module, factor)] = key
    return parsed


def load_adapter(adapter_dir: str | os.PathLike, cfg: ModelConfig | BaseDims, name: str | None = None) -> Adapter:
    """Loads and validates one PEFT LoRA adapter against the base model's dims."""
    adapter_dir = str(adapter_dir)
    dims = base_dims(cfg)
    L = dims.num_layers
    config = read_adapter_config(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    base_class = base_model_class(config)
    if isinstance(cfg, ModelConfig) and base_class is not None and not base_class.lower().startswith(cfg.arch):
        raise UserError(cfg_path, f"auto_mapping.base_model_class={base_class!r}: this adapter was trained for "
                        f"another architecture than the base model's ({cfg.arch}); it cannot be applied to it")
    path = _weights_path(adapter_dir)
    tensors = SafetensorsReader().read_float32(path)
    if not tensors:
        raise UserError(path, "contains no tensors")
    parsed = _parse_keys(tensors, path, L)
    r = int(config["r"])
    alpha = float(config["lora_alpha"])
    rslora = bool(config["use_rslora"])
    targeted = _targeted_set(config, L, cfg_path)
    present = {(layer, m) for layer, m, _ in parsed}
    stray = sorted(present - targeted)
    if stray:
        layer, m = stray[0]
        raise UserError(
            path,
            f"tensor {peft_key(layer, m, 'A')} is not targeted by {cfg_path} "
            "(target_modules / layers_to_transform / exclude_modules disagree with the weights)",
        )
    for layer, m in sorted(targeted):
        for f in "AB":
            if (layer, m, f) not in parsed:
                raise UserError(
                    path, f"missing tensor {peft_key(layer, m, f)} (targeted by {CONFIG_NAME})"
                )
    modules = [m for m in LORA_MODULES if any(pm == m for _, pm in present)]
    # Every shape checked before anything is allocated: r comes from a file (r=10**9 must not
    # try to allocate [L, r, d_in]), and only tensors of the file's own size can match it.
    for (layer, m, f), key in sorted(parsed.items()):
        d_in, d_out = dims.shapes[m]
        want = (r, d_in) if f == "A" else (d_out, r)
        t = tensors[key]
        if t.shape != want:
            raise UserError(
                path,
                f"tensor {key} has shape {tuple(t.shape)} but the base model and r={r} need {want} "
                f"({m}: d_in={d_in}, d_out={d_out}); was this adapter trained for another base model?",
            )
        if not np.all(np.isfinite(t)):
            raise UserError(path, f"tensor {key} contains NaN or Inf")
    a = {m: np.zeros((L, r, dims.shapes[m][0]), np.float32) for m in modules}
    b = {m: np.zeros((L, dims.shapes[m][1], r), np.float32) for m in modules}
    for (layer, m, f), key in sorted(parsed.items()):
        (a if f == "A" else b)[m][layer] = tensors[key]
    if not any(np.any(b[m]) for m in modules) or not any(np.any(a[m]) for m in modules):
        raise UserError(path, "every lora_A or every lora_B weight is zero: the adapter changes nothing "
                        "(an untrained adapter?)")
    return Adapter(
        name=name if name is not None else os.path.basename(os.path.normpath(adapter_dir)),
        path=adapter_dir,
        a=a,
        b=b,
        rank=r,
        scaling=alpha / math.sqrt(r) if rslora else alpha / r,
        base_model_path=config.get("base_model_name_or_path"),
        base_model_class=base_class,
    )


def _base_name(path: str) -> str:
    """The model name a base_model_name_or_path ends with (a hub id and a local copy agree)."""
    return os.path.basename(os.path.normpath(path)).lower()


def base_model_class(config: Mapping[str, Any]) -> str | None:
    """PEFT's `auto_mapping.base_model_class` of an adapter_config.json (None when absent)."""
    mapping = config.get("auto_mapping")
    cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return cls if isinstance(cls, str) and cls else None


def check_same_base(adapters: Sequence[Adapter]) -> None:
    """Adapters whose adapter_config.json names different base models (by their last path
    component, so "org/Model" and "/models/Model" agree) are refused, naming two that differ;
    same-shaped bases of other architectures would otherwise merge without a word."""
    classed = [ad for ad in adapters if ad.base_model_class]
    other = next((ad for ad in classed if ad.base_model_class != classed[0].base_model_class), None)
    if other is not None:
        raise UserError(os.path.join(other.path, CONFIG_NAME),
                        f"auto_mapping.base_model_class={other.base_model_class!r} differs from "
                        f"{classed[0].base_model_class!r} of {os.path.join(classed[0].path, CONFIG_NAME)}; "
                        "adapters of different architectures cannot be merged")
    named = [ad for ad in adapters if ad.base_model_path]
    names = {_base_name(ad.base_model_path) for ad in named}
    if len(names) > 1:
        first = named[0]
        other = next(ad for ad in named if _base_name(ad.base_model_path) != _base_name(first.base_model_path))
        raise UserError(os.path.join(other.path, CONFIG_NAME),
                        f"base_model_name_or_path={other.base_model_path!r} differs from "
                        f"{first.base_model_path!r} of {os.path.join(first.path, CONFIG_NAME)}; "
                        "adapters of different base models cannot be merged")


def stack_adapters(adapters: Sequence[Adapter]) -> AdapterSet:
    """Stacks adapters on a leading N axis, zero-padding to the max rank and the union of modules."""
    if not adapters:
        raise ValueError("no adapters to stack")
    check_same_base(adapters)
    R = max(ad.rank for ad in adapters)
    modules = [m for m in LORA_MODULES if any(m in ad.a for ad in adapters)]
    a, b = {}, {}
    for m in modules:
        L, _, d_in = next(ad.a[m].shape for ad in adapters if m in ad.a)
        d_out = next(ad.b[m].shape[1] for ad in adapters if m in ad.b)
        a_nlrd = np.zeros((len(adapters), L, R, d_in), np.float32)
        b_nldr = np.zeros((len(adapters), L, d_out, R), np.float32)
        for i, ad in enumerate(adapters):
            if m in ad.a:
                a_nlrd[i, :, : ad.rank] = ad.a[m]
                b_nldr[i, :, :, : ad.rank] = ad.b[m]
        a[m], b[m] = a_nlrd, b_nldr
    return AdapterSet(
        names=tuple(ad.name for ad in adapters),
        a=a,
        b=b,
        scaling=np.array([ad.scaling for ad in adapters], np.float64),
        ranks=np.array([ad.rank for ad in adapters], np.int32),
        paths=tuple(ad.path for ad in adapters),
        base_model_paths=tuple(ad.base_model_path for ad in adapters),
    )


def adapter_subdirs(adapters_dir: str | os.PathLike) -> list[str]:
    """Sorted task names: the non-hidden sub-directories of adapters_dir."""
    adapters_dir = str(adapters_dir)
    if not os.path.isdir(adapters_dir):
        raise UserError(adapters_dir, "adapters directory does not exist")
    names = sorted(
        n for n in os.listdir(adapters_dir) if not n.startswith(".") and os.path.isdir(os.path.join(adapters_dir, n))
    )
    if not names:
        raise UserError(adapters_dir, "no adapter sub-directories (expected one PEFT adapter per task)")
    return names


def load_adapter_set(adapters_dir: str | os.PathLike, cfg: ModelConfig | BaseDims) -> AdapterSet:
    """Loads every sub-directory of adapters_dir (sorted by name = task name) and stacks them."""
    names = adapter_subdirs(adapters_dir)
    return stack_adapters([load_adapter(os.path.join(str(adapters_dir), n), cfg, name=n) for n in names])


def load_adapter_dirs(dirs: Sequence[str | os.PathLike], cfg: ModelConfig | BaseDims) -> AdapterSet:
    """Loads the given adapter directories in the given order (names = directory base names)."""
    if not dirs:
        raise UserError(None, "no adapters given")
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(d, "adapter directory does not exist")
    return stack_adapters([load_adapter(d, cfg) for d in dirs])


def infer_dims(adapter_dirs: Sequence[str | os.PathLike]) -> BaseDims:
    """Base-model dims read off the adapters' tensor shapes (no base model needed).

    num_layers is 1 + the highest adapted layer index; modules no adapter touches are absent.
    """
    shapes: dict[str, tuple[int, int]] = {}
    where: dict[str, str] = {}
    num_layers = 0
    for d in adapter_dirs:
        d = str(d)
        if not os.path.isdir(d):
            raise UserError(d, "adapter directory does not exist")
        config = read_adapter_config(d)
        r = int(config["r"])
        path = _weights_path(d)
        header = SafetensorsReader().shapes(path)
        if not header:
            raise UserError(path, "contains no tensors")
        for (layer, m, f), key in _parse_keys(header, path, None).items():
            num_layers = max(num_layers, layer + 1)
            shape = header[key]
            want_rank_axis = 0 if f == "A" else 1
            if len(shape) != 2 or shape[want_rank_axis] != r:
                raise UserError(path, f"tensor {key} has shape {shape}, expected rank r={r} on axis {want_rank_axis}")
            d_in, d_out = shapes.get(m, (None, None))
            new = (shape[1], d_out) if f == "A" else (d_in, shape[0])
            old = shapes.get(m)
            if old is not None and any(o is not None and n != o for o, n in zip(old, new)):
                raise UserError(
                    path,
                    f"tensor {key} has shape {shape}, which does not fit {m} (d_in, d_out)={old} "
                    f"seen in {where[m]}; are these adapters for the same base model?",
                )
            shapes[m] = new
            where.setdefault(m, f"{path}:{key}")
    return BaseDims(num_layers=num_layers, shapes={m: s for m, s in shapes.items() if None not in s})


# ----------------------------------------------------------------------------- lora pytrees


def effective_lora(adapter_set: AdapterSet, i: int) -> dict[str, dict[str, np.ndarray]]:
    """Adapter i as the decoder's lora pytree: a = lora_A, b = scaling * lora_B (padded to R)."""
    s = np.float32(adapter_set.scaling[i])
    return {m: {"a": adapter_set.a[m][i], "b": adapter_set.b[m][i] * s} for m in adapter_set.a}


def covered_layers(adapter_set: AdapterSet) -> list[int]:
    """Layers where some adapter has a non-zero factor (the layers a merge can change)."""
    hit = np.zeros(adapter_set.num_layers, bool)
    for m in adapter_set.a:
        hit |= np.any(adapter_set.a[m] != 0, axis=(0, 2, 3)) | np.any(adapter_set.b[m] != 0, axis=(0, 2, 3))
    return [int(x) for x in np.flatnonzero(hit)]


def lora_delta(lora: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """{module: [L, d_out, d_in]} = b @ a in float64 (for checks and reports, not the hot path)."""
    return {
        m: np.einsum("lor,lri->loi", np.asarray(v["b"], np.float64), np.asarray(v["a"], np.float64))
        for m, v in lora.items()
    }


# ----------------------------------------------------------------------------- saving


def save_peft_adapter(
    out_dir: str | os.PathLike,
    lora_single: Mapping[str, Mapping[str, Any]],
    *,
    rank: int,
    alpha: float,
    base_model_path: str | None,
    layers_to_transform: Sequence[int] | None = None,
    use_rslora: bool = False,
    owner: str | None = None,
) -> str:
    """Writes lora {module: {"a": [L, R, d_in], "b": [L, d_out, R]}} as a PEFT LoRA adapter.

    The factors are stored as given (lora_A = a, lora_B = b), so pass alpha = rank when the
    scaling is already folded into b. Only the layers in layers_to_transform are written (all L
    when None). Loadable by PeftModel.from_pretrained. `owner`: the command whose output marker
    (atomic_io.MARKER) the directory carries. Returns out_dir.
    """
    out_dir = str(out_dir)
    modules = [m for m in LORA_MODULES if m in lora_single]
    unknown = sorted(set(lora_single) - set(modules))
    if unknown or not modules:
        raise ValueError(f"lora must hold some of {LORA_MODULES}; got {sorted(lora_single)}")
    tensors = {}
    for m in modules:
        a_lrd = np.asarray(lora_single[m]["a"], np.float32)
        b_ldr = np.asarray(lora_single[m]["b"], np.float32)
        if a_lrd.ndim != 3 or b_ldr.ndim != 3 or a_lrd.shape[1] != rank or b_ldr.shape[2] != rank:
            raise ValueError(f"{m}: a {a_lrd.shape} / b {b_ldr.shape} do not have rank {rank}")
        layers = range(a_lrd.shape[0]) if layers_to_transform is None else layers_to_transform
        for layer in layers:
            tensors[peft_key(layer, m, "A")] = np.ascontiguousarray(a_lrd[layer])
            tensors[peft_key(layer, m, "B")] = np.ascontiguousarray(b_ldr[layer])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": int(rank),
        "lora_alpha": alpha,
        "use_rslora": bool(use_rslora),
        "target_modules": modules,
        "layers_to_transform": None if layers_to_transform is None else [int(x) for x in layers_to_transform],
        "layers_pattern": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "use_dora": False,
    }

    def write(tmp: str) -> None:
        from safetensors.numpy import save_file

        from safetensors import SafetensorError

        try:
            save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk, for one: an OSError for write_dir_atomic
            raise OSError(f"{WEIGHTS_NAME}: {' '.join(str(e).split())}") from None
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    write_dir_atomic(out_dir, write, what="adapter", owner=owner)
    return out_dir
