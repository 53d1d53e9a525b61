"""examples/notebook.ipynb runs top to bottom (nbclient, a kernel on this venv's Python) on the
bundled model in int8, its slider form included (ipywidgets comes with the test extras); without
ipywidgets the notebook says how to get it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"
KERNEL = "gptj-test-venv"

# Stands in for a kernel without ipywidgets: importing it fails as a missing package would.
MISSING_IPYWIDGETS = 'raise ImportError("No module named ipywidgets")\n'

# Runs after the notebook: the form has the demo's sliders, and its button runs infer.
PRESS_THE_FORM = """
w = form.widget
controls = {c.description: c for c in w.children if getattr(c, "description", "")}
assert (controls["top_p"].min, controls["top_p"].max, controls["top_p"].step) == (0.0, 1.0, 0.1)
assert (controls["temp"].min, controls["temp"].max, controls["temp"].step) == (0.0, 1.0, 0.1)
assert controls["gen_len"].min >= 1
controls["gen_len"].value, controls["temp"].value = 4, 0.0
w.manual_button.click()
assert isinstance(w.result, str) and w.result.strip(), w.result
print("form ran")
"""


@pytest.fixture()
def jupyter_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernelspec for this interpreter under tmp_path; Jupyter and IPython write only there."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "gptj venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    return tmp_path


def run(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    client = NotebookClient(nb, timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def outputs_text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/html", "") + out["data"].get("text/plain", ""))
    return "".join(parts)


def test_the_notebook_runs_top_to_bottom(jupyter_env: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    form_cell = next(c for c in nb.cells if "interact_manual" in c.source)
    nb.cells.append(new_code_cell(PRESS_THE_FORM))
    nb.cells.append(new_code_cell("import sys; print(sys.executable)"))
    run(nb, jupyter_env)
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out["output_type"] == "error"]
    assert not errors, errors
    infer_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("text = infer(")]
    assert len(infer_cells) == 3
    for cell in infer_cells:
        html = [o for o in cell.outputs if o["output_type"] == "display_data"]
        streamed = "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream")
        assert html and html[0]["data"]["text/html"].startswith("<b")  # the prompt, in bold
        assert streamed.strip(), f"no generated text for: {cell.source}"
    assert "<b style='white-space: pre-wrap'>EleutherAI is</b>" in outputs_text(infer_cells[0])
    load_cell = next(c for c in nb.cells if c.cell_type == "code" and "gptj.load(" in c.source)
    assert "int8" in outputs_text(load_cell)  # the model's repr names its weights
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in form_cell.outputs)
    assert "not installed" not in outputs_text(form_cell)
    assert "form ran" in outputs_text(nb.cells[-2])
    assert outputs_text(nb.cells[-1]).strip() == sys.executable


def test_without_ipywidgets_the_notebook_says_how_to_get_it(jupyter_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = jupyter_env / "fake"
    (fake / "ipywidgets").mkdir(parents=True)
    (fake / "ipywidgets" / "__init__.py").write_text(MISSING_IPYWIDGETS)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    source = nbformat.read(NOTEBOOK, as_version=4)
    form = next(c for c in source.cells if "interact_manual" in c.source)
    nb = nbformat.v4.new_notebook(cells=[new_code_cell("def infer(context, top_p=0.9, temp=1.0, gen_len=512): pass"), form])
    run(nb, jupyter_env)
    text = outputs_text(nb.cells[-1])
    assert "pip install ipywidgets" in text and not [o for o in nb.cells[-1].outputs if o["output_type"] == "error"]
