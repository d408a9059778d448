"""Hugging Face test models: a tiny Llama built from a config (random init, never downloaded), and
the tensors of a directory of safetensors files as the safetensors library reads them."""

from __future__ import annotations

import glob
import os

import torch

# Nothing in the tests may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama_config(tie: bool = False, **overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, tie: bool = False, **overrides):
    """A LlamaForCausalLM with random weights from ``seed`` (the same on every process)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tie, **overrides))
    # Random init leaves the norms at exactly one: make every tensor distinct, so a value loaded into
    # the wrong place cannot match by accident.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.01)
    return model.eval()


def from_pretrained(directory):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(os.fspath(directory))


def safetensors_state(directory) -> dict[str, torch.Tensor]:
    """Every tensor in the ``*.safetensors`` files of ``directory``, read by the safetensors library."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(os.fspath(directory), "*.safetensors"))):
        state.update(load_file(file))
    return state


def assert_bitwise_equal(got: dict, want: dict, what: str = "state") -> None:
    """Same keys, dtypes, shapes and bytes (NaNs included)."""
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:8]}"
    for key, value in want.items():
        other = got[key]
        assert other.dtype == value.dtype and other.shape == value.shape, \
            f"{what}: {key}: {other.dtype}{list(other.shape)} != {value.dtype}{list(value.shape)}"
        assert torch.equal(other.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), \
            f"{what}: {key} differs"
