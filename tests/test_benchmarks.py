"""Smoke tests of the benchmark scripts: each ``main(["--quick", ...])`` runs in-process on
tiny sizes and writes a JSON with every method and finite numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

# slow tier: smoke runs of the benchmark scripts
pytestmark = pytest.mark.slow

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(obj, path="$"):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _check_finite(tree):
    numbers = list(_numbers(tree))
    assert numbers
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:5]


def test_convergence_quick(tmp_path):
    mod = _load("convergence")
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    mod.main(["--quick", "--out", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    assert png.exists() and png.stat().st_size > 0
    (entry,) = data["results"].values()
    assert set(entry["methods"]) == set(mod.METHODS)
    for method, m in entry["methods"].items():
        best = m["best"]
        for key in ("train_s", "s_per_step", "num_params", "final_gap_per_group", "peak_rss_mb_process", "compile_s"):
            assert isinstance(best[key], (int, float)) and math.isfinite(best[key]), (method, key, best[key])
        assert best["steps"] > 0 and best["num_params"] > 0
        assert len(best["curve"]) >= 2
    _check_finite(data["results"])
    assert data["summary"]["pavi_e_num_params"]


def test_encoding_size_quick(tmp_path):
    mod = _load("encoding_size")
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    mod.main(["--quick", "--out", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(r["method"], r["encoding_dim"]) for r in rows} == {(m, d) for m in ("pavi_f", "pavi_e") for d in (4,)}
    for r in rows:
        assert math.isfinite(r["final_gap_per_group"]) and r["num_params"] > 0
    _check_finite(rows)
    # free encodings: N * D parameters
    by = {(r["method"], r["encoding_dim"]): r for r in rows}
    assert by[("pavi_f", 4)]["num_free_encoding_params"] == 200 * 4
    assert by[("pavi_e", 4)]["num_free_encoding_params"] == 0


def test_neuro_quick(tmp_path):
    mod = _load("neuro")
    out = tmp_path / "n.json"
    mod.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["subjects"] for r in rows] == [6, 12]
    for r in rows:
        S, T, V, L, F = r["subjects"], r["sessions"], r["vertices"], r["networks"], r["features"]
        assert r["num_latents"] == L * F + S * L * F + S * T * L * F + S * T * V * F
        assert r["sample_posterior"]["all_finite"]
        assert r["sample_posterior"]["shapes"]["z"] == [S, T, V, F]
        assert r["throughput_latents_steps_per_s"] > 0
        summary = r["posterior_summary"]  # streamed over chunks of 4 subjects
        assert summary["all_finite"] and summary["num_samples"] == 20 and 0 < summary["mean_sd_of_z"] < 1
    # set encodings: guide size does not depend on the number of subjects
    assert rows[0]["num_guide_params"] == rows[1]["num_guide_params"]
    _check_finite(rows)
    _check_finite(data["growth"])


def test_streamed_summary_quick(tmp_path):
    mod = _load("streamed_summary")
    out = tmp_path / "ss.json"
    mod.main(["--quick", "--out", str(out)])
    r = json.loads(out.read_text())["result"]
    assert r["num_latents"] == 300 * 2 + 2 and r["num_chunks"] == 5 and r["all_finite"]
    # 200 steps of a 300-group fit: rough, but the summary must be in the exact posterior's range
    assert r["mu_g_median_mean_error_sd"] < 1.0 and 0.5 < r["mu_g_median_sd_ratio"] < 2.0
    _check_finite(r)


def test_stress_quick(tmp_path):
    mod = _load("stress")
    out = tmp_path / "s.json"
    mod.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    (cell,) = data["cells"]
    assert cell["model"] == "crossed_bernoulli" and cell["flow_layers"] == 1
    _check_finite(data["cells"])
    assert "| crossed_bernoulli | 1 |" in data["table"]


def test_accuracy_quick(tmp_path):
    mod = _load("accuracy")
    out = tmp_path / "a.json"
    mod.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    entry = data["results"]["poisson_glmm"]
    assert set(entry["guides"]) == {"AutoPAVI", "AutoPAVI-set", "AutoNormal"}
    for rows in entry["guides"].values():
        (row,) = rows
        assert 0 <= row["median_mean_error_sd"] <= row["max_mean_error_sd"]
        assert set(row["per_site_median_mean_error_sd"]) == set(entry["sites"])
    _check_finite(entry)


def test_constant_rate_quick(tmp_path):
    mod = _load("constant_rate")
    out = tmp_path / "r.json"
    mod.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    for setting in ("set", "free"):
        methods = data["results"][setting]["methods"]
        assert set(methods) == {"PAVI-stl", "PAVI-reparam", "AutoNormal"}
        for row in methods.values():
            assert len(row["curve"]) == 2 and row["median_mean_error_sd"] >= 0
    _check_finite(data["results"])


def test_model_calls_quick(tmp_path):
    """The guide's passes through the model: ``svi.init`` runs it three times, as for
    AutoNormal (the guide's compiled trace of the init strategy, its setup trace and the
    ELBO's), a training step traces it twice (the guide reads the batch's data)
    plus two per local site on a Laplace base whose likelihood is Gaussian in it (four
    otherwise), and a compiled step never retraces."""
    mod = _load("model_calls")
    out = tmp_path / "m.json"
    mod.main(["--quick", "--out", str(out)])
    rows = json.loads(out.read_text())["guides"]
    assert set(rows) == set(mod.GUIDES)
    for name, row in rows.items():
        assert row["retraces_in_20_steps"] == 0, name
    for name in ("AutoPAVI(laplace=False)", "AutoPAVI(encoding='free', laplace=False)"):
        assert rows[name]["svi_init_model_calls"] == 3 and rows[name]["step_traces"] == 2, rows[name]
    # one local site (b), Gaussian in its likelihood: two more traces per step (the prior
    # location, the one Newton step that is its exact base) and, at setup, eight for the
    # convergence probe (the prior location, the loop's body, the curvature at
    # the mode and one sd away, the model's reference point and one Newton step from it and
    # from the prior location: whether the likelihood is Gaussian in the site; the curvature
    # around the mode, traced though not run for a Gaussian site: plan.warm_start) and two for
    # the guide's first draw; a posterior draw traces the reference point too (its start),
    # and sample_posterior traces one draw once more (three passes) to look for the model's
    # own LAPACK calls before vectorizing the draws (AutoPAVI.draw_batch)
    laplace = rows["AutoPAVI()"]
    assert laplace["svi_init_model_calls"] == 13 and laplace["step_traces"] == 4, laplace
    assert laplace["sample_posterior_model_calls"] == 7, laplace
    assert rows["AutoPAVI(laplace=False)"]["sample_posterior_model_calls"] == 1


@pytest.mark.slow
def test_step_cost_quick(tmp_path):
    """Every guide's step, init and draw costs are measured and finite, ratios against
    AutoNormal's in the same run."""
    mod = _load("step_cost")
    out = tmp_path / "s.json"
    mod.main(["--quick", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["guide"] for r in rows] == mod.DEFAULT_GUIDES.split(",")
    assert set(mod.DEFAULT_GUIDES.split(",")) < set(mod.GUIDES)
    for r in rows:
        assert all(r[k] > 0 for k in ("init_s", "compile_s", "step_ms", "draw_ms")), r
    _check_finite(rows)


@pytest.mark.parametrize(
    "name",
    [
        "convergence",
        "encoding_size",
        "neuro",
        "stress",
        "accuracy",
        "constant_rate",
        "multidevice",
        "streamed_summary",
        "model_calls",
        "step_cost",
        "draw_rate",
    ],
)
def test_help(name, capsys):
    mod = _load(name)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_calibration_quick(tmp_path):
    mod = _load("calibration")
    out = tmp_path / "cal.json"
    mod.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    (row,) = data["calibration"]
    assert row["flagged"] == [] and row["n"] == 2000 and row["p_uniform"] > 0.01
    _check_finite({k: v for k, v in row.items() if k != "flagged"})


def test_crossed_scale_quick(tmp_path):
    mod = _load("crossed_scale")
    out = tmp_path / "s.json"
    mod.main(["--quick", "--cache", str(tmp_path / "ref.npz"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["guides"]) == {"AutoPAVI", "AutoNormal"}
    for g in data["guides"].values():
        (ev,) = g["evals"]
        assert ev["steps"] == 20 and ev["levels_scored"] == 9  # 8 sampled levels and mu
    assert (tmp_path / "ref.npz").exists()
    _check_finite(data["guides"])


def test_time_to_nuts_quick(tmp_path):
    mod = _load("time_to_nuts")
    out = tmp_path / "t.json"
    mod.main(["--quick", "--out", str(out)])
    (entry,) = json.loads(out.read_text())["results"].values()
    assert entry["nuts_s"] > 0 and [e["steps"] for e in entry["evals"]] == [50, 100]
    _check_finite(entry["evals"])
