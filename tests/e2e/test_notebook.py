"""examples/notebook.ipynb runs top to bottom (nbclient, a kernel on this venv's Python) on the
bundled model; its slider form is checked against a stand-in ipywidgets."""

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

FAKE_IPYWIDGETS = '''
calls = []

class _Widget:
    def __init__(self, **kw):
        self.kw = kw

FloatSlider = IntSlider = Textarea = Layout = _Widget

def interact_manual(fn, **widgets):
    calls.append((fn, widgets))
'''


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
    assert "ipywidgets" in outputs_text(nb.cells[-2])  # not installed here: says so, no form
    assert outputs_text(nb.cells[-1]).strip() == sys.executable


def test_the_slider_form_uses_infer_with_the_demo_ranges(jupyter_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = jupyter_env / "fake"
    (fake / "ipywidgets").mkdir(parents=True)
    (fake / "ipywidgets" / "__init__.py").write_text(FAKE_IPYWIDGETS)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    source = nbformat.read(NOTEBOOK, as_version=4)
    form = next(c for c in source.cells if "interact_manual" in c.source)
    check = new_code_cell(
        "fn, w = widgets.calls[0]\n"
        "assert fn is infer\n"
        "assert (w['top_p'].kw['min'], w['top_p'].kw['max'], w['top_p'].kw['step']) == (0.0, 1.0, 0.1)\n"
        "assert (w['temp'].kw['min'], w['temp'].kw['max'], w['temp'].kw['step']) == (0.0, 1.0, 0.1)\n"
        "assert w['gen_len'].kw['min'] >= 1\n"
        "print('form ok')"
    )
    nb = nbformat.v4.new_notebook(cells=[new_code_cell("def infer(context, top_p=0.9, temp=1.0, gen_len=512): pass"), form, check])
    run(nb, jupyter_env)
    assert "form ok" in outputs_text(nb.cells[-1])
