"""RaSA through a Megatron GPT layer spec: the layers get their adapters while the model is built.

``rasa_layer_spec(spec, config, seed)`` returns a copy of a layer spec (a ``ModuleSpec`` of a
``TransformerLayer``, or a ``TransformerBlockSubmodules`` of them) whose layers, right after
building their base linears, freeze them and wrap the target linears exactly as the post-build
:func:`rasa_megatron.megatron.apply_rasa_megatron` does. The result is the same model: the same
wrappers, the same pipeline-sharded pools, the same gradient finalisation and conversion helpers.

The pools are shared by all layers of a module type, so they are not a per-layer matter. Every spec
made with the same (config, seed, dtype) carries the same :class:`RaSASpecState` (Megatron-LM's
``model_provider`` makes a new spec for each virtual-pipeline chunk, and the chunks of a rank share
their pools); the first layer a rank builds draws the rank's whole adapter
(every layer it will run, over all its virtual-pipeline chunks, found with Megatron's own
``get_transformer_layer_offset`` / ``get_num_layers_to_build``) from a generator seeded with
``seed``, in ``apply_rasa``'s order, and registers the pools on itself (``rasa_pools``); every
layer then takes its own adapters. After building, a model on any TP x PP (x VPP) layout holds
exactly the adapter HF ``apply_rasa`` gives after ``torch.manual_seed(seed)``.

GPTModel builds the embedding, final norm and output layer outside the layer spec; freeze them with
:func:`rasa_megatron.megatron.freeze_base_parameters` before building the optimizer.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch

from ..config import RaSAConfig
from .inject import (EXPERT_TYPES, MODULE_TYPES, POOLS_ATTR, DrawnAdapters, hf_module_types, attach_adapters,
                     check_layer_linears, draw_adapters, is_local_linear, not_local_linear_error)


def owned_layers(tconfig) -> tuple[int, ...]:
    """Global indices of the layers this pipeline rank builds, over all its virtual-pipeline chunks."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = tconfig.virtual_pipeline_model_parallel_size or 1
    owned = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        offset = get_transformer_layer_offset(tconfig, stage)
        owned += range(offset, offset + get_num_layers_to_build(tconfig, stage))
    return tuple(sorted(owned))


@dataclass
class RaSASpecState:
    """What the layers built from one RaSA spec share: the config, the init seed and the adapter
    drawn for the model being built on this rank (dropped once all its layers are built, so a second
    model built from the same spec gets its own)."""
    config: RaSAConfig
    seed: int
    adapter_dtype: torch.dtype = torch.float32
    _drawn: DrawnAdapters | None = field(default=None, repr=False)
    _owned: tuple[int, ...] = field(default=(), repr=False)
    _built: set = field(default_factory=set, repr=False)

    def __deepcopy__(self, memo):  # one shared handle, also if Megatron copies the spec
        return self

    def attach(self, layer) -> None:
        """Freeze ``layer``'s base parameters and wrap its target linears (the first layer of a model
        also draws this rank's adapter and registers the pools on itself)."""
        index = layer.layer_number - 1
        if self._drawn is None or index in self._built:  # a new model
            self._owned = owned_layers(layer.config)
            generator = torch.Generator().manual_seed(self.seed)
            self._drawn = draw_adapters(self.config, layer.config, self._owned, self.adapter_dtype, generator)
            self._built = set()
        if index not in self._owned:
            raise ValueError(f"layer {index} is not among the layers {list(self._owned)} this pipeline rank builds "
                             "according to its TransformerConfig")
        check_layer_linears(layer, index, self._drawn.types, self._drawn.expert_types)
        for param in layer.parameters():
            param.requires_grad_(False)
        attach_adapters(layer, index, self._drawn)
        if not self._built:  # the model's first layer on this rank holds the pools
            setattr(layer, POOLS_ATTR, self._drawn.registry())
        self._built.add(index)
        if self._built == set(self._owned):
            self._drawn = None


_LAYER_CLASSES: dict[type, type] = {}
#: (config, seed, dtype) -> the state every spec made with them shares
_SPEC_STATES: dict[tuple, RaSASpecState] = {}


