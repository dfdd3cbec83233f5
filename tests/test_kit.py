"""The offline kit: pack the models, unpack them on a fresh clone, refuse what cannot be trusted."""
import io
import json
import tarfile

import numpy as np
import pytest

from labkit import files, kit, models


@pytest.fixture()
def instructor(tmp_path, tiny_model):
    """An instructor's artifacts/ with one real cache entry (a tiny model) and a .tflite beside
    it."""
    artifacts = tmp_path / "instructor" / "artifacts"
    built = []
    def build():
        built.append(1)
        return models.clone_with_weights(tiny_model), {"note": "made by the instructor"}
    models.cached("tiny", {"k": 1}, tiny_model, build, artifacts / "demo")
    models.save_tflite(tiny_model, artifacts / "demo" / "tiny.tflite")
    assert built == [1]
    return artifacts


def test_round_trip_the_learner_loads_instead_of_building(instructor, tmp_path, tiny_model):
    bundle = kit.pack_models(instructor, tmp_path / "kit")
    learner = tmp_path / "learner" / "artifacts"     # a fresh clone: no artifacts/ yet
    report = kit.unpack(bundle, learner)
    assert sorted(report["added"]) == sorted(str(p.relative_to(instructor))
                                             for p in kit.model_files(instructor))
    assert json.loads((learner / kit.MANIFEST).read_text())["versions"] == kit.installed_versions()

    def must_not_build():
        raise AssertionError("the unpacked bundle should have been loaded, not rebuilt")
    model, record = models.cached("tiny", {"k": 1}, tiny_model, must_not_build, learner / "demo")
    assert record["cached"] and record["note"] == "made by the instructor"
    x = np.zeros((2, 28, 28, 1), np.float32)
    np.testing.assert_allclose(model(x).numpy(), tiny_model(x).numpy(), atol=1e-6)
    again = kit.unpack(bundle, learner)              # unpacking twice changes nothing
    assert again["same"] and not again["added"] and not again["kept"]


def rewrite(bundle, out, change):
    """A copy of `bundle` with `change(name, data) -> data or None (drop)` applied to each
    member."""
    with tarfile.open(bundle, "r:gz") as source, tarfile.open(out, "w:gz") as target:
        for member in source.getmembers():
            data = change(member.name, source.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    return out


def test_measured_accuracies_stay_on_the_machine_that_measured_them(tmp_path):
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "0a1b.json").write_text('{"accuracy": 0.99}')
    (tmp_path / "pruning").mkdir()
    (tmp_path / "pruning" / "accuracy.tflite").write_bytes(b"a model that happens to be called so")
    assert kit.model_files(tmp_path) == [tmp_path / "pruning" / "accuracy.tflite"]


def test_a_corrupt_partial_or_truncated_bundle_is_refused_naming_the_file(instructor, tmp_path):
    bundle = kit.pack_models(instructor, tmp_path / "kit")
    learner = tmp_path / "learner"
    flipped = rewrite(bundle, tmp_path / "flipped.tar.gz",
                      lambda name,
                      data: data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(".tflite") else data)
    with pytest.raises(kit.KitError,
                       match=r"corrupt: demo/tiny.tflite does not match its checksum"):
        kit.unpack(flipped, learner)
    partial = rewrite(bundle, tmp_path / "partial.tar.gz", lambda name,
                      data: None if name.endswith(".tflite") else data)
    with pytest.raises(kit.KitError, match=r"incomplete: demo/tiny.tflite is missing"):
        kit.unpack(partial, learner)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(kit.KitError, match="damaged or incomplete"):
        kit.unpack(truncated, learner)
    assert not any(p
                   for p in (learner / "demo").rglob("*")) if (learner / "demo").exists() else True
    assert kit.main(["unpack", str(flipped)]) == 1   # the command says "refused" and exits 1


def test_other_library_versions_are_refused(instructor, tmp_path):
    bundle = kit.pack_models(instructor, tmp_path / "kit")
    def older(name, data):
        if name != kit.MANIFEST:
            return data
        manifest = json.loads(data)
        manifest["versions"]["tensorflow"] = "2.20.0"
        return json.dumps(manifest).encode()
    with pytest.raises(kit.KitError, match=r"tensorflow: bundle 2.20.0, installed 2.21.0"):
        kit.unpack(rewrite(bundle, tmp_path / "older.tar.gz", older), tmp_path / "learner")


def test_a_learners_own_model_is_kept_unless_they_say_replace(instructor, tmp_path):
    bundle = kit.pack_models(instructor, tmp_path / "kit")
    learner = tmp_path / "learner"
    (learner / "demo").mkdir(parents=True)
    (learner / "demo" / "tiny.tflite").write_bytes(b"the learner's own newer model")
    # not a terminal: never asks, keeps
    report = kit.unpack(bundle, learner, ask=lambda prompt: "y")
    assert report["kept"] == ["demo/tiny.tflite"]
    assert (learner / "demo" / "tiny.tflite").read_bytes() == b"the learner's own newer model"
    report = kit.unpack(bundle, learner, replace=True)
    assert report["replaced"] == ["demo/tiny.tflite"]
    assert (files.sha256_of(learner / "demo" / "tiny.tflite")
            == files.sha256_of(instructor / "demo" / "tiny.tflite"))


def test_pack_refuses_an_empty_artifacts_folder_and_downloads_binary_wheels_per_python(tmp_path):
    with pytest.raises(kit.KitError, match="holds no models: run the book first"):
        kit.pack_models(tmp_path / "empty", tmp_path / "kit")
    commands = kit.download_commands(tmp_path, ["3.11", "3.13"], ["linux", "windows"])
    assert len(commands) == 4
    assert all("--only-binary=:all:" in c and "tensorflow==2.21.0" in c for c in commands)
    assert ["--python-version", "3.13", "--platform", "win_amd64"] == commands[-1][7:11]
    assert commands[0].count("--platform") == len(kit.PLATFORMS["linux"])
