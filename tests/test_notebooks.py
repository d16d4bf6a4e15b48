"""Every notebook runs headless on CPU from a clean checkout, and shows the plots it promises."""
import os

import pytest

nbformat = pytest.importorskip('nbformat', reason='pip install -e ".[notebooks]"')
nbclient = pytest.importorskip('nbclient', reason='pip install -e ".[notebooks]"')

NOTEBOOKS = os.path.join(os.path.dirname(__file__), '..', 'notebooks')


@pytest.mark.parametrize('name,min_images', [('walkthrough.ipynb', 5), ('interpolation.ipynb', 1), ('sampling.ipynb', 2)])
def test_notebook_executes_and_has_plots(name, min_images):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': NOTEBOOKS}})
    client.execute()  # raises CellExecutionError if any cell fails
    images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if 'image/png' in o.get('data', {})]
    assert len(images) >= min_images