def rasa_layer_class(base_class: type) -> type:
    """``base_class`` (Megatron's ``TransformerLayer`` or a subclass) with RaSA attached after its
    ``__init__``; takes one more keyword, ``rasa_state`` (:class:`RaSASpecState`)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if not (isinstance(base_class, type) and issubclass(base_class, TransformerLayer)):
        raise TypeError(f"the layer spec builds {base_class!r}; RaSA layer specs need Megatron's TransformerLayer "
                        "(or a subclass)")
    if getattr(base_class, "_rasa_layer", False):
        return base_class
    if base_class not in _LAYER_CLASSES:
        def __init__(self, *args, rasa_state: RaSASpecState, **kwargs):
            base_class.__init__(self, *args, **kwargs)
            rasa_state.attach(self)

        _LAYER_CLASSES[base_class] = type(f"RaSA{base_class.__name__}", (base_class,),
                                          {"__init__": __init__, "_rasa_layer": True, "__module__": __name__})
    return _LAYER_CLASSES[base_class]


def _check_linears(layer_spec, types: list[str], expert_types: list[str]) -> None:
    """Refuse, before building, target linears that are not Megatron-core's local Column/RowParallelLinear."""
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    wanted = {MODULE_TYPES[path][0].rsplit(".", 1)[1] for path in types}
    if expert_types:
        wanted |= {EXPERT_TYPES[path][0] for path in expert_types}

    def walk(node, where):
        submodules = node.submodules if isinstance(node, ModuleSpec) else node
        if submodules is None or not hasattr(submodules, "__dataclass_fields__"):
            return
        for name in submodules.__dataclass_fields__:
            child = getattr(submodules, name)
            if name in wanted and child is not None:
                module = child.module if isinstance(child, ModuleSpec) else child
                module = import_module(module) if isinstance(module, tuple) else module
                if not is_local_linear(module):
                    raise not_local_linear_error(f"{where}.{name}", repr(getattr(module, "__qualname__", module)))
            elif isinstance(child, ModuleSpec) or hasattr(child, "__dataclass_fields__"):
                walk(child, f"{where}.{name}")

    walk(layer_spec, "spec")


def rasa_layer_spec(spec, config: RaSAConfig, seed: int | None = None, adapter_dtype: torch.dtype = torch.float32):
    """A RaSA version of a Megatron GPT layer spec (the input is not modified).

    Args:
        spec: a ``ModuleSpec`` of a ``TransformerLayer`` (e.g. ``get_gpt_layer_local_spec()``) or a
            ``TransformerBlockSubmodules`` whose ``layer_specs`` are such specs. The target linears
            must be Megatron-core's local ``ColumnParallelLinear`` / ``RowParallelLinear`` (checked
            when the layer is built); MoE layers need ``SequentialMLP`` experts.
        config: the :class:`RaSAConfig` (HF target names, as for ``apply_rasa_megatron``).
        seed: the adapter init seed (default: ``torch.initial_seed()``, the last
            ``torch.manual_seed``); the built adapter equals HF ``apply_rasa``'s after
            ``torch.manual_seed(seed)`` on every layout.

    Returns:
        The spec to pass to ``GPTModel(transformer_layer_spec=...)``.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    types, expert_types = hf_module_types(config)  # unknown target names fail here, not inside GPTModel's constructor
    seed = torch.initial_seed() if seed is None else int(seed)
    key = (json.dumps(config.to_dict(), sort_keys=True), seed, str(adapter_dtype))
    state = _SPEC_STATES.setdefault(key, RaSASpecState(config, seed, adapter_dtype))

    def convert(layer_spec):
        if not isinstance(layer_spec, ModuleSpec):
            raise TypeError(f"expected a ModuleSpec of a TransformerLayer, got {type(layer_spec).__name__}")
        module = layer_spec.module
        if isinstance(module, tuple):
            from megatron.core.transformer.spec_utils import import_module

            module = import_module(module)
        if "rasa_state" in layer_spec.params:
            raise ValueError("the layer spec already has RaSA (rasa_state in its params)")
        _check_linears(layer_spec, types, expert_types)
        converted = copy.copy(layer_spec)
        converted.module = rasa_layer_class(module)
        converted.params = {**layer_spec.params, "rasa_state": state}
        return converted

    if isinstance(spec, TransformerBlockSubmodules):
        converted = copy.copy(spec)
        converted.layer_specs = [convert(s) for s in spec.layer_specs]
        return converted
    return convert(spec)
