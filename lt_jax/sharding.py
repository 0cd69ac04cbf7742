"""Device meshes and where every array lives on one (docs/design.md §12).

One mesh description everywhere: a `jax.sharding.Mesh`, or a string "data=2,model=4" (axis=size pairs whose
product is the device count; one size may be -1, "the rest"). Every array that gets a sharding names its axes
logically — weights through `params.param_specs`, the KV cache and token batches through the tables below — and
one small rules table, `RULES`, maps logical axes to mesh axes through Flax's `logical_to_mesh_axes`. Users pass
their own table to change the layout (e.g. `(("ffn", "model"),)` alone keeps attention replicated).

Two rules of our own on top of Flax's:
- a rule naming a mesh axis the mesh lacks is skipped (one table serves meshes with and without `fsdp`);
- a dimension the mesh axis does not divide is replicated over that axis instead of failing with an XLA shape
  error. SmolLM2 has 9 query and 3 KV heads: on model=2, 4 or 8 its attention weights and KV cache are replicated
  over `model` and only the MLP, the vocabulary and the batch are split. Tensor-parallel inference engines
  (vLLM, SGLang, LMDeploy) likewise replicate KV heads when the tensor-parallel degree exceeds them; we replicate
  whenever it does not divide them. `describe` lists which leaves fell back.

Data-parallel groups and processes: inside one process the `data` axis splits a batch's rows; across processes
(`lt_jax.distributed`) each process runs its own rows or examples on the part of the mesh it addresses, so the
`model` axis must stay within a process (`local_mesh`)."""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lt_jax.config import Config
from lt_jax.errors import LtJaxError
from lt_jax.params import ParamSpec, param_specs, split_layers, stack_layers

# logical axis -> mesh axis; the first rule whose mesh axis exists (and is not already used by the leaf) wins.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("ffn", "model"),
    ("embed", "fsdp"),
)

# The KV cache's logical axes (lt_jax.cache.KVCache: keys and values [B, K, H, M]).
CACHE_AXES = {
    "full_k": ("batch", "kv_heads", "head_dim", "cache_len"),
    "full_v": ("batch", "kv_heads", "head_dim", "cache_len"),
    "full_pos": ("batch", "cache_len"),
    "ring_k": ("batch", "kv_heads", "head_dim", "cache_len"),
    "ring_v": ("batch", "kv_heads", "head_dim", "cache_len"),
    "ring_pos": ("batch", "cache_len"),
    "length": ("batch",),
}


def make_mesh(spec, devices=None) -> Mesh | None:
    """A Mesh from a Mesh (returned as is), None (None: no mesh, one device), or "data=2,model=4" over `devices`
    (default: every device of every process, `jax.devices()`)."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    if not isinstance(spec, str):
        raise LtJaxError(f"a mesh is a jax.sharding.Mesh or a string like 'data=2,model=4'; got {spec!r}.")
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = [], []
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"([A-Za-z_]\w*)=(-1|\d+)", part)
        if not match or int(match[2]) == 0 or match[1] in names:
            raise LtJaxError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE (a name, a size >= 1 or -1, each axis once), "
                             f"e.g. 'data=2,model=4'.")
        names.append(match[1])
        sizes.append(int(match[2]))
    if sizes.count(-1) > 1:
        raise LtJaxError(f"mesh {spec!r}: only one axis may have size -1 (the rest of the devices).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise LtJaxError(f"mesh {spec!r}: {len(devices)} devices are not a multiple of {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        platform = getattr(devices[0], "platform", "") if devices else ""
        # XLA_FLAGS can multiply CPU devices only; a TPU target's chips are its topology's
        hint = (f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(sizes)} simulates that "
                f"many devices)" if platform == "cpu" else "")
        raise LtJaxError(f"mesh {spec!r} needs {math.prod(sizes)} devices; there are {len(devices)} "
                         f"({platform or 'devices'}); give sizes whose product is {len(devices)}{hint}.")
    try:  # a topology-aware order on real accelerators; plain order where it has none (CPU)
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 - any failure means no topology to follow
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, tuple(names))


def check_axes(spec, rules=None) -> None:
    """Mesh axis names (of a Mesh or an "AXIS=SIZE,..." string) against the rules that place arrays on them: an
    axis no rule names would hold only copies, so a typo (`modle=2`) silently gives up the split. With the default
    `RULES` that is an error naming the known axes; with a table of the user's own, a warning."""
    if spec is None:
        return
    names = spec.axis_names if isinstance(spec, Mesh) else [  # a malformed part is make_mesh's to report
        p.partition("=")[0] for p in str(spec).replace(" ", "").split(",") if "=" in p]
    table = RULES if rules is None else tuple(rules)
    known = sorted({a for _, axis in table if axis for a in ((axis,) if isinstance(axis, str) else axis)})
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    text = (f"mesh {spec if isinstance(spec, str) else dict(spec.shape)!r}: axis {', '.join(map(repr, unknown))} is "
            f"not named by the sharding rules, which place arrays on {', '.join(known)}")
    if rules is None:
        raise LtJaxError(f"{text}; nothing would be split over it (a typo?).")
    import warnings
    warnings.warn(f"{text}: arrays are only copied over it.", stacklevel=2)


