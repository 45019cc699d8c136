"""`specray bench serve`'s bookkeeping, without a cluster: the summary of one run, the table with
cluster ÷ engine, the plot, the argument checks (the benchmark itself is run by hand, see README)."""

from __future__ import annotations

import dataclasses

import pytest

from specray.cluster.bench import serve_bench
from specray.cluster.bench.request_timing import RequestTiming
from specray.cluster.bench.serve_bench import CLUSTER, ENGINE
from specray.cluster.bench.step_counters import StepCounters
from specray.cluster.commands.cli import main


def test_summary_of_a_run():
    replies = [
        RequestTiming([5, 6, 7, 8], ttft=0.2, latency=1.0, itls=[0.3, 0.25, 0.25]),
        RequestTiming([5, 9], ttft=0.4, latency=0.5, itls=[0.1]),
    ]
    before, after = StepCounters(10, 30, 20, 5, 7), StepCounters(14, 42, 26, 7, 11)
    steps = after.since(before)
    run = serve_bench._summarize("confidence", 2, replies, 2.0, steps, [[5, 6, 7, 8], [5, 9]])
    assert run.output_tokens_per_s == 3.0 and run.output_tokens == 6 and run.num_requests == 2
    assert run.ttft_p50_s in (0.2, 0.4) and run.itl_p99_s == 0.3
    assert run.per_user_tokens_per_s == pytest.approx((4 / 1.0 + 2 / 0.5) / 2)
    # 4 request-steps verified 6 of the 12 drafts sent and accepted 2: τ = 1.5, budget 2.5 tokens.
    assert run.tau == pytest.approx(1.5)
    assert run.verify_tokens_per_step == pytest.approx(2.5)
    assert run.proposed_tokens_per_step == pytest.approx(3.0)
    # 4 decode request-steps and 2 prefills in 4 forwards: 1.5 requests per step.
    assert run.batch_size == pytest.approx(1.5)
    assert run.matches_autoregressive
    other = serve_bench._summarize("fixed", 2, replies, 2.0, steps, [[5, 6, 7, 8], [5, 8]])
    assert not other.matches_autoregressive
    ar = serve_bench._summarize(
        "autoregressive", 2, replies, 2.0, StepCounters(14, 30, 20, 5, 11).since(before), None
    )
    assert ar.tau is None and ar.verify_tokens_per_step == 1.0 and ar.matches_autoregressive
    # The engine reference counts no proposals: its row says so rather than showing a zero.
    engine = serve_bench._summarize("fixed", 2, replies, 2.0, StepCounters(4, None, 6, 2, 3), None, ENGINE)
    assert engine.runs_on == ENGINE and engine.proposed_tokens_per_step is None
    assert engine.tau == pytest.approx(1.5)


def _runs() -> list[serve_bench.Run]:
    runs = []
    for mode in serve_bench.MODES:
        for c in (1, 4):
            engine = serve_bench.Run(
                mode, c, 10.0 * c, 0.1, 0.2, 0.05, 0.1, 5.0, 1.1, 2.0, 0.9 * c, None, True, 4, 40, 1.0
            )
            cluster = dataclasses.replace(
                engine, output_tokens_per_s=8.0 * c, proposed_tokens_per_step=3.0, runs_on=CLUSTER
            )
            cluster.cluster_over_engine, cluster.ttft_over_engine = 0.8, 1.2
            runs += [dataclasses.replace(engine, runs_on=ENGINE), cluster]
    return runs


def test_plot_shows_cluster_and_engine_per_mode(tmp_path):
    path = tmp_path / "serve.png"
    serve_bench._plot(_runs(), "tiny", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_prints_cluster_over_engine_per_concurrency(capsys):
    serve_bench._print_table(_runs())
    out = capsys.readouterr().out
    summary = out[out.index("cluster_over_engine") :].splitlines()
    assert summary[1].split() == ["mode", "c=1", "c=4"], f"no column per concurrency: {summary[1]!r}"
    assert [line.split() for line in summary[2:]] == [[mode, "0.80", "0.80"] for mode in serve_bench.MODES]


@pytest.mark.parametrize(
    "extra", [["--concurrency", "1,8", "--num-prompts", "4"], ["--modes", "fixed,eager"]], ids=["few", "mode"]
)
def test_bad_arguments_exit_2(tmp_path, extra, capsys):
    assert main(["bench", "serve", "--json", str(tmp_path / "out.json"), *extra]) == 2
    assert "error" in capsys.readouterr().err
