"""Open the lab book in JupyterLab: `python -m labkit.lab` (extra arguments go to JupyterLab).

Owns the JupyterLab launch (README's first command; the browser test of the pipeline notebook
starts it). Serves notebooks/ on localhost only, with JupyterLab's token authentication kept.
It does not call labkit.setup(): it replaces this process with JupyterLab (os.execv), so nothing
setup() set would survive; each notebook calls setup() in its own kernel. Importing labkit here
still sets the environment switches (legacy Keras, quiet logs) the kernels inherit.
"""
import os
import sys
from pathlib import Path

from labkit import NOTEBOOKS_DIR

# overrides.json there answers "Would you like to get notified about official Jupyter news?" with
# "no" for every learner (and turns off the update check): a classroom is often offline.
SETTINGS_DIR = Path(__file__).resolve().parent / "jupyterlab"


def command(extra=()) -> list:
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={NOTEBOOKS_DIR}",
           "--ServerApp.ip=127.0.0.1", f"--LabApp.app_settings_dir={SETTINGS_DIR}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI machines run as root
    return cmd + list(extra)


if __name__ == "__main__":
    cmd = command(sys.argv[1:])
    print("Starting:", " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)
