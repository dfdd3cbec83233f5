"""labkit.search: the Pareto front against brute force and Optuna, a resumable study that loses no
finished trial, dominance, quantization modes and mixed precision read back from the file, one
cached search point on a tiny model, and bad settings (seconds)."""
import numpy as np
import optuna
import pandas as pd
import pytest
from ai_edge_litert.interpreter import Interpreter

from labkit import measure, search


# ----------------------------------------------------------------------------- the Pareto front

def brute_force_front(values):
    n = len(values)
    dominated = [any(np.all(values[j] <= values[i]) and np.any(values[j] < values[i]) for j in range(n) if j != i)
                 for i in range(n)]
    return ~np.array(dominated)


@pytest.mark.parametrize("seed", range(4))
def test_front_is_non_dominated_and_complete(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, (60, 3)).astype(float)   # small integers: many ties and duplicates
    mask = search.non_dominated(values)
    np.testing.assert_array_equal(mask, brute_force_front(values))
    front, rest = values[mask], values[~mask]
    for p in front:   # nothing dominates a front point
        assert not np.any(np.all(values <= p, axis=1) & np.any(values < p, axis=1))
    for p in rest:    # every other point is dominated by a front point
        assert np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1))


def test_pareto_front_senses_and_feasibility():
    two = {"gzip_bytes": "min", "latency_p50_us": "min"}
    table = pd.DataFrame({"gzip_bytes": [10, 20, 30, 5, 25], "latency_p50_us": [30, 20, 10, 1, 25],
                          "val_accuracy": [0.98, 0.98, 0.98, 0.5, 0.99], "feasible": [True, True, True, False, True]})
    assert sorted(search.pareto_front(table, two).index) == [0, 1, 2]
    assert list(search.pareto_front(table, two, feasible_only=False).index) == [3]
    # with accuracy maximised too, row 4 (dominated on size and latency by row 1) is the most accurate
    assert sorted(search.pareto_front(table).index) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="'max' or 'min'"):
        search.pareto_front(table, {"gzip_bytes": "smallest"})
    with pytest.raises(ValueError, match="2-D"):
        search.non_dominated(np.ones(3))


def test_dominance():
    found = pd.DataFrame({"accuracy": [0.99, 0.98], "gzip_bytes": [10, 5], "latency_p50_us": [20, 5]},
                         index=["a", "b"])
    made = pd.DataFrame({"accuracy": [0.99, 0.985], "gzip_bytes": [40, 40], "latency_p50_us": [70, 70]},
                        index=["x", "y"])
    pairs = search.dominance(found, made).set_index(["found", "hand_made"])
    assert pairs.loc[("a", "x"), "dominates"] and pairs.loc[("a", "x"), "better_on"] == 2   # tie on accuracy
    assert pairs.loc[("a", "y"), "better_on"] == 3
    assert not pairs.loc[("b", "x"), "dominates"] and pairs.loc[("b", "x"), "worse_on"] == 1
    summary = search.dominance_summary(pairs.reset_index())
    assert summary.loc["a", "dominates_all"] and not summary.loc["b", "dominates_all"]
    covered = search.coverage(pairs.reset_index())
    assert covered.to_dict() == {"x": "a", "y": "a"}


# ----------------------------------------------------------------------------- the study

SPACE = search.SearchSpace(model=("m",), sparsity=(0.0, 0.5, 0.9), clusters=(0, 16), quantization=("int8", "float16"))


def fake_evaluate(settings):
    """A deterministic stand-in for a build: sparsity and clusters shrink the file and cost accuracy."""
    size = 1000 * (1 - settings.sparsity) * (0.5 if settings.clusters else 1)
    size *= 2 if settings.quantization == "float16" else 1
    latency = 50 if settings.quantization == "int8" else 80
    accuracy = 0.99 - 0.02 * settings.sparsity - 0.005 * bool(settings.clusters)
    return {"val_accuracy": accuracy, "gzip_bytes": size, "latency_p50_us": latency, "name": settings.name}


def test_our_front_matches_optuna_and_respects_the_floor(tmp_path):
    study = search.open_study("front", f"sqlite:///{tmp_path / 's.db'}")
    search.optimize(study, fake_evaluate, 10, accuracy_floor=0.975, space=SPACE, progress=False)
    trials = search.trials_table(study)
    assert len(trials) == 10
    front = search.pareto_front(trials)
    assert sorted(front.index) == sorted(t.number for t in study.best_trials)
    assert (front["val_accuracy"] >= 0.975).all()
    assert set(trials.loc[~trials["feasible"], "sparsity"]) <= {0.9}   # only the 0.9 points fall below


def test_interrupted_search_loses_no_finished_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    calls = []

    def flaky(settings):
        calls.append(settings)
        if len(calls) == 4:
            raise KeyboardInterrupt   # Ctrl-C in the middle of the fourth trial
        return fake_evaluate(settings)

    study = search.open_study("resume", storage)
    with pytest.raises(KeyboardInterrupt):
        search.optimize(study, flaky, 8, accuracy_floor=0.9, space=SPACE, progress=False)
    before = {t.number: (t.params, t.values) for t in search.finished(study)}
    assert len(before) == 3

    orphan = study.ask()   # a trial another crash left RUNNING
    reopened = search.open_study("resume", storage)
    states = {t.number: t.state for t in reopened.get_trials()}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()

    search.optimize(reopened, fake_evaluate, 8, accuracy_floor=0.9, space=SPACE, progress=False)
    after = {t.number: (t.params, t.values) for t in search.finished(reopened)}
    assert len(after) == 8
    assert all(after[n] == before[n] for n in before), "a finished trial changed on resume"
    # asking again for 8 finished trials runs nothing more
    search.optimize(reopened, lambda s: pytest.fail("no trial should run"), 8, 0.9, SPACE, progress=False)


