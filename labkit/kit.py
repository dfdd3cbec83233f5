"""The offline classroom kit: `python -m labkit.kit pack` (instructor) and `unpack` (learners).

pack writes under build/kit/: wheels/ (the pinned dependencies for the chosen Pythons and
platforms, so 30 laptops install with no network: pip install --no-index --find-links wheels -e
".[dev]") and models.tar.gz (every model in artifacts/, with kit-manifest.json: each file's
SHA-256 and the library versions that made them). unpack checks the bundle before it touches
artifacts/ (every file present and matching its checksum, the versions equal to the installed
ones, no learner's own model overwritten without asking). Measurements are never bundled.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

from labkit import ARTIFACTS_DIR, ROOT, files
from labkit.files import sha256_of
from labkit.measure import ACCURACY_DIR

KIT_DIR = ROOT / "build" / "kit"
MANIFEST = "kit-manifest.json"
# The libraries whose versions decide whether a cached model is still valid: tf-keras writes the
# .keras files, TensorFlow's converter and tfmot shape the .tflite files and their cache keys.
VERSIONED = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert",
             "ai-edge-quantizer", "numpy")
# pip download takes one platform tag per --platform; a learner's pip accepts any older manylinux
# tag too, so the kit asks for each that wheels on PyPI carry (glibc 2.28 or newer: Debian 10,
# Ubuntu 20.04 on).
PLATFORMS = {"linux": ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                       "manylinux2014_x86_64"),
             "linux-arm": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
                           "manylinux2014_aarch64"),
             "mac": ("macosx_12_0_arm64", "macosx_11_0_arm64"), "windows": ("win_amd64",)}


class KitError(Exception):
    """A bundle that cannot be used as it is; the message says which file and what to do."""


def installed_versions() -> dict:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_files(artifacts: Path) -> list[Path]:
    """Every file under artifacts/ worth shipping (not temporary files, not a previous manifest, not
    the accuracies measure.accuracy kept: a learner's machine measures its own)."""
    return sorted(p for p in artifacts.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(".") and not p.name.endswith((".tmp", ".lock"))
                  and p.relative_to(artifacts).parts[0] != ACCURACY_DIR.name)


# ----------------------------------------------------------------------------- pack

def pack_models(artifacts: Path = ARTIFACTS_DIR, out: Path = KIT_DIR) -> Path:
    """models.tar.gz with every model file and kit-manifest.json (checksums, versions); atomic."""
    shipped = model_files(artifacts)
    if not shipped:
        raise KitError(f"{artifacts} holds no models: run the book first (python -m labkit.book), "
                       "then pack")
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": installed_versions(),
                "files": {str(p.relative_to(artifacts)): {"sha256": sha256_of(p),
                                                          "bytes": p.stat().st_size}
                          for p in shipped}}

    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            for path in shipped:
                tar.add(path, arcname=str(path.relative_to(artifacts)), recursive=False)
    return files.write_atomic(out / "models.tar.gz", write)


def requirements() -> list[str]:
    """The pinned dependencies of pyproject.toml, the dev extra included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])


def download_commands(out: Path, pythons, platforms) -> list[list[str]]:
    """One `pip download` per (Python, platform): binary wheels only, as a learner's pip wants."""
    commands = []
    for python in pythons:
        for platform in platforms:
            tags = PLATFORMS.get(platform, (platform,))
            commands.append([sys.executable, "-m", "pip", "download", "--dest", str(out / "wheels"),
                             "--only-binary=:all:", "--python-version", python,
                             *[arg for tag in tags for arg in ("--platform", tag)],
                             "setuptools>=68", "wheel", *requirements()])
    return commands


def pack(out: Path = KIT_DIR, pythons=("3.11",), platforms=("linux",), wheels: bool = True) -> dict:
    made = {"models": pack_models(out=out)}
    if wheels:
        for command in download_commands(out, pythons, platforms):
            print("+", " ".join(command[3:8]), "...", flush=True)
            subprocess.run(command, check=True)
        made["wheels"] = out / "wheels"
    return made


# ----------------------------------------------------------------------------- unpack

def read_manifest(tar: tarfile.TarFile, bundle: Path) -> dict:
    try:
        member = tar.getmember(MANIFEST)
        return json.loads(tar.extractfile(member).read())
    except (KeyError, json.JSONDecodeError, AttributeError) as error:
        raise KitError(f"{bundle} has no readable {MANIFEST}: it is not a labkit models bundle, "
                       f"or it is damaged ({error}). Ask the instructor for the bundle again.") \
            from None


def check_versions(manifest: dict) -> None:
    mine = installed_versions()
    wrong = {name: (made, mine.get(name)) for name, made in manifest["versions"].items()
             if mine.get(name) != made}
    if wrong:
        listed = "; ".join(f"{name}: bundle {made}, installed {have}"
                           for name, (made, have) in wrong.items())
        raise KitError(f"the bundle's models were made with other library versions ({listed}). "
                       "A cached model is only valid for the versions that wrote it: install the "
                       "README's pins (pip install -e \".[dev]\", or from the kit's wheels), or "
                       "ask for a bundle made with yours.")


