"""bench/report.py's ratios: the headline figures bench/serve.py prints, from its measured runs."""

from bench.report import ratios


def _dres(p50_at_1: float, raw_bs1: float) -> dict:
    run = {"pairs_per_s": 10.0, "p50_ms": 500.0, "mean_batch_size": 8.0}
    return {
        "raw": {"best_pairs_per_s": 12.0, "by_batch_size": [{"batch_size": 1, "pairs_per_s": raw_bs1},
                                                            {"batch_size": 8, "pairs_per_s": 12.0}]},
        "systems": {
            "rewardserve-http": {"runs": {"1": {"pairs_per_s": 5.0, "p50_ms": p50_at_1}, "32": run}},
            "rewardserve-grpc": {"runs": {"32": run}},
            "naive-async": {"runs": {"32": {"pairs_per_s": 8.0}}},
        },
    }


def test_idle_latency_is_p50_at_one_client_over_the_bare_forward():
    out = ratios(_dres(p50_at_1=120.0, raw_bs1=10.0), 32)  # forward: 100 ms per input at batch size 1
    assert out["idle_latency_vs_forward"] == 1.2
    assert out["server_vs_raw"] == round(10.0 / 12.0, 3) and out["server_vs_naive"] == 1.25


def test_idle_latency_is_none_without_a_one_client_run():
    dres = _dres(120.0, 10.0)
    del dres["systems"]["rewardserve-http"]["runs"]["1"]
    assert ratios(dres, 32)["idle_latency_vs_forward"] is None
