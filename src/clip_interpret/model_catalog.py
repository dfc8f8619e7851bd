"""Which open_clip architectures can be opened up here, read from the installed files without importing
open_clip, timm or torch (importing them takes seconds): the table of `clip-interpret models`.

* the architectures: open_clip's model configs (``open_clip/model_configs/*.json``) and ours
  (``clip_interpret/models/configs``), listed as ``open_clip.list_models()`` lists them;
* a native image tower is judged by its config (``tower_pools.native_tower_problem``, as the loader does; its
  pooling, CoCa's attentional pooler included, by ``tower_pools.native_tower_pool``);
* a timm trunk by its model function in ``timm/models/vision_transformer.py`` (read as a syntax tree: the
  keyword arguments it gives ``VisionTransformer``), with the checks ``convert.check_timm_trunk`` makes on
  the built trunk; a function written otherwise, or an argument not known here, is *undecided*; an ``Eva``
  trunk (``timm/models/eva.py``: EVA01, EVA02, Perception Encoder) likewise, with ``convert.eva_missing``'s
  checks: refused by an argument that gives it a piece not expressed (rotary embeddings, SwiGLU, ...);
* a refused architecture's reason, in the loader's words: ``native_tower_problem`` for a native tower; for a
  timm trunk its pooling, projection or refused Eva arguments, or its family (``tower_pools.TIMM_FAMILIES``,
  found by the module whose file registers the model function);
* the pretrained tags: ``open_clip/pretrained.py`` run on its own, its optional imports that load torch or
  reach the Hub (safetensors.torch, huggingface_hub; used only to download) refused.

``compute_model_table()`` decides every architecture it can this way and asks open_clip itself (the old way,
seconds) only about the undecided ones, or about all when the files are not laid out as expected;
``model_table()`` caches its answer.
tests/cli/test_cli.py checks that the table is the one open_clip gives.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import types
from importlib.util import find_spec
from pathlib import Path

from .tower_pools import NATIVE_REFUSED  # noqa: F401 (tests compare it with the loader's)
from .tower_pools import OTHER_TIMM, TIMM_FAMILIES, native_tower_pool, native_tower_problem

# Copies of the loader's names, here without importing it (torch); tests/cli/test_cli.py checks them against
# models.openclip.CONFIG_DIR and models.PAPER_MODELS. A native tower's judgement is tower_pools' (the loader's too).
CONFIG_DIR = Path(__file__).parent / "models" / "configs"
UNDECIDED = "undecided"
PAPER_MODELS = (  # the paper's six models (arXiv 2409.06579)
    "open_clip:ViT-B-16/openai",
    "open_clip:ViT-B-32/openai",
    "open_clip:ViT-L-14/openai",
    "open_clip:ViT-B-16/laion2b_s34b_b88k",
    "open_clip:ViT-B-32/datacomp_m_s128m_b4k",
    "open_clip:ViT-L-14/laion2b_s32b_b82k",
)

# VisionTransformer keyword arguments of a timm model function, with the values check_timm_trunk accepts
# (None: any value); the others make the function undecided
_TIMM_ARGS = {"patch_size": None, "embed_dim": None, "depth": None, "num_heads": None, "mlp_ratio": None,
              "img_size": None, "qkv_bias": None, "init_values": None, "pre_norm": None, "global_pool": None,
              "class_token": (False,), "reg_tokens": (0,), "act_layer": ("gelu", "gelu_tanh")}


# Eva model function arguments (timm/models/eva.py) and the values convert.eva_missing accepts (None: any);
# _EVA_REFUSED: arguments whose value, when not the default given here, gives a piece not expressed
_EVA_ARGS = {"patch_size": None, "embed_dim": None, "depth": None, "num_heads": None, "mlp_ratio": None,
             "img_size": None, "qkv_bias": None, "qkv_fused": None, "init_values": None, "global_pool": None,
             "use_pre_transformer_norm": None, "attn_pool_num_heads": None, "attn_pool_mlp_ratio": None,
             # EVA02's pieces: rotary embeddings ('cat': the table is captured whatever its grid, offset or
             # temperature; another rope_type is refused), SwiGLU and its sub-LN, the LayerNorm over the heads,
             # post-norm blocks
             "use_rot_pos_emb": None, "ref_feat_shape": None, "rope_grid_offset": None, "rope_grid_indexing": None,
             "rope_temperature": None, "rope_rotate_half": None, "swiglu_mlp": None, "scale_mlp": None,
             "scale_attn_inner": None, "use_post_norm": None}
# Perception Encoder's arguments judged by their value: its attention (timm's AttentionRope, plain multi-head
# attention besides its rotary embedding) and its norm layer (a LayerNorm, whatever its eps)
_EVA_ATTN_TYPES = ("eva", "rope")
_EVA_LAYER_NORM = re.compile(r"partial\(LayerNorm, eps=[0-9.e-]+\)")
_EVA_REFUSED = {"rope_type": "cat", "qk_norm": False, "attn_type": "eva", "class_token": True, "num_reg_tokens": 0,
                "no_embed_class": False, "use_abs_pos_emb": True, "attn_only_layer_scale": False,
                "dynamic_img_size": False, "use_fc_norm": None, "gated_attn": False}
_NOT_LITERAL = object()


class _Source(str):
    """A model argument that is not a literal, kept as its source text (``partial(LayerNorm, eps=1e-05)``)."""


class EvaFunction:
    """A registered timm Eva model function: its ``model_args`` ({keyword: value, or _NOT_LITERAL}), or None
    when it is not written as ``model_args = dict(...)`` passed to ``_create_eva``."""

    def __init__(self, args: dict | None):
        self.args = args


class CatalogError(Exception):
    """The installed files are not laid out as this module expects: ask open_clip instead."""


def _package_dir(name: str) -> Path:
    spec = find_spec(name)  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise CatalogError(f"{name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def model_configs(open_clip_dir: Path) -> dict:
    """Every architecture's config, as open_clip lists them (its configs, then ours; natural order)."""
    configs = {}
    for folder in (open_clip_dir / "model_configs", CONFIG_DIR):
        for path in folder.glob("*.json"):
            config = json.loads(path.read_text())
            if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
                configs[path.stem] = config
    if not configs:
        raise CatalogError(f"no model configs in {open_clip_dir / 'model_configs'}")
    return dict(sorted(configs.items(), key=lambda item: _natural_key(item[0])))