def unpack(bundle: Path, artifacts: Path = ARTIFACTS_DIR, replace: bool | None = None,
           ask=input) -> dict:
    """Verify `bundle` completely, then move its models into `artifacts`.

    A file already in artifacts/ with other contents is the learner's own: kept unless `replace`
    is True; with replace=None the learner is asked once (`ask`), and a non-interactive run keeps
    it. Returns {"added": [...], "same": [...], "kept": [...], "replaced": [...]}.
    """
    bundle = Path(bundle)
    if not bundle.is_file():
        raise KitError(f"no bundle at {bundle}: copy models.tar.gz from the instructor's kit first")
    artifacts.mkdir(parents=True, exist_ok=True)
    # the bundle is unpacked and checked here, beside artifacts/, before any model moves
    staging = Path(tempfile.mkdtemp(prefix=".kit-", dir=artifacts))
    try:
        manifest = extract_checked(bundle, staging)
        report = {"added": [], "same": [], "kept": [], "replaced": []}
        conflicts = [name for name in manifest["files"] if (artifacts / name).is_file()
                     and sha256_of(artifacts / name) != manifest["files"][name]["sha256"]]
        if conflicts and replace is None:
            replace = sys.stdin.isatty() and ask(
                f"{len(conflicts)} of your own model files differ from the bundle's (e.g. "
                f"{conflicts[0]}). Replace them with the bundle's? [y/N] ").strip().lower() == "y"
        for name in manifest["files"]:
            source, target = staging / name, artifacts / name
            if name in conflicts and not replace:
                report["kept"].append(name)
                continue
            kind = "replaced" if name in conflicts else "same" if target.is_file() else "added"
            if kind != "same":   # staging sits beside artifacts/: one rename, whole or not at all
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
            report[kind].append(name)
        files.write_json(artifacts / MANIFEST,
                         {**manifest, "unpacked": time.strftime("%Y-%m-%d %H:%M:%S")})
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_checked(bundle: Path, staging: Path) -> dict:
    """Unpack `bundle` into `staging` and return its manifest, once every file is there, matches
    its checksum and was made with the installed versions; KitError naming the file otherwise."""
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            manifest = read_manifest(tar, bundle)
            check_versions(manifest)
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise KitError(f"{bundle} is damaged or incomplete ({type(error).__name__}: {error}); "
                       "copy it again from the instructor's kit") from None
    for name, entry in manifest["files"].items():
        path = staging / name
        if not path.is_file():
            raise KitError(f"{bundle} is incomplete: {name} is missing. Copy the bundle again.")
        if sha256_of(path) != entry["sha256"]:
            raise KitError(f"{bundle} is corrupt: {name} does not match its checksum. "
                           "Copy the bundle again.")
    extra = sorted(str(p.relative_to(staging)) for p in model_files(staging) if
                   str(p.relative_to(staging)) not in manifest["files"])
    if extra:
        raise KitError(f"{bundle} holds files its manifest does not list ({', '.join(extra[:3])}): "
                       "refused")
    return manifest


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.kit",
                                     description="The offline classroom kit.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack",
                            help="instructor: wheels for offline installs and the trained models")
    p.add_argument("--out", type=Path, default=KIT_DIR)
    p.add_argument("--python", nargs="+", default=[f"{sys.version_info[0]}.{sys.version_info[1]}"],
                   help="Python versions of the learners' laptops (default: this one), "
                        "e.g. 3.11 3.12 3.13")
    p.add_argument("--platform", nargs="+", default=["linux"],
                   help=f"learners' platforms: {', '.join(PLATFORMS)} or a pip platform tag "
                        "(default: linux)")
    p.add_argument("--models-only", action="store_true",
                   help="skip the wheels (learners are already installed)")
    u = commands.add_parser("unpack",
                            help="learner: verify the models bundle and put it in artifacts/")
    u.add_argument("bundle", type=Path, help="models.tar.gz from the instructor's kit")
    group = u.add_mutually_exclusive_group()
    group.add_argument("--replace", action="store_true", default=None,
                       help="replace your own differing models")
    group.add_argument("--keep", dest="replace", action="store_false",
                       help="keep your own differing models")
    u.set_defaults(replace=None)   # neither flag: ask
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            made = pack(args.out, args.python, args.platform, wheels=not args.models_only)
            size = made["models"].stat().st_size / 2**20
            print(f"models bundle: {made['models']} ({size:.0f} MiB)")
            if "wheels" in made:
                wheels = sum(p.stat().st_size for p in made["wheels"].glob("*")) / 2**20
                print(f"wheelhouse: {made['wheels']} ({wheels:.0f} MiB); learners install with\n"
                      f"  pip install --no-index --find-links {made['wheels']} -e \".[dev]\"")
            return 0
        report = unpack(args.bundle, replace=args.replace)
    except KitError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 1
    print(f"unpacked into {ARTIFACTS_DIR}: {len(report['added'])} added, "
          f"{len(report['same'])} already there, "
          f"{len(report['replaced'])} replaced, {len(report['kept'])} of your own kept")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
