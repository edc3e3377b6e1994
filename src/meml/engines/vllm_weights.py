"""The policy's weights as vLLM's engine takes them, and the worker-side hooks of a reload.

Pure torch (and PEFT for LoRA): nothing here imports vLLM, so it is tested without it.
`merged_weights` gives checkpoint-named tensors with LoRA merged in, `weight_versions` what
changed since the last push, `layer_groups` which names vLLM reloads together (it fuses
q/k/v and gate/up). The two worker functions run inside vLLM's worker through
`collective_rpc`.
"""

from __future__ import annotations

import torch


class VLLMEngineError(RuntimeError):
    """The vLLM backend cannot run this setup; the message says what to change."""


def merged_weights(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under checkpoint names, LoRA adapters merged in (no copy when
    there are no adapters). vLLM's engine has no adapters: it gets W + scale * B @ A."""
    if not hasattr(policy, "peft_config"):
        return {name: p.detach() for name, p in policy.named_parameters()}
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    weights: dict[str, torch.Tensor] = {}
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        if "modules_to_save" in name or "original_module" in name:
            raise VLLMEngineError(
                f"rollout.backend=vllm: LoRA with modules_to_save ({name}) is not supported; "
                "use model.lora without modules_to_save or rollout.backend=hf"
            )
        weights[name.replace(".base_layer.", ".")] = p.detach()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                key = f"{name}.weight"
                merged = weights[key].clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        merged += module.get_delta_weight(adapter).to(merged.dtype)
                weights[key] = merged
    return weights


def weight_versions(policy: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Per checkpoint name, the version counters of the tensors its (merged) weight comes from."""
    if not hasattr(policy, "peft_config"):
        return {name: (p._version,) for name, p in policy.named_parameters()}
    versions: dict[str, tuple[int, ...]] = {}
    for name, p in policy.get_base_model().named_parameters():
        module, _, leaf = name.rpartition(".")
        if ".lora_" in name:  # module.lora_A.<adapter>.weight: counts toward module's weight
            owner = module.split(".lora_")[0]
            key = f"{owner}.weight"
            versions[key] = versions.get(key, ()) + (p._version,)
        else:
            key = name.replace(".base_layer.", ".")
            versions[key] = (p._version,) + versions.get(key, ())
    return versions


def layer_groups(names: list[str], packed_modules: dict[str, list[str]]) -> dict[str, list[str]]:
    """Checkpoint parameter names grouped by the vLLM layer that holds them.

    vLLM fuses some layers (q/k/v into qkv_proj, gate/up into gate_up_proj) and reloads a
    layer only once all of its weights arrived: a layer must be pushed whole.

    >>> names = ["m.0.q_proj.weight", "m.0.k_proj.weight", "m.0.o_proj.weight"]
    >>> layer_groups(names, {"qkv_proj": ["q_proj", "k_proj"]})
    {'m.0.qkv_proj': ['m.0.q_proj.weight', 'm.0.k_proj.weight'], 'm.0.o_proj': ['m.0.o_proj.weight']}
    """
    fused = {part: packed for packed, parts in packed_modules.items() for part in parts}
    groups: dict[str, list[str]] = {}
    for name in names:
        module, _, _ = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        key = f"{parent}.{fused[leaf]}" if leaf in fused else module
        groups.setdefault(key, []).append(name)
    return groups


def refresh_tied_layers(worker) -> None:
    """Runs inside vLLM's worker, after a reload: re-prepare layers that share a weight.

    With tied embeddings vLLM's lm_head holds the embedding's Parameter, but on CPU each
    layer also keeps a repacked copy for its GEMM kernel, made when weights are processed.
    The reload re-processes the embedding only, so the lm_head would keep multiplying by the
    old weights; processing it again rebuilds its copy from the (updated) shared weight.
    """
    model = worker.model_runner.get_model()
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.numel() > 0:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        for module in modules[1:] if len(modules) > 1 else []:
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


def packed_modules(worker) -> dict[str, list[str]]:
    """Runs inside vLLM's worker: which checkpoint layers the model fuses into one."""
    model = worker.model_runner.get_model()
    return {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}
