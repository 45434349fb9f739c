"""The notebooks run top to bottom (each checks its own results with asserts) and print what
they promise."""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("optax")

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = {
    "quickstart": ["InvalidProblemError - gated_activation: x.shape[1]", "(5, 3, 3)"],
    # Trains HybridLM on the copying task (asserting the held-out loss halves) and generates
    # with caches (asserting every step equals the full forward).
    "hybrid_lm": ["the loss went down", "empty suffix equals the prefix's state bit for bit: True"],
    "mamba2_decode": ["prefill 32 + 8 steps vs the whole sequence", "packed vs separate"],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name):
    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    for expected in NOTEBOOKS[name]:
        assert expected in outputs