def timm_vit_functions(timm_dir: Path) -> dict:
    """timm's registered VisionTransformer model functions: name -> their model arguments ({keyword: value}),
    or None when the function is not the plain ``model_args = dict(...)`` then ``_create_vision_transformer``."""
    tree = ast.parse((timm_dir / "models" / "vision_transformer.py").read_text())
    functions = {}
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef)
                and any(isinstance(d, ast.Name) and d.id == "register_model" for d in node.decorator_list)):
            continue
        functions[node.name] = _plain_model_args(node)
    if not functions:
        raise CatalogError("no registered model in timm/models/vision_transformer.py")
    return functions


def timm_eva_functions(timm_dir: Path) -> dict:
    """timm's registered Eva model functions (``timm/models/eva.py``): name -> EvaFunction; none if the file
    is absent."""
    path = timm_dir / "models" / "eva.py"
    if not path.is_file():
        return {}
    functions = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) \
                and any(isinstance(d, ast.Name) and d.id == "register_model" for d in node.decorator_list):
            functions[node.name] = EvaFunction(_eva_model_args(node))
    return functions


def _eva_model_args(node: ast.FunctionDef) -> dict | None:
    assigns = [s for s in node.body
               if isinstance(s, ast.Assign) and [ast.unparse(t) for t in s.targets] == ["model_args"]]
    if len(assigns) != 1 or not isinstance(assigns[0].value, ast.Call) or ast.unparse(assigns[0].value.func) != "dict" \
            or assigns[0].value.args:
        return None
    calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and ast.unparse(c.func) == "_create_eva"]
    if len(calls) != 1 or "**dict(model_args, **kwargs)" not in [ast.unparse(k) for k in calls[0].keywords]:
        return None
    args = {}
    for keyword in assigns[0].value.keywords:
        if keyword.arg is None:
            return None
        try:
            args[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:  # a computed ratio, a partial, kwargs.pop(...)
            args[keyword.arg] = _NOT_LITERAL if keyword.arg != "norm_layer" else _Source(ast.unparse(keyword.value))
    return args


def _eva_decision(function: EvaFunction, pool: str, proj) -> bool | str:
    """``openclip.eva_problem``'s judgement from an Eva model function's arguments."""
    if pool not in ("token", "map") or proj not in (None, "linear"):
        return False
    args = function.args
    if args is None or os.environ.get("TIMM_USE_NAFLEX", "0") == "1":
        return UNDECIDED
    decided = True
    for key, value in args.items():
        if (key, value) == ("class_token", False) and pool == "map":  # PE-Core-bigG: the MAP head needs none
            continue
        if key == "attn_type" and value in _EVA_ATTN_TYPES:
            continue
        if key == "norm_layer" and isinstance(value, _Source) and _EVA_LAYER_NORM.fullmatch(value):
            continue
        if key in _EVA_REFUSED:
            if value is _NOT_LITERAL:
                decided = UNDECIDED if decided is True else decided
            elif value != _EVA_REFUSED[key]:
                return False
        elif key not in _EVA_ARGS:
            decided = UNDECIDED if decided is True else decided
    return decided


def _plain_model_args(node: ast.FunctionDef) -> dict | None:
    body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != 3 or not isinstance(body[0], ast.Assign) or not isinstance(body[1], ast.Assign):
        return None
    first, second, last = body
    if [ast.unparse(t) for t in first.targets] != ["model_args"] or not isinstance(first.value, ast.Call) \
            or ast.unparse(first.value.func) != "dict" or first.value.args:
        return None
    made = second.value
    if [ast.unparse(t) for t in second.targets] != ["model"] or not isinstance(made, ast.Call) \
            or ast.unparse(made.func) != "_create_vision_transformer" \
            or [ast.unparse(a) for a in made.args] != [repr(node.name)] \
            or sorted(ast.unparse(k) for k in made.keywords) != ["**dict(model_args, **kwargs)",
                                                                 "pretrained=pretrained"] \
            or ast.unparse(last) != "return model":
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in first.value.keywords if k.arg}
    except ValueError:  # a value that is not a literal (a class, a partial)
        return None


