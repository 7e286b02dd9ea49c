import pytest
from tiny_models import FAMILIES, save_hf


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def hf_family(request, tmp_path_factory):
    """(family name, transformers model, saved directory) for every supported family."""
    family = request.param
    directory = tmp_path_factory.mktemp(f"hf_{family}")
    model = save_hf(family, directory)
    return family, model, directory
