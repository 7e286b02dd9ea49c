import pytest
from tiny_models import save_hf

from jaxtune import demo


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    """A tiny Llama with the demo's character tokenizer and chat template saved beside it (tests copy it
    before changing anything in it)."""
    directory = tmp_path_factory.mktemp("board_chat_model")
    save_hf("llama", directory)
    demo.char_tokenizer().save_pretrained(directory)
    return directory
