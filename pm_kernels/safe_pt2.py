"""Running a ``.pt2`` file (``torch.export.save``) without running code from it: ``load_pt2``.

``torch.export.load`` is not safe on a file from elsewhere: it unpickles members of the archive (the sample
inputs, falling back to ``weights_only=False``; weights and constants marked ``use_pickle``; torchbind and opaque
objects), evaluates the program's symbolic expressions with ``sympy.sympify`` (``eval``), resolves call targets by
walking attributes of the ``torch`` module, and generates Python source from names in the file. A crafted archive
runs a command through any of these.

This reader takes only what a forward pass needs, as data: the program's graph (JSON) and the weights and
constants as raw tensor bytes. It refuses, before running anything, an archive with a member it does not expect,
a compressed member, a pickled payload or a custom object, a tensor whose view reaches past its bytes, a call to
anything but an ATen operator that returns tensors or numbers (plus a few checks and the ``operator`` / ``math``
functions of shape arithmetic), an operator that names a file. It then runs the graph node by node itself:
nothing from the file is unpickled, evaluated, compiled or imported. The sample inputs are never read.

Its errors are ``ValueError`` subclasses given by the caller (``deploy.ExportedFileError``).
"""
import json
import math
import operator
import os
import re
import sys
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch

__all__ = ["load_pt2"]

_JSON_LIMIT = 256 * 2 ** 20  # a program or config of a model this library exports is a few MB
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MEMBER = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                     r"models/model\.json|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|"
                     r"data/weights/weight_\d+|data/constants/model_constants_config\.json|"
                     r"data/constants/tensor_\d+)\Z")
# Python functions a graph may call: shape arithmetic on sizes (torch.export writes them as "_operator.mul", ...).
_FUNCTIONS: Dict[str, Callable] = {
    **{f"_operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge",
        "and_", "or_", "not_", "getitem")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
    **{f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite")
       if hasattr(torch, n)},
}
# ATen operators that return nothing but are allowed: runtime checks torch.export inserts.
_CHECKS = {"_assert_scalar", "_assert_tensor_metadata", "_assert_async", "sym_constrain_range",
           "sym_constrain_range_for_size"}
_RETURNS = re.compile(r"(Optional\[)?(Tensor|int|float|bool|number|SymInt|Scalar)\]?\Z|"
                      r"List\[(Optional\[)?(Tensor|int|SymInt)\]?\]\Z")  # as torch prints schema types
_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}  # how the serializer writes them


class _Refuse:
    """Raises the caller's error type with the file's name."""

    def __init__(self, path: str, error: Type[ValueError]):
        self.path, self.error = path, error

    def __call__(self, reason: str) -> ValueError:
        return self.error(f"{self.path}: {reason}")


def load_pt2(path: str, error: Type[ValueError] = ValueError) -> Callable[[torch.Tensor], Any]:
    """``images → output(s)`` of the program in the ``.pt2`` file ``path``; see the module docstring."""
    refuse = _Refuse(path, error)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise refuse(f"not a .pt2 archive ({err})") from None
    try:
        with archive:
            members = _members(archive, refuse)
            if _text(archive, members["archive_format"], refuse) != "pt2":
                raise refuse("not a torch.export archive (archive_format)")
            if _text(archive, members["byteorder"], refuse) != sys.byteorder:
                raise refuse(f"written on a {_text(archive, members['byteorder'], refuse)}-endian machine")
            program = _json(archive, members["models/model.json"], refuse)
            weights = _tensors(archive, members, "data/weights/", "model_weights_config.json", refuse)
            constants = _tensors(archive, members, "data/constants/", "model_constants_config.json", refuse)
        return _Program(program, weights, constants, refuse)
    except (AttributeError, TypeError, KeyError, IndexError, OverflowError) as err:  # a value of the wrong kind
        raise refuse(f"its program or configs are malformed ({type(err).__name__}: {str(err)[:120]})") from None


# ------------------------------------------------------------------------------------------------ the archive

