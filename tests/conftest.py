import pytest
import torch
from hypothesis import settings

from kvevict.models import TINY_FAMILIES, tiny_model, tiny_tokenizer

# Property tests: a fixed set of trials by default (the same in every run, fast enough for CI); "thorough"
# draws ten times more, fresh each run.
settings.register_profile("kvevict", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile("kvevict")


@pytest.fixture(params=TINY_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tok():
    return tiny_tokenizer()


def left_padded_batch(lengths, vocab=300, seed=0):
    """Random ids for prompts of the given lengths, left-padded (pad id 0) into one batch."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.fixture
def llama():
    return tiny_model("llama")
