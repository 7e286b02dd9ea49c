"""Fixtures of the PEFT tests: tiny jaxtune models (see peft_helpers.py for the sizes)."""

import pytest
from peft_helpers import TINY

import jaxtune


@pytest.fixture(scope="session")
def llama():
    return jaxtune.from_hf_config(TINY["llama"], rng=0)


@pytest.fixture(scope="session")
def qwen2():
    return jaxtune.from_hf_config(TINY["qwen2"], rng=1)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """family -> (transformers model, its saved directory), built once per family (tests deep-copy the model:
    PEFT injects its layers into the module it is given)."""
    from tiny_models import save_hf

    made = {}

    def get(family):
        if family not in made:
            d = tmp_path_factory.mktemp(f"peft_hf_{family}")
            made[family] = (save_hf(family, d), d)
        return made[family]

    return get
