"""`specray bench serve`'s bookkeeping, without a cluster: the summary of one run, the plot, the
argument checks (the benchmark itself is run by hand, see README)."""

from __future__ import annotations

import pytest

from specray.cluster.bench import serve_bench
from specray.cluster.commands.cli import main


def _counters(segments: int, proposed: int, verified: int, accepted: int) -> dict[str, int]:
    return {
        "segments": segments,
        "proposed_drafts": proposed,
        "verified_drafts": verified,
        "accepted_drafts": accepted,
    }


def test_summary_of_a_run():
    replies = [
        serve_bench._Reply([5, 6, 7, 8], ttft=0.2, latency=1.0, itls=[0.3, 0.25, 0.25]),
        serve_bench._Reply([5, 9], ttft=0.4, latency=0.5, itls=[0.1]),
    ]
    before, after = _counters(10, 30, 20, 5), _counters(14, 42, 26, 7)
    run = serve_bench._summarize("confidence", 2, replies, 2.0, before, after, [[5, 6, 7, 8], [5, 9]])
    assert run.output_tokens_per_s == 3.0 and run.output_tokens == 6 and run.num_requests == 2
    assert run.ttft_p50_s in (0.2, 0.4) and run.itl_p99_s == 0.3
    assert run.per_user_tokens_per_s == pytest.approx((4 / 1.0 + 2 / 0.5) / 2)
    # 4 request-steps verified 6 of the 12 drafts sent and accepted 2: τ = 1.5, budget 2.5 tokens.
    assert run.tau == pytest.approx(1.5)
    assert run.verify_tokens_per_step == pytest.approx(2.5)
    assert run.proposed_tokens_per_step == pytest.approx(3.0)
    assert run.matches_autoregressive
    other = serve_bench._summarize("fixed", 2, replies, 2.0, before, after, [[5, 6, 7, 8], [5, 8]])
    assert not other.matches_autoregressive
    ar = serve_bench._summarize("autoregressive", 2, replies, 2.0, before, _counters(14, 30, 20, 5), None)
    assert ar.tau is None and ar.verify_tokens_per_step == 1.0 and ar.matches_autoregressive


def test_plot_has_one_line_per_mode(tmp_path):
    runs = [
        serve_bench.Run(mode, c, 10.0 * c, 0.1, 0.2, 0.05, 0.1, 5.0, 1.1, 2.0, 3.0, True, 4, 40, 1.0)
        for mode in serve_bench.MODES
        for c in (1, 4)
    ]
    path = tmp_path / "serve.png"
    serve_bench._plot(runs, "tiny", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra", [["--concurrency", "1,8", "--num-prompts", "4"], ["--modes", "fixed,eager"]], ids=["few", "mode"]
)
def test_bad_arguments_exit_2(tmp_path, extra, capsys):
    assert main(["bench", "serve", "--json", str(tmp_path / "out.json"), *extra]) == 2
    assert "error" in capsys.readouterr().err
