"""labkit.search: the front (feasible trials on results.pareto_front) against Optuna's, a resumable
study that loses no finished trial, dominance, bad settings and spaces, and one cached search point
on a tiny model composed from pruning, clustering and the converter (a different parent, a
different entry) (seconds)."""
import numpy as np
import optuna
import pandas as pd
import pytest

from labkit import models, results, search, tflite

# -------------------------------------------------------------------------- the front and dominance

def test_front_keeps_feasible_rows_and_reads_the_senses():
    table = pd.DataFrame({"gzip_bytes": [10, 20, 30, 5, 25], "latency_p50_us": [30, 20, 10, 1, 25],
                          "val_accuracy": [0.98, 0.98, 0.98, 0.5, 0.99],
                          "feasible": [True, True, True, False, True]})
    two = (("gzip_bytes", "min"), ("latency_p50_us", "min"))
    # row 3 dominates every other row on size and latency, but it is below the floor
    assert list(search.front(table, two).index) == [2, 1, 0]   # sorted by the second objective
    # with accuracy maximised too, row 4 (dominated on size and latency
    # by row 1) is the most accurate
    assert sorted(search.front(table).index) == [0, 1, 2, 4]
    assert search.front(table.assign(feasible=False)).empty
    assert search.front(pd.DataFrame()).empty


def test_dominance():
    found = pd.DataFrame({"val_accuracy": [0.99, 0.98, 0.99], "gzip_bytes": [10, 5, 40],
                          "latency_p50_us": [20, 5, 60]},
                         index=["a", "b", "c"])
    made = pd.DataFrame({"val_accuracy": [0.99, 0.985], "gzip_bytes": [40, 40],
                         "latency_p50_us": [70, 70]},
                        index=["x", "y"])
    pairs = search.dominance(found, made).set_index(["found", "hand_made"])
    # tie on accuracy
    assert pairs.loc[("a", "x"), "dominates"] and pairs.loc[("a", "x"), "better_on"] == 2
    assert pairs.loc[("a", "y"), "better_on"] == 3
    assert not pairs.loc[("b", "x"), "dominates"] and pairs.loc[("b", "x"), "worse_on"] == 1
    # Pareto dominance, not "better on two": equal on two objectives and better on one is enough
    assert pairs.loc[("c", "x"), "dominates"] and pairs.loc[("c", "x"), "better_on"] == 1
    summary = search.dominance_summary(pairs.reset_index())
    assert summary.loc["a", "dominates_all"] and not summary.loc["b", "dominates_all"]
    covered = search.coverage(pairs.reset_index())
    assert covered.to_dict() == {"x": "a, c", "y": "a, c"}


def test_dominance_is_the_pareto_fronts_definition():
    """One definition in notebooks 07 and 08: a dominates b exactly when b is off
    results.pareto_front of {a, b}."""
    rng = np.random.default_rng(0)
    points = pd.DataFrame({"val_accuracy": rng.choice([0.98, 0.99], 40),
                           "gzip_bytes": rng.choice([10, 20], 40),
                           "latency_p50_us": rng.choice([5.0, 7.0], 40)})
    pairs = search.dominance(points, points)
    for _, pair in pairs.iterrows():
        two = points.loc[[pair["found"], pair["hand_made"]]].reset_index(drop=True)
        off_front = not results.pareto_front(two, search.COMPARE_OBJECTIVES).iloc[1]
        assert pair["dominates"] == (off_front and pair["found"] != pair["hand_made"]), pair


def test_pipeline_variants_reads_notebook_07_rows_only():
    store = pd.DataFrame({"variant": ["p1", "p2", "s1", "p3"],
                          "technique": ["pipeline", "pipeline", "search", "pipeline"],
                          "notebook": ["07_pipeline", "07_pipeline", "08_search", "08_search"],
                          "artifact": ["a.tflite", None, "b.tflite", "c.tflite"]})
    assert list(search.pipeline_variants(store)["variant"]) == ["p1"]


# ----------------------------------------------------------------------------- the study

SPACE = search.SearchSpace(model=("m",), sparsity=(0.0, 0.5, 0.9), clusters=(0, 16),
                           quantization=("int8", "float16"))


