"""The ```python blocks of docs/integrations.md, so that the tests run the examples as written."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def python_blocks(section: str) -> list:
    """The python code blocks under the ``## <section>`` heading, in order."""
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    bodies = [p for p in parts if p.startswith(section + "\n")]
    assert len(bodies) == 1, f"no single section '## {section}' in {DOC}"
    return re.findall(r"^```python\n(.*?)^```", bodies[0], flags=re.MULTILINE | re.DOTALL)


def run_first_block(section: str, folder) -> dict:
    """Execute the first python block of ``section`` as written, inside ``folder`` (its relative
    paths land there), on one thread; returns the block's namespace."""
    import os

    import torch
    old = os.getcwd()
    os.chdir(folder)
    torch.set_num_threads(1)
    try:
        namespace = {"__name__": "docs_example"}
        exec(python_blocks(section)[0], namespace)
    finally:
        os.chdir(old)
    return namespace
