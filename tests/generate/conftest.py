import pytest
from tiny_models import save_hf


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(transformers model, saved directory) of a tiny GQA Llama (4 query heads, 2 key/value heads)."""
    directory = tmp_path_factory.mktemp("hf_llama_gen")
    return save_hf("llama", directory), directory
