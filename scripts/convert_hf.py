"""Convert checkpoints between Hugging Face (Mixtral, Qwen3-MoE, DeepSeek-V3) and moejax.

    python scripts/convert_hf.py to-moejax HF_DIR OUT_DIR [precision.param_dtype=bfloat16 ...]
    python scripts/convert_hf.py to-hf MOEJAX_DIR HF_DIR --architecture DeepseekV3ForCausalLM

HF_DIR is a local checkpoint directory (config.json and safetensors files; DeepSeek's block-fp8
release is dequantised, its MTP layers are kept unless model.mtp_depth=0 is given). A moejax
directory holds config.yaml and safetensors files named by parameter path, one tensor per layer
of each parameter ("moe_blocks.3.ffn.w_gate" [E, D, F]), plus the router state (DeepSeek's
e_score_correction_bias lives there); moejax.convert.load_moejax(dir) loads it, the parameters
carrying the router state. It stores no optimizer state. The precision follows the HF
checkpoint's dtype unless overridden (precision.compute_dtype=bfloat16). Errors print one line
and exit with status 2.
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
    from moejax.convert import SUPPORTED_ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_moejax = commands.add_parser("to-moejax", help="Hugging Face checkpoint -> moejax")
    to_moejax.add_argument("hf_dir", type=Path)
    to_moejax.add_argument("out_dir", type=Path)
    to_moejax.add_argument("overrides", nargs="*", help="dotted moejax config overrides, "
                           "e.g. precision.param_dtype=bfloat16")
    to_hf = commands.add_parser("to-hf", help="moejax -> Hugging Face checkpoint")
    to_hf.add_argument("moejax_dir", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--architecture", required=True, choices=SUPPORTED_ARCHITECTURES)
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="tensor dtype of the checkpoint (default: the parameters' dtype)")
    return parser.parse_args(argv)


def _refuse_non_empty(directory: Path) -> None:
    from moejax.convert import ConversionError

    if directory.exists() and any(directory.iterdir()):
        raise ConversionError(f"{directory} is not empty: give a new or empty output directory.")


def main(argv=None) -> int:
    args = parse_args(argv)
    from moejax.config import ConfigError
    from moejax.convert import ConversionError, load_hf, load_moejax, save_hf, save_moejax

    try:
        _refuse_non_empty(args.out_dir)
        if args.command == "to-moejax":
            cfg, params = load_hf(args.hf_dir, overrides=args.overrides)
            files = save_moejax(cfg, params, args.out_dir)  # the router state travels in params
        else:
            cfg, params = load_moejax(args.moejax_dir)
            files = save_hf(cfg, params, args.out_dir, args.architecture, dtype=args.dtype)
    except (ConversionError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} safetensors file(s) and the config to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
