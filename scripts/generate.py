"""Generate text from a moejax model with a KV cache.

    python scripts/generate.py RUN_DIR --prompt "def " --max-new-tokens 200
    python scripts/generate.py RUN_DIR --prompt "def " --temperature 0.8 --top-p 0.95 --seed 1
    python scripts/generate.py HF_DIR --prompt-ids "1 2 3"
    python scripts/generate.py RUN_DIR --prompt "def " --speculative mtp

The model comes from a training run directory (its latest checkpoint, or RUN_DIR/checkpoints/STEP
for another one), a moejax checkpoint (scripts/convert_hf.py to-moejax) or a Hugging Face
checkpoint directory (config.json). Temperature 0 (the default) is greedy; --seed S samples with
jax.random.key(S). The text goes to stdout, prompt included: decoded bytes for the byte-level
vocabulary (256 tokens), decoded text when a tokenizer.json sits beside the checkpoint and the
`tokenizers` package is installed, token ids otherwise. --speculative mtp drafts with the
model's multi-token-prediction modules and verifies the drafts with the main model (greedy: the
same text; sampling: the same distribution) and reports the drafts accepted on stderr. Errors
print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import moejax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="training run directory, moejax checkpoint or Hugging Face checkpoint")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt token ids, separated by spaces or commas")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling key jax.random.key(SEED)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt")
    parser.add_argument("--speculative", choices=["mtp"], default=None,
                        help="speculative decoding, drafts from the model's MTP modules")
    return parser.parse_args(argv)


def prompt_tokens(args, tokenizer) -> list[int]:
    from moejax.generate import GenerationError

    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise GenerationError(f"--prompt-ids {args.prompt_ids!r} is not a list of integers: "
                                  "give token ids separated by spaces or commas.") from None
    if tokenizer is None:
        raise GenerationError("this model has no byte-level vocabulary and no usable "
                              "tokenizer.json beside it (or the tokenizers package is missing): "
                              "give the prompt as --prompt-ids.")
    ids = [int(t) for t in tokenizer.encode(args.prompt)]
    if not ids:
        raise GenerationError("the prompt is empty: give at least one character or token id.")
    return ids


def render(tokens, tokenizer) -> str:
    """One sequence as text, or as its token ids when there is no tokenizer."""
    if tokenizer is None:
        return " ".join(str(int(t)) for t in tokens)
    return tokenizer.decode(tokens)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from moejax.config import ConfigError
    from moejax.convert import ConversionError
    from moejax.data import DataError
    from moejax.generate import (
        GenerationError,
        find_tokenizer,
        generate,
        load_model,
        speculative_generate,
    )

    try:
        if args.num_samples < 1:
            raise GenerationError(f"--num-samples={args.num_samples} must be at least 1.")
        model = load_model(args.checkpoint)
        tokenizer = find_tokenizer(model.cfg, model.directory)
        prompt = np.tile(np.asarray(prompt_tokens(args, tokenizer), np.int64),
                         (args.num_samples, 1))
        print(f"generating from {model.description}", file=sys.stderr)
        request = {"key": jax.random.key(args.seed), "temperature": args.temperature,
                   "top_p": args.top_p}
        if args.speculative:
            tokens, stats = speculative_generate(model.params, model.cfg, prompt,
                                                 args.max_new_tokens, method=args.speculative,
                                                 **request)
            print(f"speculative decoding: {stats.accepted} of {stats.drafted} drafts accepted "
                  f"({stats.acceptance_rate:.0%}), {stats.tokens_per_step:.2f} tokens per "
                  "verification step", file=sys.stderr)
        else:
            tokens = generate(model.params, model.cfg, prompt, args.max_new_tokens, **request)
    except (GenerationError, ConversionError, ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for index, row in enumerate(np.asarray(tokens)):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        print(render(row, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
