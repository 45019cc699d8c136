"""`specray generate`: stream one completion from the single-process engine and report its speed."""

from __future__ import annotations

import argparse
import sys
import time

from specray.cluster.commands.help_text import DRAFTER_HELP
from specray.defaults import DEFAULT_MODEL, default_drafter
from specray.workers.models.dtype import DTYPE_CHOICES


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="sent as one user message through the chat template")
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as raw text, without the chat template"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged name, .gguf file or HF directory")
    p.add_argument(
        "--drafter",
        help=f"{DRAFTER_HELP} (default: {default_drafter(DEFAULT_MODEL)} for the default model, else ngram)",
    )
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=5, help="γ: drafts per step")
    p.add_argument(
        "--scheduling",
        choices=("confidence", "fixed", "off"),
        default="confidence",
        help="drafts per step: confidence (DSpark Algorithm 1), fixed (all γ) or off (autoregressive)",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 where fast, else fp32")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specray.workers.drafters.registry import build_drafter, check_num_speculative_tokens
    from specray.workers.engine.config import EngineConfig
    from specray.workers.engine.llm_engine import LLMEngine
    from specray.workers.engine.sampling import SamplingParams
    from specray.workers.models.loader import load_model

    target = load_model(args.model, args.dtype)
    args.drafter = args.drafter or default_drafter(args.model)
    check_num_speculative_tokens(args.drafter, args.num_speculative_tokens)
    drafter = build_drafter(args.drafter, target)
    engine = LLMEngine(
        target,
        drafter,
        EngineConfig(num_speculative_tokens=args.num_speculative_tokens, scheduling=args.scheduling),
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.raw:
        prompt_ids = engine.encode_prompt(prompt=args.prompt)
    else:
        prompt_ids = engine.encode_prompt(messages=[{"role": "user", "content": args.prompt}])
    seq = engine.add_request(prompt_ids, params)
    shown = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        text = engine.output_text(seq)
        # Hold back a trailing partial UTF-8 character until the next token completes it.
        visible = len(text) - 1 if text.endswith("\ufffd") else len(text)
        sys.stdout.write(text[shown:visible])
        sys.stdout.flush()
        shown = max(shown, visible)
    elapsed = time.perf_counter() - start
    n = len(seq.output_ids)
    print(
        f"\n\n[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s | drafter {args.drafter} | "
        f"steps {seq.stats.verify_steps} | τ {seq.stats.tau:.2f} | finish {seq.finish_reason}]",
        file=sys.stderr,
    )
    return 0
