"""The layering of docs/architecture.md holds: `lint-imports` checks the `.importlinter` contract
(imports only go downwards, so no cycles between layers)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_only_go_downwards() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_contract_names_every_package() -> None:
    """A new top-level package or module must take its place in the layers (else nothing checks it)."""
    names = (ROOT / ".importlinter").read_text().replace("|", "\n").split()
    listed = {name.split(".")[1] for name in names if name.startswith("signalgen.")}
    present = {p.stem for p in (ROOT / "signalgen").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem not in ("__init__", "__main__")}
    assert present - listed == set(), f"not in .importlinter's layers: {sorted(present - listed)}"