def fake_evaluate(settings):
    """A deterministic stand-in for a build: sparsity and clusters shrink
    the file and cost accuracy."""
    size = 1000 * (1 - settings.sparsity) * (0.5 if settings.clusters else 1)
    size *= 2 if settings.quantization == "float16" else 1
    latency = 50 if settings.quantization == "int8" else 80
    accuracy = 0.99 - 0.02 * settings.sparsity - 0.005 * bool(settings.clusters)
    return {"val_accuracy": accuracy, "gzip_bytes": size, "latency_p50_us": latency,
            "name": settings.name}


def test_our_front_matches_optuna_and_respects_the_floor(tmp_path):
    study = search.open_study("front", f"sqlite:///{tmp_path / 's.db'}")
    search.optimize(study, fake_evaluate, 10, accuracy_floor=0.975, space=SPACE, progress=False)
    trials = search.trials_table(study)
    assert len(trials) == 10
    assert not trials["feasible"].all(), "the floor should exclude the 0.9 sparsity trials"
    front = search.front(trials)
    assert sorted(front.index) == sorted(t.number for t in study.best_trials)
    assert (front["val_accuracy"] >= 0.975).all()
    # only the 0.9 points fall below
    assert set(trials.loc[~trials["feasible"], "sparsity"]) <= {0.9}


def test_trial_files_follow_the_repository(tiny_model, splits, tmp_path, monkeypatch):
    """The study stores each trial's file relative to the root, so a bundle
    unpacked elsewhere finds it."""
    import labkit
    first, moved = tmp_path / "instructor", tmp_path / "learner"
    for root in (first, moved):
        (root / "artifacts" / "t.tflite").parent.mkdir(parents=True)
        (root / "artifacts" / "t.tflite").write_bytes(b"x" * 100)
    monkeypatch.setattr(search, "build", lambda settings, *a, **k: {
        "artifact": str(labkit.ROOT / "artifacts" / "t.tflite"), "val_accuracy": 0.99, "macs": 1,
        "build_seconds": 1.0})
    monkeypatch.setattr(search, "latency_us", lambda path, images: 10.0)
    for module in (labkit, results):
        monkeypatch.setattr(module, "ROOT", first)
    space = search.SearchSpace(model=("tiny",), sparsity=(0.0,), clusters=(0,),
                               quantization=("int8",))
    study = search.run_search({"tiny": tiny_model}, splits, n_trials=1, space=space,
                              storage=f"sqlite:///{tmp_path / 's.db'}", progress=False)
    assert [t.user_attrs["artifact"] for t in search.finished(study)] == ["artifacts/t.tflite"]
    for module in (labkit, results):
        monkeypatch.setattr(module, "ROOT", moved)
    assert list(search.trials_table(study)["artifact"]) == [str(moved / "artifacts" / "t.tflite")]


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
    search.optimize(reopened, lambda s: pytest.fail("no trial should run"), 8, 0.9, SPACE,
                    progress=False)


