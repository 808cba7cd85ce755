"""The checkout's packages against the installed ones. Run from the repo root (`python -m ...`, pytest) the checkout
comes first on sys.path, so a top-level package of ours named like a module another distribution ships hides that
module from everything that imports it. transformers (5.25 on) depends on Hugging Face's `kernels` and imports it
on `import transformers`: our Triton kernels live in d2f_kernels/ for that reason."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))


def test_no_package_of_the_checkout_takes_an_installed_distributions_name():
    assert {"d2f", "infer", "train", "d2f_kernels"} <= set(OURS)
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions shipping it
    clashes = {name: installed[name] for name in OURS if set(installed.get(name, ())) - {"d2f"}}
    assert clashes == {}


def test_transformers_and_peft_import_from_the_repo_root():
    # `python -c` puts the current directory first on sys.path, as `python -m infer.eval` does
    out = subprocess.run([sys.executable, "-c", "import peft, transformers, d2f_kernels; "
                          "from transformers import PreTrainedModel; print(d2f_kernels.__file__)"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).parent == REPO / "d2f_kernels"