def local_mesh(mesh: Mesh) -> Mesh:
    """The part of `mesh` this process addresses: its rows along `data` (or the first axis). Every other axis must
    lie within a process, since a process runs its rows without the others."""
    if jax.process_count() == 1:
        return mesh
    first = mesh.axis_names.index("data") if "data" in mesh.axis_names else 0
    grid = np.moveaxis(mesh.devices, first, 0)
    groups = grid.reshape(grid.shape[0], -1)  # one row of devices per index along the first axis
    mine = np.array([[d.process_index == jax.process_index() for d in group] for group in groups])
    if not all(row.all() or not row.any() for row in mine):
        raise LtJaxError(f"mesh {dict(mesh.shape)}: a group along the axes other than "
                         f"{mesh.axis_names[first]!r} spans several processes; keep those axes within one host "
                         f"(e.g. data={jax.device_count() // jax.local_device_count()}*k, model<="
                         f"{jax.local_device_count()}).")
    return Mesh(np.moveaxis(grid[mine.all(axis=1)], 0, first), mesh.axis_names)


def _usable_rules(mesh: Mesh, rules) -> tuple:
    return tuple((logical, axis) for logical, axis in rules
                 if axis is None or all(a in mesh.axis_names for a in ((axis,) if isinstance(axis, str) else axis)))