def _members(archive: zipfile.ZipFile, refuse: _Refuse) -> Dict[str, zipfile.ZipInfo]:
    """{name under the archive's root folder: entry}; every entry expected, stored (not compressed), once."""
    infos = archive.infolist()
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1:
        raise refuse("not a torch.export archive (expected one root folder)")
    members: Dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename.split("/", 1)[1] if "/" in info.filename else ""
        if not _MEMBER.match(name):
            raise refuse(f"unexpected member {info.filename[:120]!r} (only a torch.export program's graph, weights "
                         "and constants are read; pickled objects, custom classes and compiled code are refused)")
        if name in members:
            raise refuse(f"member {name!r} appears twice")
        if info.compress_type != zipfile.ZIP_STORED:
            raise refuse(f"member {name!r} is compressed (torch.export.save stores every member as it is)")
        members[name] = info
    for name in ("archive_format", "byteorder", "models/model.json", "data/weights/model_weights_config.json",
                 "data/constants/model_constants_config.json"):
        if name not in members:
            raise refuse(f"no {name} in the archive (not a torch.export program)")
    return members


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, refuse: _Refuse, limit: Optional[int] = None
          ) -> bytearray:
    if limit is not None and info.file_size > limit:
        raise refuse(f"member {info.filename!r} is {info.file_size} bytes (at most {limit} expected)")
    buf = bytearray(info.file_size)  # stored: the size in the directory is what is read, no inflation
    try:
        with archive.open(info) as f:
            if f.readinto(buf) != info.file_size or f.read(1):
                raise refuse(f"member {info.filename!r} is truncated")
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise refuse(f"member {info.filename!r} cannot be read ({err})") from None
    return buf


def _text(archive, info, refuse) -> str:
    return bytes(_read(archive, info, refuse, 64)).decode("ascii", "replace").strip()


def _json(archive, info, refuse) -> Any:
    try:
        return json.loads(bytes(_read(archive, info, refuse, _JSON_LIMIT)))
    except (ValueError, RecursionError) as err:
        raise refuse(f"member {info.filename!r} is not valid JSON ({str(err)[:120]})") from None


def _dtypes():
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE, _SERIALIZE_TO_TORCH_LAYOUT
    return ({int(k): v for k, v in _SERIALIZE_TO_TORCH_DTYPE.items()},
            {int(k): v for k, v in _SERIALIZE_TO_TORCH_LAYOUT.items()})


def _ints(values: Any, what: str, refuse: _Refuse) -> List[int]:
    """A list of {"as_int": n} (concrete sizes / strides), each n >= 0."""
    if not isinstance(values, list):
        raise refuse(f"{what}: expected a list")
    return [_int(v, what, refuse) for v in values]


def _int(value: Any, what: str, refuse: _Refuse) -> int:
    n = value.get("as_int") if isinstance(value, dict) and len(value) == 1 else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise refuse(f"{what}: expected a non-negative integer, got {str(value)[:60]}")
    return n


def _device(spec: Any, refuse: _Refuse) -> torch.device:
    if not isinstance(spec, dict) or spec.get("type") not in ("cpu", "cuda"):
        raise refuse(f"device {str(spec)[:60]}: expected cpu or cuda")
    index = spec.get("index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise refuse(f"device {str(spec)[:60]}: bad index")
    if spec["type"] == "cuda" and not torch.cuda.is_available():
        raise refuse("its tensors are on a CUDA device, and CUDA is not available here")
    return torch.device(spec["type"], index)


def _tensors(archive, members, folder: str, config_name: str, refuse) -> Dict[str, torch.Tensor]:
    """{fully qualified name: tensor} from raw bytes; a pickled entry or a custom object is refused."""
    config = _json(archive, members[folder + config_name], refuse)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise refuse(f"{config_name}: expected {{'config': {{...}}}}")
    dtypes, layouts = _dtypes()
    bases: Dict[str, torch.Tensor] = {}
    out = {}
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            raise refuse(f"{config_name}: entry {str(fqn)[:80]!r} is malformed")
        if entry.get("use_pickle") is not False:
            raise refuse(f"{str(fqn)[:80]!r} is a pickled object (only raw tensor bytes are read)")
        meta = entry.get("tensor_meta")
        member = members.get(folder + entry["path_name"])
        if member is None or not isinstance(meta, dict):
            raise refuse(f"{str(fqn)[:80]!r}: no tensor {entry['path_name'][:60]!r} in the archive")
        dtype = dtypes.get(meta.get("dtype")) if isinstance(meta.get("dtype"), int) else None
        if dtype is None or layouts.get(meta.get("layout")) is not torch.strided:
            raise refuse(f"{str(fqn)[:80]!r}: unsupported dtype or layout")
        sizes = _ints(meta.get("sizes"), f"{fqn} sizes", refuse)
        strides = _ints(meta.get("strides"), f"{fqn} strides", refuse)
        offset = _int(meta.get("storage_offset"), f"{fqn} storage offset", refuse)
        if len(sizes) != len(strides):
            raise refuse(f"{str(fqn)[:80]!r}: {len(sizes)} sizes, {len(strides)} strides")
        if entry["path_name"] not in bases:
            raw = _read(archive, member, refuse)
            if len(raw) % dtype.itemsize:
                raise refuse(f"{str(fqn)[:80]!r}: {len(raw)} bytes, not a whole number of {dtype} elements")
            bases[entry["path_name"]] = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype))
        base = bases[entry["path_name"]]
        numel = math.prod(sizes)
        last = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) if numel else -1
        # A view past its bytes would read other memory; one with more elements than its bytes (overlapping
        # strides) is how a small file would make the program allocate large tensors.
        if last >= base.numel() or numel > base.numel():
            raise refuse(f"{str(fqn)[:80]!r}: shape {sizes} with strides {strides} does not fit its "
                         f"{base.numel()} stored elements")
        out[fqn] = torch.as_strided(base, sizes, strides, offset).to(_device(meta.get("device"), refuse))
    return out