@pytest.mark.parametrize("floor", [1.01, -0.1, 2, True, "0.9"])
def test_bad_floor(floor, tmp_path):
    with pytest.raises(ValueError, match="accuracy_floor"):
        search.check_floor(floor)
    study = search.open_study("bad", f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(ValueError, match="accuracy_floor"):
        search.optimize(study, fake_evaluate, 2, accuracy_floor=floor, space=SPACE, progress=False)
    assert not search.finished(study)


def test_bad_settings(tiny_model, splits):
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n_trials"):
            search.check_budget(bad)
    with pytest.raises(ValueError, match="quantization"):
        search.Settings(quantization="int4")
    with pytest.raises(ValueError, match="sparsity"):
        search.Settings(sparsity=1.0)
    with pytest.raises(ValueError, match="clusters"):
        search.Settings(clusters=1)
    with pytest.raises(ValueError, match="not among the parents"):
        search.build(search.Settings(model="other"), {"tiny": tiny_model}, splits)
    with pytest.raises(ValueError, match="not among the parents"):
        search.run_search({"tiny": tiny_model}, splits, n_trials=1, space=search.SearchSpace(model=("other",)))
    with pytest.raises(ValueError, match="mode"):
        search.converter(tiny_model, "int4")
    with pytest.raises(ValueError, match="calibration"):
        search.converter(tiny_model, "int8")


# ----------------------------------------------------------------------------- quantization read back

def test_modes_and_mixed_precision(tiny_model, splits, tmp_path):
    layers = search.weight_layers(tiny_model)
    calibration = splits.x_train[:50]
    expected = {"float32": "float32", "float16": "float16", "dynamic": "int8", "int8": "int8"}
    for mode, dtype in expected.items():
        path = search.write(search.converter(tiny_model, mode, calibration if mode == "int8" else None),
                            tmp_path / f"{mode}.tflite")
        precisions = search.op_precisions(path, layers)
        assert sorted(precisions.index) == sorted(layers)
        # dynamic range leaves tiny kernels (conv1 has 36 weights) in float: check the large ones
        big = ["dense1"] if mode == "dynamic" else layers
        assert set(precisions.loc[big, "weights"]) == {dtype}, (mode, precisions)

    debug, stats = search.debugger(tiny_model, calibration)
    assert set(stats["layer"]) - {""} == set(layers)
    # the trap: a Keras name is not a node name, and the denylist ignores it silently
    naive = search.write(search.denylist(debug, ["logits"]), tmp_path / "naive.tflite")
    assert set(search.op_precisions(naive, layers)["weights"]) == {"int8"}
    mixed = search.mixed_tflite(tiny_model, calibration, ["conv1", "logits"], tmp_path / "mixed.tflite")
    precisions = search.op_precisions(mixed, layers)
    assert precisions.loc[["conv1", "logits"], "weights"].tolist() == ["float32", "float32"]
    assert precisions.loc[["conv2", "dense1"], "weights"].tolist() == ["int8", "int8"]
    # the mixed model still computes the same function, within int8 error
    ref = tiny_model.predict(splits.x_val[:200], verbose=0).argmax(1)
    agree = np.mean(measure.litert(mixed)(splits.x_val[:200]).argmax(1) == ref)
    assert agree > 0.9, agree
    with pytest.raises(ValueError, match="no conv or fully-connected op"):
        search.nodes_of(stats, ["dense9"])


def test_fragile_layers_rule():
    table = pd.DataFrame({"gain": [0.0, 0.002, 0.002, -0.001], "rmse_in_steps": [0.5, 0.3, 0.4, 0.9]},
                         index=["a", "b", "c", "d"])
    assert search.fragile_layers(table, 2) == ["c", "b"]   # gains first, error breaks the tie
    assert search.fragile_layers(table, 1) == ["c"]
    no_gain = table.assign(gain=0.0)
    assert search.fragile_layers(no_gain) == ["d"]          # nothing gains: the largest error
    with pytest.raises(ValueError, match="max_layers"):
        search.fragile_layers(table, 0)


# ----------------------------------------------------------------------------- one search point

def dense_weights(path):
    with_interp = Interpreter(model_path=str(path))
    with_interp.allocate_tensors()
    details = {t["index"]: t for t in with_interp.get_tensor_details()}
    for op in with_interp._get_ops_details():
        if op["op_name"] == "FULLY_CONNECTED" and "/dense1/" in details[op["inputs"][1]]["name"]:
            return with_interp.get_tensor(op["inputs"][1])
    raise AssertionError("no dense1 op")


def test_build_prunes_clusters_quantizes_and_caches(tiny_model, splits, tmp_path):
    settings = search.Settings(model="tiny", sparsity=0.5, clusters=8, quantization="int8")
    plan = search.FineTune(train_subset=256)
    parents = {"tiny": tiny_model}
    assert search.prunable(tiny_model) == ["dense1"]   # 392 x 16 weights; the rest are below the threshold
    built = search.build(settings, parents, splits, plan, directory=tmp_path)
    assert built["build_seconds"] > 0 and 0 <= built["val_accuracy"] <= 1
    w = dense_weights(built["artifact"])
    assert w.dtype == np.int8
    sparsity = np.mean(w == 0)
    assert 0.45 <= sparsity <= 0.6, f"dense1 sparsity {sparsity:.3f} in the file"
    # per output channel, 8 shared values (zero among them) become at most 8 int8 codes
    assert max(len(np.unique(row)) for row in w) <= 8
    again = search.build(settings, parents, splits, plan, directory=tmp_path)
    assert again["build_seconds"] == 0.0 and again["val_accuracy"] == built["val_accuracy"]
    assert again["artifact"] == built["artifact"]
