"""The console scripts setup.py declares: installed, loadable, and the same commands as the example
scripts (``rasa-train`` = examples/pretrain_rasa.py, ``rasa-memory`` = tools/memory_estimate.py)."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"rasa-train": "rasa_megatron.cli.train:main", "rasa-export": "rasa_megatron.cli.export:main",
            "rasa-convert": "rasa_megatron.cli.convert:main",
            "rasa-memory": "rasa_megatron.cli.memory:main",
            "rasa-reconstruction": "rasa_megatron.cli.reconstruction:main",
            "rasa-eval": "rasa_megatron.cli.evaluate:main",
            "rasa-reproduce": "rasa_megatron.cli.reproduce:main"}


def test_console_scripts_are_installed_and_load():
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
             if ep.name.startswith("rasa-")}
    assert {name: ep.value for name, ep in found.items()} == COMMANDS
    assert all(callable(ep.load()) for ep in found.values())


def test_rasa_train_is_the_example_script():
    recipe = ROOT / "examples" / "configs" / "llama3_8b_rasa.yaml"
    args = ["--config", str(recipe), "--dry-run", "--nodes", "1"]
    script = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_rasa.py"), *args],
                            capture_output=True, text=True, timeout=300)
    command = subprocess.run([str(Path(sys.executable).parent / "rasa-train"), *args], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
    assert script.returncode == command.returncode == 0, script.stderr + command.stderr
    assert script.stdout == command.stdout and "| ZeRO-3 |" in command.stdout
    bad = subprocess.run([str(Path(sys.executable).parent / "rasa-train"), "--config", str(recipe),
                          "--set", "train.optimiser=sgd"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown key(s) ['train.optimiser']" in bad.stderr
