"""The error every data problem raises (corpus, tokenizer or batching)."""


class DataError(ValueError):
    """A corpus, tokenizer or batching problem, with a one-sentence message saying how to fix it."""