def timm_tower_decision(vision: dict, functions: dict) -> bool | str:
    """Whether open_clip's timm tower of this ``vision_cfg`` is supported (True/False), as
    ``openclip.timm_problem`` decides it, or UNDECIDED."""
    name, pool = vision["timm_model_name"], vision.get("timm_pool", "avg")
    proj, proj_bias = vision.get("timm_proj", "linear"), bool(vision.get("timm_proj_bias", False))
    if name.startswith("clip_interpret_"):  # our own tiny trunks (tests), registered with timm at run time
        return UNDECIDED
    if isinstance(functions.get(name), EvaFunction):
        return _eva_decision(functions[name], pool, vision.get("timm_proj", "linear"))
    if name not in functions:
        return False  # not a timm VisionTransformer
    if pool != "map" or proj not in ("none", "linear") or (proj == "linear" and proj_bias):
        return False
    args = functions[name]
    if args is None or os.environ.get("TIMM_USE_NAFLEXVIT", "false").lower() == "true":
        return UNDECIDED
    for key, value in args.items():
        if key not in _TIMM_ARGS or (_TIMM_ARGS[key] is not None and value not in _TIMM_ARGS[key]):
            return UNDECIDED if key not in ("class_token", "reg_tokens") else False
    return args.get("class_token", True) is False  # a MAP trunk has no class token


def timm_families(timm_dir: Path) -> dict[str, str]:
    """timm model names of the families never opened up (``tower_pools.TIMM_FAMILIES``: ConvNeXt, FastViT, ...)
    -> the family's reason, from the registered model functions of those modules' files."""
    names = {}
    for module, reason in TIMM_FAMILIES.items():
        path = timm_dir / "models" / f"{module}.py"
        if path.is_file():
            for name in re.findall(r"@register_model\s*\ndef (\w+)\(", path.read_text()):
                names[name] = reason
    return names