# ------------------------------------------------------------------------------------------------ the program

def _target(name: Any, refuse: _Refuse) -> Tuple[Callable, bool]:
    """(the callable, whether it is an ATen operator) of a node's target, or refused."""
    if not isinstance(name, str):
        raise refuse("a node without a target")
    if name in _FUNCTIONS:
        return _FUNCTIONS[name], False
    parts = name.split(".")
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"] or not all(_IDENT.match(p) for p in parts[3:]):
        raise refuse(f"calls {name[:120]!r} (only ATen operators and shape arithmetic are run)")
    try:
        op = getattr(getattr(torch.ops.aten, parts[3]), parts[4])
    except (AttributeError, RuntimeError):
        raise refuse(f"calls {name[:120]!r}, which this torch does not have") from None
    schema = op._schema
    if any(a.name in ("filename", "path", "file") for a in schema.arguments):
        raise refuse(f"calls {name[:120]!r}, which reads or writes a file")
    returns = [str(r.type) for r in schema.returns]
    if not ((returns and all(_RETURNS.match(r) for r in returns)) or (not returns and parts[3] in _CHECKS)):
        raise refuse(f"calls {name[:120]!r}, which returns {returns or 'nothing'} (not tensors or numbers)")
    return op, True


def _float(value: Any) -> Any:
    return _FLOATS.get(value, value) if isinstance(value, str) else value


def _is(kind: type) -> Callable[[Any], bool]:
    if kind is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return lambda v: isinstance(_float(v), (int, float)) and not isinstance(v, bool)
    return lambda v: isinstance(v, kind)


_SCALARS = {"as_int": int, "as_float": float, "as_bool": bool, "as_string": str}
_LISTS = {"as_ints": int, "as_floats": float, "as_bools": bool, "as_strings": str}
_SYMBOLIC = {"as_sym_int": ("as_int", int), "as_sym_float": ("as_float", float), "as_sym_bool": ("as_bool", bool)}