@pytest.mark.parametrize("floor", [1.01, -0.1, 2, True, "0.9"])
def test_bad_floor(floor, tmp_path):
    with pytest.raises(ValueError, match="accuracy_floor"):
        search.check_floor(floor)
    study = search.open_study("bad", f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(ValueError, match="accuracy_floor"):
        search.optimize(study, fake_evaluate, 2, accuracy_floor=floor, space=SPACE, progress=False)
    assert not search.finished(study)


def test_bad_settings_and_spaces(tiny_model, splits):
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n_trials"):
            search.check_budget(bad)
    with pytest.raises(ValueError, match="quantization"):
        search.Settings(quantization="int2")
    with pytest.raises(ValueError, match="sparsity"):
        search.Settings(sparsity=1.0)
    with pytest.raises(ValueError, match="clusters"):
        search.Settings(clusters=1)
    # clustering refuses k=2 when it preserves sparsity: the search refuses it before any trial
    with pytest.raises(ValueError, match="clusters >= 3"):
        search.Settings(sparsity=0.5, clusters=2)
    assert search.Settings(sparsity=0.0, clusters=2).clusters == 2
    with pytest.raises(ValueError, match="drop 2 from clusters"):
        search.SearchSpace(sparsity=(0.0, 0.5), clusters=(0, 2))
    with pytest.raises(ValueError, match="quantization"):
        search.SearchSpace(quantization=("int8", "int2"))
    with pytest.raises(ValueError, match="not among the parents"):
        search.build(search.Settings(model="other"), {"tiny": tiny_model}, splits)
    with pytest.raises(ValueError, match="not among the parents"):
        search.run_search({"tiny": tiny_model}, splits, n_trials=1,
                          space=search.SearchSpace(model=("other",)))


# ----------------------------------------------------------------------------- one search point

def test_build_prunes_clusters_quantizes_and_caches(tiny_model, tiny_plain_model, splits, tmp_path):
    settings = search.Settings(model="tiny", sparsity=0.5, clusters=8, quantization="int8")
    plan = models.FineTune(train_subset=256, batch_size=64)
    directory = tmp_path / "trials"
    # 392 x 16 weights; the rest are below the threshold
    assert search.large_layers(tiny_model) == ["dense1"]
    built = search.build(settings, {"tiny": tiny_model}, splits, plan, directory=directory)
    assert built["build_seconds"] > 0 and 0.1 < built["val_accuracy"] <= 1
    path = built["artifact"]
    assert tflite.io_dtypes(path) == (np.int8, np.int8)  # the one converter's int8: int8 in and out
    w = tflite.weights(path)["dense1"]
    assert w["dtype"] == np.int8
    sparsity = np.mean(w["values"] == 0)
    assert 0.45 <= sparsity <= 0.6, f"dense1 sparsity {sparsity:.3f} in the file"
    # per output channel, 8 shared values (zero among them) become at most 8 int8 codes
    assert max(len(np.unique(row)) for row in w["values"]) <= 8
    assert len(np.unique(tflite.weights(path)["conv2"]["values"])) > 8, \
        "conv2 is below the threshold: not clustered"

    again = search.build(settings, {"tiny": tiny_model}, splits, plan, directory=directory)
    assert again["build_seconds"] == 0.0 and again["val_accuracy"] == built["val_accuracy"]
    assert again["artifact"] == path
    # another quantization of the same pruned parent: the pruned model comes from its cache
    search.build(search.Settings(model="tiny", sparsity=0.5, quantization="float16"),
                 {"tiny": tiny_model}, splits, plan, directory=directory)
    assert len(list((tmp_path / "pruned").glob("pruned-s50-*.keras"))) == 1
    # same settings and name, another parent model: a new trial, not the first parent's file
    other = search.build(settings, {"tiny": tiny_plain_model}, splits, plan, directory=directory)
    assert other["build_seconds"] > 0 and other["artifact"] != path
    assert other["inputs"] != built["inputs"]
    assert len(list((tmp_path / "pruned").glob("pruned-s50-*.keras"))) == 2


def test_int4_mode_stores_int4_weights_where_validation_tolerates_them(tiny_model, splits,
                                                                       tmp_path):
    from labkit import litert_quant
    settings = search.Settings(model="tiny", sparsity=0.0, quantization="int4")
    built = search.build(settings, {"tiny": tiny_model}, splits, directory=tmp_path / "trials")
    assert built["build_seconds"] > 0 and 0.1 < built["val_accuracy"] <= 1
    table = litert_quant.weight_table(built["artifact"])
    assert set(table["type"]) <= {"INT4", "INT8"} and "INT4" in set(table["type"]), table
    assert (table.loc[table["type"] == "INT4", "max_codes_per_scale"] <= 16).all()
    again = search.build(settings, {"tiny": tiny_model}, splits, directory=tmp_path / "trials")
    assert again["build_seconds"] == 0.0


def test_smallest_at_chooses_on_validation_and_records(tiny_model, splits, tmp_path, results_path,
                                                       monkeypatch):
    from labkit import litert_quant
    path = models.save_tflite(tiny_model, tmp_path / "tiny.tflite")
    monkeypatch.setattr(litert_quant, "validation_floor",
                        lambda target: 0.0 if target < 0.991 else 1.01)
    found = search.smallest_at(splits, candidates={"tiny": path}, directory=tmp_path / "lq")
    table, chosen = found["table"], found["chosen"]
    assert list(chosen) == ["99.0%"]                       # nothing reaches a floor above 1
    # floor 0: simply the smallest
    assert chosen["99.0%"]["gzip_bytes"] == table["gzip_bytes"].min()
    assert 0.1 < chosen["99.0%"]["test_accuracy"] <= 1
    stored = pd.read_csv(results_path).set_index("variant")
    assert stored.loc["litert-smallest-at-99.0%", "technique"] == "quantization"
