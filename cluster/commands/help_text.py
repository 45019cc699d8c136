"""Help texts several commands share, kept free of heavy imports (the CLI's `--help` reads them)."""

DRAFTER_HELP = (
    "none (autoregressive), ngram (prompt lookup), a bundled trained drafter (smollm2-135m-dspark) "
    "or a trained drafter's directory"
)