class _Program:
    """The graph, checked and resolved once; ``__call__(images)`` runs it node by node."""

    def __init__(self, program: Any, weights: Dict[str, torch.Tensor], constants: Dict[str, torch.Tensor],
                 refuse: _Refuse):
        from torch._export.serde.schema import SCHEMA_VERSION
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_MEMORY_FORMAT
        self.refuse = refuse
        self.dtypes, self.layouts = _dtypes()
        self.formats = {int(k): v for k, v in _SERIALIZE_TO_TORCH_MEMORY_FORMAT.items()}
        try:
            version = program["schema_version"]["major"]
            module = program["graph_module"]
            graph, signature = module["graph"], module["signature"]
            nodes, inputs, outputs = graph["nodes"], graph["inputs"], graph["outputs"]
        except (KeyError, TypeError):
            raise refuse("its program is not a torch.export graph") from None
        if version != SCHEMA_VERSION[0]:
            raise refuse(f"written with torch.export schema {version}, this torch reads {SCHEMA_VERSION[0]}")
        self.defined: set = set()
        self.values: Dict[str, Any] = {}
        self.input_name = self._bind_inputs(signature.get("input_specs"), inputs, weights, constants)
        self.steps = [self._step(node) for node in (nodes if isinstance(nodes, list) else [])]
        specs = signature.get("output_specs")
        if not isinstance(outputs, list) or not outputs or not isinstance(specs, list) or len(specs) != len(outputs):
            raise refuse("its program has no outputs")
        for spec in specs:
            if not isinstance(spec, dict) or list(spec) != ["user_output"]:
                raise refuse(f"output {str(spec)[:80]} is not a plain output (mutations, losses, gradients)")
        self.outputs = [self._tensor_name(o, "an output") for o in outputs]
        if not set(self.outputs) <= self.defined:
            raise refuse("its program returns a value no node makes")
        self.single = len(self.outputs) == 1 and _leaf_out_spec(module)
        meta = graph.get("tensor_values", {}).get(self.input_name)
        self.input_dtype = self.dtypes.get(meta.get("dtype")) if isinstance(meta, dict) else None
        sizes = meta.get("sizes") if isinstance(meta, dict) else None
        if self.input_dtype is None or not isinstance(sizes, list):
            raise refuse("its input has no dtype or shape")
        # a fixed size, or None for a symbolic one (the batch)
        self.input_sizes = [None if isinstance(d, dict) and list(d) == ["as_expr"] else _int(d, "input size", refuse)
                            for d in sizes]

    # -------------------------------------------------------------------- checks at load
    def _bind_inputs(self, specs, inputs, weights, constants) -> str:
        if not isinstance(specs, list) or not isinstance(inputs, list) or len(specs) != len(inputs):
            raise self.refuse("its program's inputs do not match its signature")
        user = []
        for spec, arg in zip(specs, inputs):
            kind, body = next(iter(spec.items())) if isinstance(spec, dict) and len(spec) == 1 else (None, None)
            name = self._tensor_name(arg, "an input")
            if kind == "user_input":
                user.append(name)
            elif kind in ("parameter", "buffer", "tensor_constant"):
                fqn = body.get({"parameter": "parameter_name", "buffer": "buffer_name",
                                "tensor_constant": "tensor_constant_name"}[kind])
                source = constants if kind == "tensor_constant" else weights
                if fqn not in source:
                    source = constants if source is weights else weights  # lifted constants may sit in either
                if fqn not in source:
                    raise self.refuse(f"input {name[:60]!r} names {str(fqn)[:80]!r}, which the archive does not hold")
                self.values[name] = source[fqn]
            else:
                raise self.refuse(f"input {str(spec)[:80]} is not a tensor, a parameter, a buffer or a constant")
            self.defined.add(name)
        if len(user) != 1:
            raise self.refuse(f"its program takes {len(user)} inputs (one images tensor expected)")
        return user[0]

    def _tensor_name(self, arg: Any, what: str) -> str:
        name = arg.get("as_tensor", {}).get("name") if isinstance(arg, dict) and len(arg) == 1 else None
        if not isinstance(name, str):
            raise self.refuse(f"{what} that is not a tensor: {str(arg)[:80]}")
        return name

    def _ref(self, name: Any) -> Callable[[Dict[str, Any]], Any]:
        if not isinstance(name, str) or name not in self.defined:
            raise self.refuse(f"a node reads {str(name)[:60]!r} before any node makes it")
        return lambda env: env[name]

    def _arg(self, arg: Any) -> Callable[[Dict[str, Any]], Any]:
        """A function env → the argument's value; anything but tensors, numbers, strings, lists of those, dtypes,
        layouts, memory formats and devices is refused."""
        if not isinstance(arg, dict) or len(arg) != 1:
            raise self.refuse(f"a malformed argument {str(arg)[:80]}")
        (kind, value), = arg.items()
        const = None
        if kind == "as_none":
            return lambda env: None
        if kind == "as_tensor":
            return self._ref(value.get("name") if isinstance(value, dict) else None)
        if kind in ("as_tensors", "as_optional_tensors"):
            if not isinstance(value, list):
                raise self.refuse(f"{kind}: expected a list")
            # as_tensors: [{"name": n}, ...]; as_optional_tensors: [{"as_tensor": {"name": n}} | {"as_none": ...}]
            parts = [self._arg({"as_tensor": v} if kind == "as_tensors" else v) for v in value]
            return lambda env: [p(env) for p in parts]
        if kind == "as_optional_tensor":
            return self._arg(value)
        if kind in _SYMBOLIC or kind[:-1] in _SYMBOLIC:
            plain, typ = _SYMBOLIC.get(kind) or _SYMBOLIC[kind[:-1]]
            items = [value] if kind in _SYMBOLIC else value
            if not isinstance(items, list):
                raise self.refuse(f"{kind}: expected a list")
            parts = []
            for item in items:
                if isinstance(item, dict) and list(item) == ["as_name"]:
                    parts.append(self._ref(item["as_name"]))
                else:
                    parts.append(self._arg({plain: item.get(plain) if isinstance(item, dict) else None}))
            return (parts[0] if kind in _SYMBOLIC else (lambda env: [p(env) for p in parts]))
        if kind in _SCALARS and _is(_SCALARS[kind])(value):
            const = _float(value)
        elif kind in _LISTS and isinstance(value, list) and all(map(_is(_LISTS[kind]), value)):
            const = [_float(v) for v in value]
        elif kind == "as_scalar_type" and value in self.dtypes:
            const = self.dtypes[value]
        elif kind == "as_layout" and value in self.layouts:
            const = self.layouts[value]
        elif kind == "as_memory_format" and value in self.formats:
            const = self.formats[value]
        elif kind == "as_device":
            const = _device(value, self.refuse)
        else:
            raise self.refuse(f"an argument of kind {kind!r} ({str(value)[:60]}) is not read")
        return lambda env: const

    def _step(self, node: Any):
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), list):
            raise self.refuse("a malformed node")
        fn, is_op = _target(node.get("target"), self.refuse)
        names = {a.name for a in fn._schema.arguments} if is_op else set()
        args, kwargs = [], {}
        for named in node["inputs"]:
            if not isinstance(named, dict) or not isinstance(named.get("name"), str):
                raise self.refuse(f"a malformed input of {node.get('target')}")
            value = self._arg(named.get("arg"))
            if is_op:  # by name: an ATen operator takes every argument by its schema's name
                if named["name"] not in names:
                    raise self.refuse(f"{node['target']} has no argument {named['name'][:60]!r}")
                kwargs[named["name"]] = value
            else:
                args.append(value)
        outs = node.get("outputs")
        if not isinstance(outs, list):
            raise self.refuse(f"a malformed output of {node.get('target')}")
        binders = [self._binder(o) for o in outs]
        return node["target"], fn, args, kwargs, binders

    def _binder(self, out: Any) -> Callable[[Dict[str, Any], Any], None]:
        if not isinstance(out, dict) or len(out) != 1:
            raise self.refuse(f"a malformed node output {str(out)[:80]}")
        (kind, value), = out.items()
        if kind == "as_tensors" and isinstance(value, list):
            names = [v.get("name") if isinstance(v, dict) else None for v in value]
        elif kind == "as_tensor" and isinstance(value, dict):
            names = value.get("name")
        elif kind in _SYMBOLIC and isinstance(value, dict) and "as_name" in value:
            names = value["as_name"]
        else:  # a constant output (as_none, as_int, ...): nothing reads it by name
            return lambda env, result: None
        for name in names if isinstance(names, list) else [names]:
            if not isinstance(name, str) or name in self.defined:
                raise self.refuse(f"node output {str(name)[:60]!r} is unnamed or named twice")
            self.defined.add(name)
        if isinstance(names, list):
            def bind_all(env, result):
                for name, item in zip(names, result):
                    env[name] = item
            return bind_all
        return lambda env, result: env.__setitem__(names, result)

    # -------------------------------------------------------------------- running
    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a tensor, got {type(images).__name__}")
        sizes = self.input_sizes
        if len(sizes) != images.dim() or any(s is not None and s != d for s, d in zip(sizes, images.shape)):
            want = ", ".join("B" if s is None else str(s) for s in sizes)
            raise ValueError(f"images: expected shape ({want}), got {tuple(images.shape)}")
        if self.input_dtype is not None and images.dtype != self.input_dtype:
            raise TypeError(f"images: expected {self.input_dtype}, got {images.dtype}")

    def __call__(self, images: torch.Tensor):
        self.check_images(images)
        env = dict(self.values)
        env[self.input_name] = images
        with torch.no_grad():
            for target, fn, args, kwargs, binders in self.steps:
                try:
                    result = fn(*[a(env) for a in args], **{k: v(env) for k, v in kwargs.items()})
                    if len(binders) == 1:
                        binders[0](env, result)
                    elif binders:  # an operator with several results (none: a check such as _assert_scalar)
                        for binder, item in zip(binders, result):
                            binder(env, item)
                except (RuntimeError, TypeError, ValueError, IndexError, KeyError, ZeroDivisionError,
                        OverflowError) as err:
                    raise self.refuse(f"its node {target} failed: {(str(err).splitlines() or [''])[0][:200]}") \
                        from None
        out = [env[name] for name in self.outputs]
        return out[0] if self.single else tuple(out)


def _leaf_out_spec(module: Dict[str, Any]) -> bool:
    """Whether the program returns one tensor (not a 1-tuple): its output tree spec is a leaf."""
    try:
        spec = json.loads(module["module_call_graph"][0]["signature"]["out_spec"])
        return spec[1].get("type") is None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return True