def timm_refusal(vision: dict, functions: dict, families: dict) -> str:
    """Why open_clip's timm tower of this ``vision_cfg`` is refused (``timm_tower_decision`` said False), in
    words close to the loader's (``openclip.timm_problem``)."""
    name, pool = vision["timm_model_name"], vision.get("timm_pool", "avg")
    proj = vision.get("timm_proj", "linear")
    tower = f"the timm tower {name!r}"
    function = functions.get(name)
    if isinstance(function, EvaFunction):
        if pool not in ("token", "map"):
            return f"{tower}, an Eva trunk pooled by {pool!r} (only 'token', CLS pooling, or 'map')"
        if proj not in (None, "linear"):
            return f"{tower} with projection {proj!r} (Eva trunks: only null, the trunk's head, or 'linear')"
        pieces = [f"{key}={value!r}" for key, value in (function.args or {}).items()
                  if key in _EVA_REFUSED and value is not _NOT_LITERAL and value != _EVA_REFUSED[key]
                  and not ((key, value) == ("class_token", False) and pool == "map")
                  and not (key == "attn_type" and value in _EVA_ATTN_TYPES)]
        return f"{tower}, an Eva trunk with {', '.join(pieces) or 'a piece not decomposed'}"
    if name in functions:  # a timm VisionTransformer
        if pool != "map":
            return f"{tower} pooled by {pool or 'its default'!r} (only 'map', SigLIP's attention pooling)"
        if proj not in ("none", "linear") or (proj == "linear" and vision.get("timm_proj_bias")):
            return f"{tower} with projection {proj!r} (only 'none', or 'linear' without bias)"
        return f"{tower}, a VisionTransformer with a class token or register tokens under its MAP head"
    return f"{tower}, {families.get(name, OTHER_TIMM)}"


def pretrained_tags(open_clip_dir: Path) -> dict:
    """open_clip's pretrained tags per architecture (``pretrained._PRETRAINED``), from running pretrained.py
    alone with its imports of torch and the Hub refused (it guards them; they serve downloads only)."""
    siblings = {}

    def sibling(name: str):
        if name not in siblings:
            module = types.ModuleType(f"_open_clip_{name}")
            exec(compile((open_clip_dir / f"{name}.py").read_text(), str(open_clip_dir / f"{name}.py"), "exec"),
                 module.__dict__)
            siblings[name] = module
        return siblings[name]

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 1 and name in ("constants", "version"):
            return sibling(name)
        if level or name.split(".")[0] in ("torch", "safetensors", "huggingface_hub", "open_clip", "timm"):
            raise ImportError(f"{name} is not imported to list open_clip's tags")
        return builtins.__import__(name, globals, locals, fromlist, level)

    path = open_clip_dir / "pretrained.py"
    namespace = {"__name__": "_open_clip_pretrained", "__file__": str(path),
                 "__builtins__": {**vars(builtins), "__import__": guarded_import}}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        table = namespace["_PRETRAINED"]
        return {arch: list(tags) for arch, tags in table.items()}
    except Exception as err:  # noqa: BLE001 - another layout of the file: ask open_clip instead
        raise CatalogError(f"open_clip's pretrained.py could not be read alone: {err}") from None


def static_table() -> tuple[dict, list[str]]:
    """The table from the files alone, and the architectures it could not decide (their rows are missing)."""
    open_clip_dir, timm_dir = _package_dir("open_clip"), _package_dir("timm")
    functions = {**timm_eva_functions(timm_dir), **timm_vit_functions(timm_dir)}
    tags = pretrained_tags(open_clip_dir)
    families = timm_families(timm_dir)
    rows, refused, undecided = [], [], []
    for arch, config in model_configs(open_clip_dir).items():
        if arch.startswith("test-"):  # tiny test towers
            continue
        vision = config.get("vision_cfg", {})
        timm_tower = vision.get("timm_model_name") and not isinstance(vision.get("layers"), (list, tuple))
        if timm_tower:
            supported = timm_tower_decision(vision, functions)
        else:
            supported = native_tower_problem(vision) is None
        if supported == UNDECIDED:
            undecided.append(arch)
        elif supported:
            rows.append(_row(arch, config, tags.get(arch, [])))
        else:
            reason = timm_refusal(vision, functions, families) if timm_tower else native_tower_problem(vision)
            refused.append([arch, reason])
    return {"paper": list(PAPER_MODELS), "open_clip": rows, "refused": refused}, undecided