def spec_for(mesh: Mesh, axes: tuple, shape: tuple, rules=RULES) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dims are named `axes`: Flax's rules, then every dim the mesh
    axis does not divide replicated."""
    from flax.linen import logical_to_mesh_axes
    mapped = logical_to_mesh_axes(axes, _usable_rules(mesh, rules))
    out = []
    for dim, axis in zip(shape, tuple(mapped) + (None,) * (len(shape) - len(mapped))):
        size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))
        out.append(axis if axis is not None and dim % size == 0 else None)
    while out and out[-1] is None:  # the form jit gives its outputs: equal specs then key one compilation
        out.pop()
    return PartitionSpec(*out)


def sharding_for(mesh: Mesh, axes: tuple, shape: tuple, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(mesh, axes, shape, rules))


def param_shardings(cfg: Config, mesh: Mesh, rules=RULES, split: bool = False) -> dict:
    """The NamedSharding of every leaf of `param_specs(cfg)`: stacked layers, or with split=True a tuple of
    per-layer dicts (a loaded Model's storage, `params.split_layers`)."""
    of = lambda s: sharding_for(mesh, s.axes, s.shape, rules)  # noqa: E731
    specs = param_specs(cfg)
    out = jax.tree.map(of, {k: v for k, v in specs.items() if k != "layers"}, is_leaf=_is_spec)
    if not split:
        return {**out, "layers": jax.tree.map(of, specs["layers"], is_leaf=_is_spec)}
    one = {name: of(ParamSpec(s.shape[1:], s.axes[1:], s.init)) for name, s in specs["layers"].items()}
    return {**out, "layers": tuple(dict(one) for _ in range(cfg.num_layers))}


def cache_kv_heads(cfg: Config, mesh: Mesh | None, rules=RULES) -> int:
    """How many KV heads a cache holds on `mesh`: the model's, or, where the axis that splits the query heads does
    not divide the KV heads but is a multiple of them (Llama-3's 8 on model=16, 2 on model=4), that axis's size:
    each KV head copied once per chip that reads it (`cache.to_cache_heads`), as tensor-parallel engines do. The
    cache is then split, each chip holding its one KV head instead of all of them; replicated, the TPU decode loop
    split it over heads itself and gathered it back (temporaries above the cache's own size)."""
    K = cfg.num_kv_heads
    if mesh is None:
        return K
    q_axis = tuple(spec_for(mesh, ("q_heads",), (cfg.num_heads,), rules))
    if not q_axis or q_axis[0] is None or tuple(spec_for(mesh, ("kv_heads",), (K,), rules)):
        return K  # query heads not split, or the KV heads split already
    size = math.prod(mesh.shape[a] for a in ((q_axis[0],) if isinstance(q_axis[0], str) else q_axis[0]))
    widened = tuple(spec_for(mesh, ("kv_heads",), (size,), rules))
    return size if size % K == 0 and widened and widened[0] == q_axis[0] else K


def cache_shardings(cache, mesh: Mesh, rules=RULES):
    """A KVCache (or its abstract shape) -> the same structure of NamedShardings: rows over `data`, KV heads over
    `model` where they divide (replicated otherwise)."""
    import dataclasses
    return dataclasses.replace(cache, **{
        field: (tuple(sharding_for(mesh, axes, a.shape, rules) for a in value) if isinstance(value, tuple)
                else sharding_for(mesh, axes, value.shape, rules))
        for field, axes in CACHE_AXES.items() for value in [getattr(cache, field)]})


def rows_sharding(mesh: Mesh, shape: tuple, rules=RULES) -> NamedSharding:
    """Token batches [B, T] (and any array whose first axis is the batch): rows over `data` where they divide."""
    return sharding_for(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules)


def place_params(params: dict, cfg: Config, mesh: Mesh, rules=RULES, consume: bool = False,
                 split: bool = True) -> dict:
    """Stacked (or already split) params -> per-layer buffers in their shardings (`params.split_layers`), or with
    split=False stacked layers in theirs (`params.default_layers`)."""
    if not split:
        return jax.device_put(stack_layers(params), param_shardings(cfg, mesh, rules))
    return split_layers(params, param_shardings(cfg, mesh, rules, split=True), consume)


def onto_mesh(tree, mesh: Mesh):
    """Every array leaf of `tree` that is not placed on `mesh` put there replicated (a training state's step and
    optimizer counters): a jitted step then returns the shardings it was given, so a donated state keeps one
    compilation instead of recompiling on the second step."""
    def put(a):
        on = isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
        return a if on else jax.device_put(a, NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(put, tree)


def describe(cfg: Config, mesh: Mesh, rules=RULES) -> dict:
    """leaf -> its PartitionSpec as text, and which logical axes were replicated because the mesh axis does not
    divide them (for logs and docs)."""
    from flax.linen import logical_to_mesh_axes
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)[0]
    for path, s in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        wanted = logical_to_mesh_axes(s.axes, _usable_rules(mesh, rules))
        got = spec_for(mesh, s.axes, s.shape, rules)
        padded = tuple(got) + (None,) * (len(s.axes) - len(got))
        fell_back = [s.axes[i] for i, (w, g) in enumerate(zip(wanted, padded)) if w is not None and g is None]
        out[name] = {"spec": str(tuple(got)), "replicated_not_dividing": fell_back}
    return out


def unsplit(cfg: Config, mesh: Mesh, rules=RULES) -> list[str]:
    """What the rules would split over a mesh axis that does not divide it (so every chip on that axis holds it
    whole), one phrase per logical axis, with the sizes of that axis that would split it: for planning a mesh
    (`lt-jax compile`). Empty when everything the rules name is split."""
    sizes = {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "ffn": cfg.ffn_dim,
             "vocab": cfg.vocab_size, "embed": cfg.dim}
    fell = {a for d in describe(cfg, mesh, rules).values() for a in d["replicated_not_dividing"]}
    if cfg.num_kv_heads != cache_kv_heads(cfg, mesh, rules):
        fell.discard("kv_heads")  # the cache copies a KV head per chip that reads it: split after all
    out = []
    for axis in sorted(fell, key=list(sizes).index):
        names = dict(_usable_rules(mesh, rules))[axis]
        names = (names,) if isinstance(names, str) else tuple(names)
        size = math.prod(mesh.shape[n] for n in names)
        chips = math.prod(mesh.shape.values())
        would = [d for d in range(2, chips + 1) if chips % d == 0 and sizes[axis] % d == 0]
        out.append(f"{axis} ({sizes[axis]}) over {'x'.join(names)}={size}: not split"
                   + (f" ({'x'.join(names)}={', '.join(map(str, would))} would split it)" if would else ""))
    return out


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)
