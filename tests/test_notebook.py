"""The quickstart notebook: stored without outputs, and runs top to bottom in a fresh kernel."""

import math
import re
import sys
from pathlib import Path

import ipykernel.kernelspec as ipykernel_spec
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert not cell.outputs and cell.execution_count is None, (
            f"cell {cell.id} of {NOTEBOOK.name} has outputs: clear them before committing")


def use_this_python_kernel(tmp_path: Path, monkeypatch) -> None:
    """Make the "python3" kernel this interpreter, whatever kernels the machine has installed:
    ipykernel writes a kernelspec into a temporary directory that JUPYTER_PATH puts first.
    Nothing is installed and the user's Jupyter directories are left alone."""
    data_dir = tmp_path / "jupyter"
    ipykernel_spec.write_kernel_spec(data_dir / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(data_dir))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


def text_outputs(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    use_this_python_kernel(tmp_path, monkeypatch)
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    # The kernel inherits this environment. The notebook itself must provide the 8 CPU devices
    # (so conftest's device-count flag is not passed on, only its fast-compile setting); the
    # corpus cache and the notebook's tempfile run directory go under tmp_path.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MOEJAX_CACHE", str(cache))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    cells = {cell.id: cell for cell in nb.cells if cell.cell_type == "code"}
    assert "8 cpu devices" in text_outputs(cells["devices"])
    assert "logits (8, " in text_outputs(cells["forward"])
    assert "expert_counts" in text_outputs(cells["forward"])
    routing_rows = re.findall(r"^'.'\s+\[\d+, \d+\]\s+[\d.]+, [\d.]+$", text_outputs(cells["routing"]),
                              re.MULTILINE)
    assert len(routing_rows) >= 10

    summary = text_outputs(cells["train"])
    match = re.search(r"held-out loss (\S+) = (\S+) bits per byte", summary)
    assert match, summary
    held_out, bits_per_byte = float(match[1]), float(match[2])
    assert math.isfinite(held_out) and held_out < math.log(256), summary  # below a uniform guess
    assert bits_per_byte == pytest.approx(held_out / math.log(2), abs=0.01)

    figures = [out for out in cells["plots"].outputs if "image/png" in out.get("data", {})]
    assert figures, "the plots cell showed no figure"

    # It used the cache and temporary directories it was given, and left a complete run there.
    assert list(cache.glob("corpus/*/meta.json"))
    assert list(scratch.glob("moejax-quickstart-*/metrics.jsonl"))