def _row(arch: str, config: dict, tags: list) -> list:
    """[arch, pool, tokenizer, tags]: CLS, average (CLIPA), MAP (SigLIP) or multi-query attention pooling
    ("attn-pool", CoCa), the text tower's tokenizer, pretrained tags."""
    vision = config["vision_cfg"]
    if vision.get("timm_model_name"):
        pool = "map" if vision.get("timm_pool", "avg") == "map" else "cls"
    else:
        pool = native_tower_pool(vision)
    tokenizer = config.get("text_cfg", {}).get("hf_tokenizer_name") or "CLIP BPE"
    return [arch, pool, tokenizer, list(tags)]


def open_clip_table(only: list[str] | None = None) -> dict:
    """The table the old way, asking open_clip (imports torch, open_clip and timm: seconds); with ``only``,
    those architectures' rows."""
    from .models import open_clip_architectures
    from .models.openclip import registered_open_clip

    from .models.openclip import tower_problem

    open_clip = registered_open_clip()
    archs = open_clip_architectures()
    everything = [arch for arch in open_clip.list_models() if not arch.startswith("test-")]
    if only is not None:
        archs = [arch for arch in archs if arch in set(only)]
        everything = [arch for arch in everything if arch in set(only)]
    rows = [_row(arch, open_clip.get_model_config(arch), open_clip.list_pretrained_tags_by_model(arch))
            for arch in archs]
    refused = [[arch, tower_problem(arch) or "not supported"] for arch in everything if arch not in set(archs)]
    return {"paper": list(PAPER_MODELS), "open_clip": rows, "refused": refused}


def compute_model_table() -> dict:
    """The paper's specs, the supported open_clip architectures ([arch, pool, tokenizer, tags] rows) and the
    refused ones ([arch, reason] rows), from the installed files; open_clip is asked only about what they leave
    undecided (or about all, on a surprise)."""
    try:
        table, undecided = static_table()
    except (CatalogError, OSError, SyntaxError, ValueError, KeyError):
        return open_clip_table()
    if undecided:
        order = {arch: i for i, arch in enumerate(model_configs(_package_dir("open_clip")))}
        asked = open_clip_table(undecided)
        for key in ("open_clip", "refused"):
            table[key] += asked[key]
            table[key].sort(key=lambda row: order[row[0]])
    return table


def _cache_key() -> str:
    """What the table depends on: open_clip's and timm's versions, this file and our models/ package (their
    sizes and times), found without importing them."""
    import hashlib
    from importlib import metadata

    parts = []
    for dist in ("open_clip_torch", "timm"):
        try:
            parts.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist}=none")
    here = Path(__file__).parent
    for path in [Path(__file__), *sorted((here / "models").rglob("*"))]:
        if path.suffix in (".py", ".json"):
            stat = path.stat()
            parts.append(f"{path.relative_to(here)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def model_table() -> dict:
    """``compute_model_table()``, cached in the cache folder (CLIP_INTERPRET_CACHE, default
    ~/.cache/clip-interpret) under a key that changes with open_clip, timm or our model code. An unreadable
    or unwritable cache is skipped."""
    root = os.environ.get("CLIP_INTERPRET_CACHE")
    path = (Path(root) if root else Path("~/.cache/clip-interpret")).expanduser() / f"models-{_cache_key()}.json"
    try:
        table = json.loads(path.read_text())
        if isinstance(table, dict) and {"paper", "open_clip", "refused"} <= set(table):
            return table
    except (OSError, ValueError):
        pass
    table = compute_model_table()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(table))
        os.replace(partial, path)  # whole or absent: another `models` may read it at once
    except OSError:
        pass
    return table
