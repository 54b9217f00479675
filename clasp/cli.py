"""Command line: `python -m clasp generate ...` and `python -m clasp setup`."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys

import torch

from clasp.config import (DRAFT_DTYPE_CHOICES, DRAFT_KERNEL_HELP, DRAFT_KERNELS, FP32_KERNEL_HELP, FP32_KERNELS, FUSED_DRAFT, FUSED_DRAFT_HELP, MODES, PACK_WEIGHTS, PACK_WEIGHTS_HELP,
                          ClaspConfig, SamplingParams)

DEFAULTS = ClaspConfig()


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clasp", description=(
        "CLaSp: lossless self-speculative decoding that drafts with a layer-skipped copy of the model "
        "and verifies with the full model."))
    sub = parser.add_subparsers(dest="command", required=True)

    setup = sub.add_parser("setup", help="convert the embedded SmolLM2-135M-Instruct GGUF to the safetensors cache")
    setup.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    sub.add_parser("build-kernels", help="compile the C++ CPU draft kernel into the cache directory (once, about a "
                   "minute); skipped with a note where it cannot be built (not x86-64 Linux, no compiler)")

    gen = sub.add_parser("generate", help="generate text for one prompt", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = gen.add_argument_group("input")
    g.add_argument("--prompt", default="-", help="prompt text; '-' reads standard input")
    g.add_argument("--raw", action="store_true", help="tokenize the prompt as is, without the model's chat template")
    g = gen.add_argument_group("model")
    g.add_argument("--model", default=None, help="local Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3); "
                   "default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--pack-weights", choices=list(PACK_WEIGHTS), default="auto", help=PACK_WEIGHTS_HELP)
    g.add_argument("--fused-draft", choices=list(FUSED_DRAFT), default="auto", help=FUSED_DRAFT_HELP)
    g.add_argument("--draft-kernel", choices=("auto",) + DRAFT_KERNELS, default="auto", help=DRAFT_KERNEL_HELP)
    g.add_argument("--fp32-kernel", choices=("auto",) + FP32_KERNELS, default="auto", help=FP32_KERNEL_HELP)
    g = gen.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (exact); > 0 samples, losslessly")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g = gen.add_argument_group("speculation")
    g.add_argument("--mode", choices=MODES, default=DEFAULTS.mode,
                   help="ar: plain decoding; clasp: DP-planned skip sets; static: a fixed skip set")
    g.add_argument("--num-skip-layers", type=int, default=None,
                   help=f"M, layers skipped while drafting (default: {DEFAULTS.copied_draft_skip_ratio * 100:.0f}%% of the layers with a "
                        f"half-precision draft copy, {DEFAULTS.shared_draft_skip_ratio * 100:.0f}%% when the draft shares the weights)")
    g.add_argument("--max-draft-length", type=int, default=DEFAULTS.max_draft_length, help="K, tokens drafted per round at most")
    g.add_argument("--draft-exit-threshold", type=float, default=DEFAULTS.draft_exit_threshold,
                   help="stop drafting when the draft's top probability falls below this")
    g.add_argument("--replan-interval", type=int, default=DEFAULTS.replan_interval, help="LOI: re-run the DP every N rounds that draft with the model (plain and n-gram rounds do not count)")
    g.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft up to K with the model (default: choose each round's draft source and length "
                        "from measured costs, and decode plainly while drafting does not pay)")
    g.add_argument("--adaptive-skip", action="store_true",
                   help="adaptive M: with --mode clasp, adaptive and M > 0, choose each round's skip count among M, "
                        "3M/4, M/2, M/4 and, with a draft copy, 0, by measured tokens per second (default: always M)")
    g.add_argument("--ngram-size", type=int, default=DEFAULTS.ngram_size,
                   help="longest context n-gram for prompt-lookup drafts in adaptive mode; 0 disables them")
    g.add_argument("--skip-layers", type=_layer_list, default=None, help="static mode's skip set, e.g. 4,8,12 (0-based)")
    g.add_argument("--draft-dtype", default=DEFAULTS.draft_dtype, choices=DRAFT_DTYPE_CHOICES,
                   help="dtype of the draft's weight copy ('none' shares the full weights); verification always uses the model dtype")
    g = gen.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, accepted_lengths, plans, seconds, stats)")
    g.add_argument("--stats", action="store_true", help="after streamed text, print speculation statistics to stderr")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from clasp.engine import Engine

    hf_logging.disable_progress_bar()  # loading takes under a second; keep the terminal clean

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ClaspConfig(
        mode=args.mode, num_skip_layers=args.num_skip_layers, max_draft_length=args.max_draft_length,
        draft_exit_threshold=args.draft_exit_threshold, replan_interval=args.replan_interval,
        adaptive=args.adaptive, adaptive_skip=args.adaptive_skip, ngram_size=args.ngram_size,
        static_skip_set=args.skip_layers, draft_dtype=None if args.draft_dtype == "none" else args.draft_dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = Engine.load(args.model, config, device=args.device, dtype=args.dtype,
                         pack_weights=PACK_WEIGHTS[args.pack_weights], fused_draft=FUSED_DRAFT[args.fused_draft],
                         draft_kernel=None if args.draft_kernel == "auto" else args.draft_kernel,
                         fp32_kernel=None if args.fp32_kernel == "auto" else args.fp32_kernel)
    prompt_ids = engine.encode(prompt, chat=not args.raw)
    result = None
    for chunk in engine.stream(prompt_ids, params):
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        result = chunk.result
    if args.json:
        out = result.to_dict()
        out.update(mode=config.mode, model=engine.model_name)
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        if args.stats:
            s = result.stats
            print(f"[{len(result.token_ids)} tokens in {result.seconds:.2f} s, "
                  f"{len(result.token_ids) / result.seconds:.1f} tok/s, mean accepted length "
                  f"{s.mean_accepted_length:.2f}, acceptance {s.acceptance_rate:.2f}, finish {result.finish_reason}]",
                  file=sys.stderr)
    return 0


def _build_kernels() -> int:
    from clasp import cpu_draft

    reason = cpu_draft.unavailable_reason()
    if reason is not None:
        print(f"CPU draft kernel skipped: {reason}; drafts run through torch ops", file=sys.stderr)
        return 0
    if not any(cpu_draft.build_dir().glob("*.so")):
        print(f"building the CPU draft kernel in {cpu_draft.build_dir()} (about a minute)", file=sys.stderr)
    try:
        ext = cpu_draft.load_extension()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    current = cpu_draft.build_dir()
    for old in current.parent.glob("cpu_draft-*"):  # builds of earlier sources or torch versions
        if old != current and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    print(f"CPU draft kernel ready: {current} (instruction sets this CPU runs: {', '.join(cpu_draft.supported_isas())})")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "setup":
            from clasp.loading import cache_dir, EMBEDDED_MODEL_NAME, convert_gguf, embedded_gguf_path, embedded_model_dir
            target = cache_dir() / EMBEDDED_MODEL_NAME
            if args.force or not (target / "config.json").exists():
                convert_gguf(embedded_gguf_path(), target)
            print(embedded_model_dir(convert=False))
            return 0
        if args.command == "build-kernels":
            return _build_kernels()
        return _generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
